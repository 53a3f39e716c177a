//! The error of a run-YAML value out of range or of an inconsistent combination, naming the
//! dotted key at fault, and the line of the YAML where that key is set (`ConfigError::line_in`,
//! which `RunConfig::from_yaml` adds to the message). Every section's `validate` returns it. The
//! ground floor: imports nothing of sdkd's.

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

impl ConfigError {
    /// The 1-based line of `text` (block-style YAML) where the key at fault is set, if found.
    pub fn line_in(&self, text: &str) -> Option<usize> {
        line_of_key(text, &self.key)
    }
}

/// The 1-based line where a dotted key (`train.batch_size`) is set in block-style YAML.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let parts: Vec<&str> = dotted.split('.').collect();
    let mut depth = 0; // how many parts have matched
    let mut indents: Vec<usize> = vec![];
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        while let Some(&i) = indents.last() {
            if indent <= i {
                indents.pop();
                depth -= 1;
            } else {
                break;
            }
        }
        let key = trimmed.split(':').next().unwrap_or("").trim().trim_matches(|c| c == '"' || c == '\'');
        if depth < parts.len() && key == parts[depth] && trimmed.contains(':') {
            depth += 1;
            indents.push(indent);
            if depth == parts.len() {
                return Some(n + 1);
            }
        }
    }
    None
}
