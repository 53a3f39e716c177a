//! diffusers' `UNet2DConditionModel` config.json, parsed once into typed structs with the
//! constructor's defaults for missing keys. Keys that would change the model in ways sdkd does not
//! implement are errors naming the key and value, never a silently different model.
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockKind {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockKind {
    CrossAttn,
    Plain,
}

impl DownBlockKind {
    pub fn diffusers_name(self) -> &'static str {
        match self {
            DownBlockKind::CrossAttn => "CrossAttnDownBlock2D",
            DownBlockKind::Plain => "DownBlock2D",
        }
    }
}

impl UpBlockKind {
    pub fn diffusers_name(self) -> &'static str {
        match self {
            UpBlockKind::CrossAttn => "CrossAttnUpBlock2D",
            UpBlockKind::Plain => "UpBlock2D",
        }
    }
}

/// A typed `UNet2DConditionModel` config. Per-stage lists are expanded to one entry per stage.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub sample_size: Option<i64>,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockKind>,
    pub up_block_types: Vec<UpBlockKind>,
    /// `mid_block_type: null` drops the mid block (BK-SDM's small and tiny students).
    pub mid_block: bool,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: Vec<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    pub cross_attention_dim: i64,
    /// Heads per stage. diffusers spells this `attention_head_dim` for historical reasons.
    pub num_heads: Vec<i64>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// Which of the heads keys the file used, so that a saved config spells it the same way.
    heads_key: &'static str,
}

impl Default for UNetConfig {
    /// diffusers' constructor defaults.
    fn default() -> Self {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            sample_size: None,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                DownBlockKind::CrossAttn,
                DownBlockKind::CrossAttn,
                DownBlockKind::CrossAttn,
                DownBlockKind::Plain,
            ],
            up_block_types: vec![UpBlockKind::Plain, UpBlockKind::CrossAttn, UpBlockKind::CrossAttn, UpBlockKind::CrossAttn],
            mid_block: true,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1280,
            num_heads: vec![8; 4],
            use_linear_projection: false,
            upcast_attention: false,
            heads_key: "attention_head_dim",
        }
    }
}

/// Keys that are accepted only at their default value (the features behind them are not
/// implemented). `Value::Null` means "absent or null".
fn must_be_default() -> Vec<(&'static str, Value)> {
    vec![
        ("act_fn", json!("silu")),
        ("addition_embed_type", Value::Null),
        ("addition_embed_type_num_heads", json!(64)),
        ("addition_time_embed_dim", Value::Null),
        ("attention_type", json!("default")),
        ("class_embed_type", Value::Null),
        ("class_embeddings_concat", json!(false)),
        ("conv_in_kernel", json!(3)),
        ("conv_out_kernel", json!(3)),
        ("cross_attention_norm", Value::Null),
        ("dropout", json!(0.0)),
        ("dual_cross_attention", json!(false)),
        ("encoder_hid_dim", Value::Null),
        ("encoder_hid_dim_type", Value::Null),
        ("mid_block_only_cross_attention", Value::Null),
        ("num_class_embeds", Value::Null),
        ("only_cross_attention", json!(false)),
        ("projection_class_embeddings_input_dim", Value::Null),
        ("resnet_out_scale_factor", json!(1.0)),
        ("resnet_skip_time_act", json!(false)),
        ("resnet_time_scale_shift", json!("default")),
        ("reverse_transformer_layers_per_block", Value::Null),
        ("time_cond_proj_dim", Value::Null),
        ("time_embedding_act_fn", Value::Null),
        ("time_embedding_dim", Value::Null),
        ("time_embedding_type", json!("positional")),
        ("timestep_post_act", Value::Null),
        ("transformer_layers_per_block", json!(1)),
    ]
}

fn is_default(value: &Value, default: &Value) -> bool {
    match (value, default) {
        (Value::Null, _) if default.is_null() => true,
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        // a per-stage list of the default value is the default too
        (Value::Array(items), d) if !d.is_null() => items.iter().all(|v| is_default(v, d)),
        (a, b) => a == b,
    }
}

fn int(key: &str, v: &Value) -> Result<i64> {
    v.as_i64().ok_or_else(|| anyhow!("key {key:?}: expected an integer, got {v}"))
}

fn float(key: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| anyhow!("key {key:?}: expected a number, got {v}"))
}

