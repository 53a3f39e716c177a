//! The one way sdkd reads diffusers' and transformers' JSON configs (`config.json`,
//! `scheduler_config.json`): serde into a typed struct whose `Default` is the constructor's
//! defaults, errors that name the key and its value, and one check for keys accepted only at
//! their default value (the features behind them are not implemented).
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// `path` itself, or `path/name` when `path` is a folder.
pub fn config_file(path: &Path, name: &str) -> PathBuf {
    if path.is_dir() {
        path.join(name)
    } else {
        path.to_path_buf()
    }
}

/// Reads `file` as a JSON object; `what` names the config in errors ("UNet config").
/// `prepare` rewrites the text first (the scheduler's Python `Infinity`).
pub fn read_object(file: &Path, what: &str, prepare: fn(&str) -> String) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {what} {}", file.display()))?;
    match serde_json::from_str(&prepare(&text)) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => bail!("{what} {}: expected a JSON object", file.display()),
        Err(e) => Err(e).with_context(|| format!("{what} {} is not valid JSON", file.display())),
    }
}

/// `value` as a JSON object, for the `from_json` constructors.
pub fn object(value: &Value) -> Result<&Map<String, Value>> {
    value.as_object().ok_or_else(|| anyhow!("expected a JSON object"))
}

/// Deserializes `obj` into `T`. A null value means "the default", as in diffusers, so nulls
/// are dropped first; an error names the key (`block_out_channels[3]`) and the value.
pub fn typed<T: DeserializeOwned>(obj: &Map<String, Value>) -> Result<T> {
    let present: Map<String, Value> = obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    serde_path_to_error::deserialize(Value::Object(present)).map_err(|e| anyhow!("key \"{}\": {}", e.path(), e.inner()))
}

/// One key of `obj`, deserialized (`None` when absent or null), errors naming the key.
pub fn field<T: DeserializeOwned>(obj: &Map<String, Value>, key: &str) -> Result<Option<T>> {
    match obj.get(key).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => T::deserialize(v).map(Some).map_err(|e| anyhow!("key {key:?}: {e}")),
    }
}

/// Errors on the first of `defaults`' keys whose value in `obj` is not its default, naming
/// the key, the value and what sdkd accepts. `Value::Null` as a default means "absent or null";
/// a per-stage list of the default value is the default too.
pub fn check_defaults(obj: &Map<String, Value>, defaults: &[(&str, Value)], supported_by: &str) -> Result<()> {
    fn is_default(value: &Value, default: &Value) -> bool {
        match (value, default) {
            (Value::Null, d) => d.is_null(),
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Value::Array(items), d) if !d.is_null() => items.iter().all(|v| is_default(v, d)),
            (a, b) => a == b,
        }
    }
    for (key, default) in defaults {
        if let Some(v) = obj.get(*key).filter(|v| !is_default(v, default)) {
            bail!("key {key:?}: value {v} is not supported by {supported_by} (only {default})");
        }
    }
    Ok(())
}

/// Errors unless `v` lies in `lo..=hi`, naming the key. Sizes beyond any published model are
/// refused here, before LibTorch is asked to allocate them.
pub fn check_size(key: &str, v: i64, lo: i64, hi: i64) -> Result<()> {
    if !(lo..=hi).contains(&v) {
        bail!("key {key:?}: {v} is outside {lo}..={hi}");
    }
    Ok(())
}

/// The widest layer sdkd builds: 16384 channels, far past SD-XL's 1280 or CLIP ViT-bigG's 1280.
pub const MAX_WIDTH: i64 = 1 << 14;

/// The dotted keys whose values differ between two JSON values, with the old and new value
/// (objects are compared key by key, a missing key as null; "" names a difference at the top).
pub fn differing_keys(old: &Value, new: &Value) -> Vec<(String, Value, Value)> {
    fn walk(prefix: &str, a: &Value, b: &Value, out: &mut Vec<(String, Value, Value)>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
                }
            }
            _ if a != b => out.push((prefix.to_string(), a.clone(), b.clone())),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", old, new, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(default)]
    struct Demo {
        width: i64,
        stages: Vec<i64>,
    }

    #[test]
    fn errors_name_key_and_value_and_nulls_are_defaults() {
        let obj = |v: Value| v.as_object().unwrap().clone();
        let d: Demo = typed(&obj(json!({"width": null, "stages": [1, 2]}))).unwrap();
        assert_eq!((d.width, d.stages), (0, vec![1, 2]));
        let e = typed::<Demo>(&obj(json!({"stages": [1, "x"]}))).unwrap_err().to_string();
        assert!(e.contains("stages[1]") && e.contains("\"x\""), "{e}");
        let e = check_defaults(&obj(json!({"act_fn": "gelu"})), &[("act_fn", json!("silu"))], "sdkd").unwrap_err();
        assert!(e.to_string().contains("act_fn") && e.to_string().contains("gelu"), "{e}");
        check_defaults(&obj(json!({"dropout": [0, 0.0]})), &[("dropout", json!(0.0))], "sdkd").unwrap();
        assert!(check_size("hidden_size", 1 << 40, 1, MAX_WIDTH).unwrap_err().to_string().contains("hidden_size"));
    }
}
