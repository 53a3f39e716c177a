//! The diffusers/PEFT layout: `<component>.<module>.lora_A.weight` / `.lora_B.weight`, as
//! diffusers' `save_lora_weights` writes them, with PEFT's `LoraConfig` of each component as
//! JSON in the `lora_adapter_metadata` header entry (keys prefixed `unet.`, `text_encoder.`, ...),
//! where `lora_alpha` and `alpha_pattern` give alpha. Without that metadata diffusers' loader
//! takes alpha = r (scale 1) for every module, and so does this reader.
use super::{Adapter, Component, Entry, LoraSet};
use crate::models::weights::view_to_tensor;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// diffusers' `LORA_ADAPTER_METADATA_KEY`.
pub(super) const METADATA_KEY: &str = "lora_adapter_metadata";

/// The component a key belongs to and the key without its prefix; a key without one is the
/// UNet's (what diffusers' UNet-only loaders and ComfyUI accept).
fn split_component(key: &str) -> (Component, &str) {
    for c in [Component::TextEncoder2, Component::TextEncoder, Component::Unet] {
        if let Some(rest) = key.strip_prefix(c.name()).and_then(|r| r.strip_prefix('.')) {
            return (c, rest);
        }
    }
    (Component::Unet, key)
}

/// One component's alpha rule from its `LoraConfig`: `lora_alpha`, overridden per module by the
/// first `alpha_pattern` entry whose regex matches the end of the module's path (PEFT's
/// `get_pattern_key`: `(.*\.)?(<pattern>)$`).
struct AlphaRule {
    alpha: Option<f64>,
    patterns: Vec<(regex::Regex, f64)>,
    rslora: bool,
}

impl AlphaRule {
    fn from_metadata(config: &Map<String, Value>, component: Component) -> Result<AlphaRule> {
        let field = |name: &str| config.get(&format!("{}.{name}", component.name()));
        let flag = |name: &str| field(name).and_then(Value::as_bool).unwrap_or(false);
        if flag("use_dora") {
            bail!("{}: {}.use_dora is true: DoRA adapters are not supported", METADATA_KEY, component.name());
        }
        let number = |v: &Value, what: &str| v.as_f64().ok_or_else(|| anyhow!("{METADATA_KEY}: {}.{what} is {v}, not a number", component.name()));
        let alpha = field("lora_alpha").map(|v| number(v, "lora_alpha")).transpose()?;
        let mut patterns = vec![];
        if let Some(Value::Object(map)) = field("alpha_pattern") {
            for (pattern, v) in map {
                let re = regex::Regex::new(&format!(r"^(.*\.)?({pattern})$"))
                    .with_context(|| format!("{METADATA_KEY}: {}.alpha_pattern key {pattern:?}", component.name()))?;
                patterns.push((re, number(v, &format!("alpha_pattern[{pattern:?}]"))?));
            }
        }
        Ok(AlphaRule { alpha, patterns, rslora: flag("use_rslora") })
    }

    /// Alpha as sdkd keeps it (scale = alpha / r); rsLoRA's alpha/√r becomes alpha·√r / r.
    fn alpha(&self, module: &str, rank: i64) -> f64 {
        let Some(base) = self.alpha else { return rank as f64 };
        let alpha = self.patterns.iter().find(|(re, _)| re.is_match(module)).map_or(base, |(_, a)| *a);
        if self.rslora { alpha * (rank as f64).sqrt() } else { alpha }
    }
}

/// The `lora_adapter_metadata` JSON object (empty when the header has none).
fn metadata_object(metadata: &HashMap<String, String>) -> Result<Map<String, Value>> {
    match metadata.get(METADATA_KEY) {
        None => Ok(Map::new()),
        Some(text) => match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) | Err(_) => bail!("header entry {METADATA_KEY} is not a JSON object"),
        },
    }
}