fn boolean(key: &str, v: &Value) -> Result<bool> {
    v.as_bool().ok_or_else(|| anyhow!("key {key:?}: expected true or false, got {v}"))
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>> {
    let items = v.as_array().ok_or_else(|| anyhow!("key {key:?}: expected a list of block names, got {v}"))?;
    items
        .iter()
        .map(|s| s.as_str().map(str::to_string).ok_or_else(|| anyhow!("key {key:?}: expected strings, got {s}")))
        .collect()
}

/// An int or a per-stage list, expanded to `n` entries.
fn per_stage(key: &str, v: &Value, n: usize) -> Result<Vec<i64>> {
    match v {
        Value::Array(items) => {
            if items.len() != n {
                bail!("key {key:?}: has {} entries but the model has {n} stages", items.len());
            }
            items.iter().map(|x| int(key, x)).collect()
        }
        other => Ok(vec![int(key, other)?; n]),
    }
}

impl UNetConfig {
    /// Reads `config.json`, or `<dir>/config.json` when given a folder.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading UNet config {}", file.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("UNet config {} is not valid JSON", file.display()))?;
        Self::from_json(&value).with_context(|| format!("UNet config {}", file.display()))
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = value.as_object().ok_or_else(|| anyhow!("expected a JSON object"))?;
        if let Some(class) = obj.get("_class_name").and_then(Value::as_str) {
            if class != "UNet2DConditionModel" {
                bail!("key \"_class_name\": {class:?} is not supported (only UNet2DConditionModel)");
            }
        }
        for (key, default) in must_be_default() {
            if let Some(v) = obj.get(key) {
                if !is_default(v, &default) {
                    bail!("key {key:?}: value {v} is not supported by sdkd (only {default})");
                }
            }
        }
        let mut c = UNetConfig::default();
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        if let Some(v) = get("down_block_types") {
            c.down_block_types = strings("down_block_types", v)?
                .iter()
                .map(|s| match s.as_str() {
                    "CrossAttnDownBlock2D" => Ok(DownBlockKind::CrossAttn),
                    "DownBlock2D" => Ok(DownBlockKind::Plain),
                    other => Err(anyhow!("key \"down_block_types\": block type {other:?} is not supported (CrossAttnDownBlock2D, DownBlock2D)")),
                })
                .collect::<Result<_>>()?;
        }
        if let Some(v) = get("up_block_types") {
            c.up_block_types = strings("up_block_types", v)?
                .iter()
                .map(|s| match s.as_str() {
                    "CrossAttnUpBlock2D" => Ok(UpBlockKind::CrossAttn),
                    "UpBlock2D" => Ok(UpBlockKind::Plain),
                    other => Err(anyhow!("key \"up_block_types\": block type {other:?} is not supported (CrossAttnUpBlock2D, UpBlock2D)")),
                })
                .collect::<Result<_>>()?;
        }
        // Present-and-null means "no mid block"; absent means the default cross-attention one.
        match obj.get("mid_block_type") {
            None => {}
            Some(Value::Null) => c.mid_block = false,
            Some(Value::String(s)) if s == "UNetMidBlock2DCrossAttn" => c.mid_block = true,
            Some(other) => bail!("key \"mid_block_type\": {other} is not supported (UNetMidBlock2DCrossAttn or null)"),
        }
        if let Some(v) = get("block_out_channels") {
            let items = v.as_array().ok_or_else(|| anyhow!("key \"block_out_channels\": expected a list"))?;
            c.block_out_channels = items.iter().map(|x| int("block_out_channels", x)).collect::<Result<_>>()?;
        }
        let n = c.block_out_channels.len();
        if let Some(v) = get("layers_per_block") {
            c.layers_per_block = per_stage("layers_per_block", v, n)?;
        } else {
            c.layers_per_block = vec![2; n];
        }
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        if let Some(v) = get("num_attention_heads") {
            c.num_heads = per_stage("num_attention_heads", v, n)?;
            c.heads_key = "num_attention_heads";
        } else if let Some(v) = get("attention_head_dim") {
            c.num_heads = per_stage("attention_head_dim", v, n)?;
        } else {
            c.num_heads = vec![8; n];
        }
        if let Some(v) = get("cross_attention_dim") {
            if v.is_array() {
                bail!("key \"cross_attention_dim\": a per-stage list ({v}) is not supported");
            }
            c.cross_attention_dim = int("cross_attention_dim", v)?;
        }
        macro_rules! read {
            ($field:ident, $conv:ident) => {
                if let Some(v) = get(stringify!($field)) {
                    c.$field = $conv(stringify!($field), v)?;
                }
            };
        }
        read!(in_channels, int);
        read!(out_channels, int);
        read!(center_input_sample, boolean);
        read!(flip_sin_to_cos, boolean);
        read!(freq_shift, float);
        read!(downsample_padding, int);
        read!(mid_block_scale_factor, float);
        read!(norm_num_groups, int);
        read!(norm_eps, float);
        read!(use_linear_projection, boolean);
        read!(upcast_attention, boolean);
        if let Some(v) = get("sample_size") {
            c.sample_size = Some(int("sample_size", v)?);
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks that the stages fit together (lengths, divisibility), naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("key \"block_out_channels\": must list at least one stage");
        }
        if self.down_block_types.len() != n {
            bail!("key \"down_block_types\": {} blocks but block_out_channels has {n}", self.down_block_types.len());
        }
        if self.up_block_types.len() != n {
            bail!("key \"up_block_types\": {} blocks but block_out_channels has {n}", self.up_block_types.len());
        }
        for (i, (&ch, &heads)) in self.block_out_channels.iter().zip(&self.num_heads).enumerate() {
            if ch <= 0 || ch % self.norm_num_groups != 0 {
                bail!("key \"block_out_channels\": stage {i} has {ch} channels, not a positive multiple of norm_num_groups {}", self.norm_num_groups);
            }
            if heads <= 0 || ch % heads != 0 {
                bail!("key {:?}: stage {i} has {ch} channels, not divisible into {heads} heads", self.heads_key);
            }
        }
        if let Some(i) = self.layers_per_block.iter().position(|&l| l < 1) {
            bail!("key \"layers_per_block\": stage {i} has {} layers (at least 1)", self.layers_per_block[i]);
        }
        if self.block_out_channels[0] % 2 != 0 {
            bail!("key \"block_out_channels\": the first stage's width must be even (timestep embedding)");
        }
        Ok(())
    }

    pub fn num_stages(&self) -> usize {
        self.block_out_channels.len()
    }

    pub fn time_embed_dim(&self) -> i64 {
        self.block_out_channels[0] * 4
    }

    /// The config as diffusers writes it: every key, so that diffusers loads it unchanged.
    pub fn to_json(&self) -> Value {
        let heads: Value = if self.num_heads.iter().all(|&h| h == self.num_heads[0]) {
            json!(self.num_heads[0])
        } else {
            json!(self.num_heads)
        };
        let layers: Value = if self.layers_per_block.iter().all(|&l| l == self.layers_per_block[0]) {
            json!(self.layers_per_block[0])
        } else {
            json!(self.layers_per_block)
        };
        let mut m = Map::new();
        m.insert("_class_name".into(), json!("UNet2DConditionModel"));
        m.insert("_diffusers_version".into(), json!("0.42.1"));
        m.insert("act_fn".into(), json!("silu"));
        m.insert(self.heads_key.into(), heads);
        m.insert("block_out_channels".into(), json!(self.block_out_channels));
        m.insert("center_input_sample".into(), json!(self.center_input_sample));
        m.insert("cross_attention_dim".into(), json!(self.cross_attention_dim));
        m.insert(
            "down_block_types".into(),
            json!(self.down_block_types.iter().map(|k| k.diffusers_name()).collect::<Vec<_>>()),
        );
        m.insert("downsample_padding".into(), json!(self.downsample_padding));
        m.insert("flip_sin_to_cos".into(), json!(self.flip_sin_to_cos));
        m.insert("freq_shift".into(), json!(self.freq_shift));
        m.insert("in_channels".into(), json!(self.in_channels));
        m.insert("layers_per_block".into(), layers);
        m.insert("mid_block_scale_factor".into(), json!(self.mid_block_scale_factor));
        m.insert("mid_block_type".into(), if self.mid_block { json!("UNetMidBlock2DCrossAttn") } else { Value::Null });
        m.insert("norm_eps".into(), json!(self.norm_eps));
        m.insert("norm_num_groups".into(), json!(self.norm_num_groups));
        m.insert("out_channels".into(), json!(self.out_channels));
        m.insert("sample_size".into(), json!(self.sample_size));
        m.insert(
            "up_block_types".into(),
            json!(self.up_block_types.iter().map(|k| k.diffusers_name()).collect::<Vec<_>>()),
        );
        m.insert("upcast_attention".into(), json!(self.upcast_attention));
        m.insert("use_linear_projection".into(), json!(self.use_linear_projection));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15() -> Value {
        serde_json::from_str(include_str!("../../configs/reference/sd15_unet_config.json")).unwrap()
    }

    #[test]
    fn parses_sd15_with_defaults() {
        let c = UNetConfig::from_json(&sd15()).unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.num_heads, vec![8; 4]);
        assert_eq!(c.cross_attention_dim, 768);
        assert!(c.mid_block);
        assert_eq!(c.layers_per_block, vec![2; 4]);
    }

    #[test]
    fn null_mid_block_drops_it() {
        let mut v = sd15();
        v["mid_block_type"] = Value::Null;
        assert!(!UNetConfig::from_json(&v).unwrap().mid_block);
    }

    #[test]
    fn unsupported_values_name_the_key() {
        let mut v = sd15();
        v["addition_embed_type"] = json!("text_time");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("addition_embed_type") && e.contains("text_time"), "{e}");
        let mut v = sd15();
        v["down_block_types"][0] = json!("AttnDownBlock2D");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("AttnDownBlock2D"), "{e}");
        let mut v = sd15();
        v["transformer_layers_per_block"] = json!(2);
        assert!(UNetConfig::from_json(&v).unwrap_err().to_string().contains("transformer_layers_per_block"));
    }

    #[test]
    fn json_round_trip() {
        let c = UNetConfig::from_json(&sd15()).unwrap();
        assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
    }
}
