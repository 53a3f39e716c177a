//! The error of a run-YAML value out of range or of an inconsistent combination, naming the
//! dotted key at fault (`RunConfig::from_yaml` adds the line where the key appears). Every
//! section's `validate` returns it. The ground floor: imports nothing of sdkd's.

/// A value out of range or an inconsistent combination; `key` is the dotted key at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

/// The error for `key` with `message` (which names the key and the value).
pub fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError { key: key.to_string(), message }
}