/// The adapters of a diffusers-layout file, each with the key of its A matrix.
pub(super) fn parse(st: &SafeTensors<'_>, names: &[String], metadata: &HashMap<String, String>) -> Result<Vec<Entry>> {
    let config = metadata_object(metadata)?;
    let mut halves: BTreeMap<(Component, String), [Option<(String, Tensor)>; 2]> = BTreeMap::new();
    for key in names {
        let (component, rest) = split_component(key);
        let (module, half) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 0)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 1)
        } else {
            bail!("key {key}: only lora_A.weight and lora_B.weight are read (no LoRA biases, DoRA magnitudes or other adapter types)")
        };
        let tensor = view_to_tensor(&st.tensor(key)?).with_context(|| format!("key {key}"))?;
        halves.entry((component, module.to_string())).or_default()[half] = Some((key.clone(), tensor));
    }
    let mut rules = HashMap::new();
    let mut entries = vec![];
    for ((component, path), [a, b]) in halves {
        let ((key, down), (_, up)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some((k, _)), None) | (None, Some((k, _))) => bail!("key {k} has no partner (lora_A.weight and lora_B.weight come in pairs)"),
            (None, None) => unreachable!("a module is only recorded with one of its halves"),
        };
        if !rules.contains_key(&component) {
            rules.insert(component, AlphaRule::from_metadata(&config, component)?);
        }
        let rank = down.size().first().copied().unwrap_or(0);
        let alpha = rules[&component].alpha(&path, rank);
        entries.push(Entry { key, component, path, adapter: Adapter::new(down, up, alpha) });
    }
    Ok(entries)
}

/// The most common value (the smallest on a tie), as diffusers' `get_peft_kwargs` picks `r`.
fn most_common<T: Copy + PartialEq + PartialOrd>(values: &[T]) -> T {
    let mut best = (values[0], 0);
    for &v in values {
        let n = values.iter().filter(|&&w| w == v).count();
        if n > best.1 || (n == best.1 && v < best.0) {
            best = (v, n);
        }
    }
    best.0
}

/// An f64 as JSON, integral values as integers (what PEFT's configs hold for alpha = 8).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 { json!(v as i64) } else { json!(v) }
}

/// One component's `LoraConfig` fields for the metadata: `r` and `lora_alpha` the most common,
/// `rank_pattern` / `alpha_pattern` for the modules that differ, `target_modules` every module.
fn component_config(set: &LoraSet, component: Component) -> Map<String, Value> {
    let modules: Vec<(&str, i64, f64)> = set.component(component).map(|(p, a)| (p, a.rank(), a.alpha)).collect();
    let ranks: Vec<i64> = modules.iter().map(|m| m.1).collect();
    let alphas: Vec<f64> = modules.iter().map(|m| m.2).collect();
    let (r, alpha) = (most_common(&ranks), most_common(&alphas));
    let rank_pattern: Map<String, Value> = modules.iter().filter(|m| m.1 != r).map(|m| (m.0.to_string(), json!(m.1))).collect();
    let alpha_pattern: Map<String, Value> = modules.iter().filter(|m| m.2 != alpha).map(|m| (m.0.to_string(), number(m.2))).collect();
    let fields = json!({
        "r": r,
        "lora_alpha": number(alpha),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": modules.iter().map(|m| m.0).collect::<Vec<_>>(),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": false,
        "use_rslora": false,
        "init_lora_weights": true,
    });
    let Value::Object(map) = fields else { unreachable!("json! of an object literal") };
    map.into_iter().map(|(k, v)| (format!("{}.{k}", component.name()), v)).collect()
}

/// The tensors and header metadata of `set` in the diffusers layout.
pub(super) fn tensors(set: &LoraSet) -> Result<(Vec<(String, Tensor)>, BTreeMap<String, String>)> {
    let mut tensors = vec![];
    let mut config = Map::new();
    for component in Component::ALL {
        if set.component(component).next().is_none() {
            continue;
        }
        for (path, a) in set.component(component) {
            tensors.push((format!("{}.{path}.lora_A.weight", component.name()), a.down.shallow_clone()));
            tensors.push((format!("{}.{path}.lora_B.weight", component.name()), a.up.shallow_clone()));
        }
        config.extend(component_config(set, component));
    }
    let json = serde_json::to_string_pretty(&Value::Object(config))?;
    Ok((tensors, [(METADATA_KEY.to_string(), json)].into()))
}
