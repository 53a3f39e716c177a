//! diffusers' `UNet2DConditionModel` config.json, parsed once into typed structs with the
//! constructor's defaults for missing keys. Keys that would change the model in ways sdkd does not
//! implement are errors naming the key and value, never a silently different model.
use crate::json_config::{self, check_size, MAX_WIDTH};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum DownBlockKind {
    #[serde(rename = "CrossAttnDownBlock2D")]
    CrossAttn,
    #[serde(rename = "DownBlock2D")]
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum UpBlockKind {
    #[serde(rename = "CrossAttnUpBlock2D")]
    CrossAttn,
    #[serde(rename = "UpBlock2D")]
    Plain,
}

/// `mid_block_type`: SD's cross-attention mid block, or one resnet (SSD-1B, Segmind-Vega).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidBlockKind {
    /// `UNetMidBlock2DCrossAttn`: resnet, spatial transformer, resnet.
    CrossAttn,
    /// `UNetMidBlock2D` as diffusers builds it for this key: one resnet, no attention.
    Plain,
}

impl MidBlockKind {
    pub fn diffusers_name(self) -> &'static str {
        match self {
            MidBlockKind::CrossAttn => "UNetMidBlock2DCrossAttn",
            MidBlockKind::Plain => "UNetMidBlock2D",
        }
    }
}

/// One stage's `transformer_layers_per_block` entry: one depth for every spatial transformer of
/// the stage, or one per transformer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Depth {
    Uniform(i64),
    PerLayer(Vec<i64>),
}

impl Depth {
    /// The depth of the stage's `layer`-th transformer.
    pub fn at(&self, layer: usize) -> i64 {
        match self {
            Depth::Uniform(d) => *d,
            Depth::PerLayer(v) => v.get(layer).copied().unwrap_or(0),
        }
    }

    /// The depths of the transformers `keep` (a pruned stage keeps these layers).
    pub fn select(&self, keep: &[usize]) -> Depth {
        match self {
            Depth::Uniform(d) => Depth::Uniform(*d),
            Depth::PerLayer(v) => Depth::PerLayer(keep.iter().map(|&i| v.get(i).copied().unwrap_or(0)).collect()),
        }
    }
}

/// `addition_embed_type: "text_time"` (SDXL's micro-conditioning): the pooled text embedding
/// and the sinusoidal features of the time ids, through `add_embedding`, added to the time
/// embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeEmbed {
    /// `addition_time_embed_dim`: sinusoidal features per time id (`add_time_proj`).
    pub time_embed_dim: i64,
    /// `projection_class_embeddings_input_dim`: pooled width + time ids × time_embed_dim.
    pub input_dim: i64,
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub sample_size: Option<i64>,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockKind>,
    pub up_block_types: Vec<UpBlockKind>,
    /// `mid_block_type`; `null` drops the mid block (BK-SDM's small and tiny students, KOALA-700M).
    #[serde(skip)]
    pub mid_block: Option<MidBlockKind>,
    pub block_out_channels: Vec<i64>,
    #[serde(skip)]
    pub layers_per_block: Vec<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    /// An int: a per-stage list is refused by serde, naming the key.
    pub cross_attention_dim: i64,
    /// Heads per stage. diffusers spells this `attention_head_dim` for historical reasons.
    #[serde(skip)]
    pub num_heads: Vec<i64>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// Transformer blocks per spatial transformer, per down stage (empty: 1 everywhere). The mid
    /// block takes the last stage's first depth, as diffusers does.
    #[serde(skip_deserializing, skip_serializing_if = "Vec::is_empty")]
    pub transformer_layers_per_block: Vec<Depth>,
    /// Per up block; `None`: the down stages' depths reversed (diffusers requires it when a down
    /// stage lists per-layer depths, as SSD-1B's asymmetric decoder does).
    pub reverse_transformer_layers_per_block: Option<Vec<Depth>>,
    /// `addition_embed_type: "text_time"` with its two sizes.
    #[serde(skip)]
    pub addition_embed: Option<TextTimeEmbed>,
    /// Width of `time_embedding.cond_proj` (LCM's guidance embedding), when present.
    pub time_cond_proj_dim: Option<i64>,
    /// Which of the heads keys the file used, so that a saved config spells it the same way.
    #[serde(skip)]
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
            mid_block: Some(MidBlockKind::CrossAttn),
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
            transformer_layers_per_block: vec![],
            reverse_transformer_layers_per_block: None,
            addition_embed: None,
            time_cond_proj_dim: None,
            heads_key: "attention_head_dim",
        }
    }
}

/// Keys that are accepted only at their default value (the features behind them are not
/// implemented). `Value::Null` means "absent or null".
fn must_be_default() -> Vec<(&'static str, Value)> {
    vec![
        ("act_fn", json!("silu")),
        ("addition_embed_type_num_heads", json!(64)),
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
        ("resnet_out_scale_factor", json!(1.0)),
        ("resnet_skip_time_act", json!(false)),
        ("resnet_time_scale_shift", json!("default")),
        ("time_embedding_act_fn", Value::Null),
        ("time_embedding_dim", Value::Null),
        ("time_embedding_type", json!("positional")),
        ("timestep_post_act", Value::Null),
    ]
}

/// The time ids of `text_time` conditioning: original size (h, w), crop top-left (y, x), target
/// size (h, w).
pub const TIME_IDS: i64 = 6;

/// An int for every stage, or a list with one per stage.
#[derive(Deserialize)]
#[serde(untagged)]
enum PerStage {
    One(i64),
    Each(Vec<i64>),
}

/// `transformer_layers_per_block`: one depth for all, or one entry per stage.
#[derive(Deserialize)]
#[serde(untagged)]
enum Depths {
    One(i64),
    Each(Vec<Depth>),
}

/// `key` of `obj` expanded to `n` stages (`None` when absent or null).
fn per_stage(obj: &Map<String, Value>, key: &str, n: usize) -> Result<Option<Vec<i64>>> {
    match json_config::field::<PerStage>(obj, key)? {
        None => Ok(None),
        Some(PerStage::One(v)) => Ok(Some(vec![v; n])),
        Some(PerStage::Each(items)) if items.len() == n => Ok(Some(items)),
        Some(PerStage::Each(items)) => bail!("key {key:?}: has {} entries but the model has {n} stages", items.len()),
    }
}

impl UNetConfig {
    /// Reads `config.json`, or `<dir>/config.json` when given a folder.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = json_config::config_file(path, "config.json");
        let obj = json_config::read_object(&file, "UNet config", str::to_string)?;
        Self::from_object(&obj).with_context(|| format!("UNet config {}", file.display()))
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        Self::from_object(json_config::object(value)?)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Self> {
        if let Some(class) = obj.get("_class_name").and_then(Value::as_str) {
            if class != "UNet2DConditionModel" {
                bail!("key \"_class_name\": {class:?} is not supported (only UNet2DConditionModel)");
            }
        }
        json_config::check_defaults(obj, &must_be_default(), "sdkd")?;
        let mut c: UNetConfig = json_config::typed(obj)?;
        // Present-and-null means "no mid block"; absent means the default cross-attention one.
        c.mid_block = match obj.get("mid_block_type") {
            None => Some(MidBlockKind::CrossAttn),
            Some(Value::Null) => None,
            Some(Value::String(s)) if s == "UNetMidBlock2DCrossAttn" => Some(MidBlockKind::CrossAttn),
            Some(Value::String(s)) if s == "UNetMidBlock2D" => Some(MidBlockKind::Plain),
            Some(other) => bail!("key \"mid_block_type\": {other} is not supported (UNetMidBlock2DCrossAttn, UNetMidBlock2D or null)"),
        };
        c.addition_embed = match obj.get("addition_embed_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "text_time" => {
                let size = |key: &str| -> Result<i64> {
                    json_config::field::<i64>(obj, key)?
                        .ok_or_else(|| anyhow!("key {key:?}: required with addition_embed_type \"text_time\""))
                };
                Some(TextTimeEmbed {
                    time_embed_dim: size("addition_time_embed_dim")?,
                    input_dim: size("projection_class_embeddings_input_dim")?,
                })
            }
            Some(other) => bail!("key \"addition_embed_type\": {other} is not supported by sdkd (only null or \"text_time\")"),
        };
        if c.addition_embed.is_none() {
            for key in ["addition_time_embed_dim", "projection_class_embeddings_input_dim"] {
                if obj.get(key).is_some_and(|v| !v.is_null()) {
                    bail!("key {key:?}: {} is set but addition_embed_type is not \"text_time\" (sdkd implements no class embedding)", obj[key]);
                }
            }
        }
        let n = c.block_out_channels.len();
        c.layers_per_block = per_stage(obj, "layers_per_block", n)?.unwrap_or(vec![2; n]);
        c.transformer_layers_per_block = match json_config::field::<Depths>(obj, "transformer_layers_per_block")? {
            None => vec![],
            Some(Depths::One(d)) => vec![Depth::Uniform(d); n],
            Some(Depths::Each(depths)) => depths,
        };
        // diffusers: num_attention_heads = num_attention_heads or attention_head_dim.
        c.num_heads = match per_stage(obj, "num_attention_heads", n)? {
            Some(heads) => {
                c.heads_key = "num_attention_heads";
                heads
            }
            None => per_stage(obj, "attention_head_dim", n)?.unwrap_or(vec![8; n]),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks that the stages fit together (lengths, divisibility), naming the key at fault.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("key \"block_out_channels\": must list at least one stage");
        }
        check_size("block_out_channels", n as i64, 1, 8)?;
        check_size("norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)?;
        for (key, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("cross_attention_dim", self.cross_attention_dim)] {
            check_size(key, v, 1, MAX_WIDTH)?;
        }
        if let Some(s) = self.sample_size {
            check_size("sample_size", s, 1, MAX_WIDTH)?;
        }
        if self.down_block_types.len() != n {
            bail!("key \"down_block_types\": {} blocks but block_out_channels has {n}", self.down_block_types.len());
        }
        if self.up_block_types.len() != n {
            bail!("key \"up_block_types\": {} blocks but block_out_channels has {n}", self.up_block_types.len());
        }
        for (i, (&ch, &heads)) in self.block_out_channels.iter().zip(&self.num_heads).enumerate() {
            check_size(&format!("block_out_channels[{i}]"), ch, 1, MAX_WIDTH)?;
            if ch % self.norm_num_groups != 0 {
                bail!("key \"block_out_channels\": stage {i} has {ch} channels, not a positive multiple of norm_num_groups {}", self.norm_num_groups);
            }
            if heads <= 0 || ch % heads != 0 {
                bail!("key {:?}: stage {i} has {ch} channels, not divisible into {heads} heads", self.heads_key);
            }
        }
        if let Some(i) = self.layers_per_block.iter().position(|&l| !(1..=64).contains(&l)) {
            bail!("key \"layers_per_block\": stage {i} has {} layers (1 to 64)", self.layers_per_block[i]);
        }
        if self.block_out_channels[0] % 2 != 0 {
            bail!("key \"block_out_channels\": the first stage's width must be even (timestep embedding)");
        }
        self.validate_depths()?;
        if let Some(e) = self.addition_embed {
            check_size("addition_time_embed_dim", e.time_embed_dim, 1, MAX_WIDTH)?;
            check_size("projection_class_embeddings_input_dim", e.input_dim, 1, MAX_WIDTH)?;
            if e.input_dim <= TIME_IDS * e.time_embed_dim {
                bail!(
                    "key \"projection_class_embeddings_input_dim\": {} leaves no room for the pooled text embedding beside {TIME_IDS} time ids of addition_time_embed_dim {}",
                    e.input_dim,
                    e.time_embed_dim
                );
            }
        }
        if let Some(d) = self.time_cond_proj_dim {
            check_size("time_cond_proj_dim", d, 1, MAX_WIDTH)?;
        }
        Ok(())
    }

    /// The per-stage and per-layer transformer depths against the stages' layer counts.
    fn validate_depths(&self) -> Result<()> {
        let n = self.num_stages();
        let check = |key: &str, depths: &[Depth], layers: &dyn Fn(usize) -> i64, attends: &dyn Fn(usize) -> bool| -> Result<()> {
            if depths.len() != n {
                bail!("key {key:?}: has {} entries but the model has {n} stages", depths.len());
            }
            for (i, d) in depths.iter().enumerate() {
                let values: Vec<i64> = match d {
                    Depth::Uniform(v) => vec![*v],
                    Depth::PerLayer(v) => {
                        if attends(i) && v.len() as i64 != layers(i) {
                            bail!("key {key:?}: block {i} lists {} depths for its {} transformers", v.len(), layers(i));
                        }
                        v.clone()
                    }
                };
                if let Some(v) = values.iter().find(|v| !(1..=64).contains(*v)) {
                    bail!("key {key:?}: block {i} has depth {v} (1 to 64)");
                }
            }
            Ok(())
        };
        if !self.transformer_layers_per_block.is_empty() {
            let down_attends = |i: usize| self.down_block_types[i] == DownBlockKind::CrossAttn;
            check("transformer_layers_per_block", &self.transformer_layers_per_block, &|i| self.layers_per_block[i], &down_attends)?;
        }
        match &self.reverse_transformer_layers_per_block {
            Some(rev) => {
                let up_attends = |i: usize| self.up_block_types[i] == UpBlockKind::CrossAttn;
                check("reverse_transformer_layers_per_block", rev, &|i| self.layers_per_block[n - 1 - i] + 1, &up_attends)?
            }
            None if self.transformer_layers_per_block.iter().any(|d| matches!(d, Depth::PerLayer(_))) => bail!(
                "key \"reverse_transformer_layers_per_block\": required when transformer_layers_per_block lists per-layer depths (an asymmetric UNet), as diffusers requires"
            ),
            None => {}
        }
        Ok(())
    }

    /// Transformer blocks in down stage `stage`'s `layer`-th spatial transformer.
    pub fn down_depth(&self, stage: usize, layer: usize) -> i64 {
        self.transformer_layers_per_block.get(stage).map_or(1, |d| d.at(layer))
    }

    /// Transformer blocks in up block `block`'s `layer`-th spatial transformer.
    pub fn up_depth(&self, block: usize, layer: usize) -> i64 {
        match &self.reverse_transformer_layers_per_block {
            Some(rev) => rev[block].at(layer),
            None => self.down_depth(self.num_stages() - 1 - block, 0),
        }
    }

    /// Transformer blocks in the mid block's spatial transformer (diffusers gives it
    /// `transformer_layers_per_block[-1]`).
    pub fn mid_depth(&self) -> i64 {
        self.down_depth(self.num_stages() - 1, 0)
    }

    /// Every `BasicTransformerBlock` of the model (SDXL-base: 70).
    pub fn transformer_block_count(&self) -> i64 {
        let n = self.num_stages();
        let down: i64 = (0..n)
            .filter(|&i| self.down_block_types[i] == DownBlockKind::CrossAttn)
            .map(|i| (0..self.layers_per_block[i] as usize).map(|l| self.down_depth(i, l)).sum::<i64>())
            .sum();
        let up: i64 = (0..n)
            .filter(|&i| self.up_block_types[i] == UpBlockKind::CrossAttn)
            .map(|i| (0..=self.layers_per_block[n - 1 - i] as usize).map(|l| self.up_depth(i, l)).sum::<i64>())
            .sum();
        let mid = if self.mid_block == Some(MidBlockKind::CrossAttn) { self.mid_depth() } else { 0 };
        down + mid + up
    }

    pub fn num_stages(&self) -> usize {
        self.block_out_channels.len()
    }

    pub fn time_embed_dim(&self) -> i64 {
        self.block_out_channels[0] * 4
    }

    /// The same block structure with every width divided by `k`: the stages' channels, the
    /// context, the pooled embedding and the time ids' features; the head counts kept (so each
    /// head is `k` times narrower) and the norm groups cut to what divides the new widths.
    /// `sdkd plan --probe-width-divisor` measures on it a UNet too wide to step on the machine:
    /// the activations of a step are sums of width × pixels terms, so they scale by `k`.
    pub fn narrowed(&self, k: i64) -> Result<UNetConfig> {
        ensure!(k >= 1, "a width divisor of {k}: must be at least 1");
        let div = |what: &str, v: i64| -> Result<i64> {
            ensure!(v % k == 0 && v / k >= 1, "{what} {v} is not divisible by {k}");
            Ok(v / k)
        };
        let mut c = self.clone();
        c.block_out_channels = self.block_out_channels.iter().map(|&w| div("a stage width (block_out_channels)", w)).collect::<Result<_>>()?;
        c.cross_attention_dim = div("cross_attention_dim", self.cross_attention_dim)?;
        if let Some(e) = &self.addition_embed {
            let pooled = e.input_dim - TIME_IDS * e.time_embed_dim;
            let time = div("addition_time_embed_dim", e.time_embed_dim)?;
            c.addition_embed = Some(TextTimeEmbed { time_embed_dim: time, input_dim: div("the pooled embedding width", pooled)? + TIME_IDS * time });
        }
        if let Some(d) = self.time_cond_proj_dim {
            c.time_cond_proj_dim = Some(div("time_cond_proj_dim", d)?);
        }
        let gcd = |mut a: i64, mut b: i64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        c.norm_num_groups = c.block_out_channels.iter().fold(self.norm_num_groups, |g, &w| gcd(g, w));
        c.validate().with_context(|| format!("the widths divided by {k}"))?;
        Ok(c)
    }

    /// The config as diffusers writes it: every key, so that diffusers loads it unchanged.
    pub fn to_json(&self) -> Value {
        let collapse = |v: &[i64]| if v.iter().all(|&x| x == v[0]) { json!(v[0]) } else { json!(v) };
        let mut m = serde_json::to_value(self).expect("a UNetConfig serializes to JSON");
        m["_class_name"] = json!("UNet2DConditionModel");
        m["_diffusers_version"] = json!("0.42.1");
        m["act_fn"] = json!("silu");
        m[self.heads_key] = collapse(&self.num_heads);
        m["layers_per_block"] = collapse(&self.layers_per_block);
        m["mid_block_type"] = self.mid_block.map_or(Value::Null, |k| json!(k.diffusers_name()));
        if let Some(e) = self.addition_embed {
            m["addition_embed_type"] = json!("text_time");
            m["addition_time_embed_dim"] = json!(e.time_embed_dim);
            m["projection_class_embeddings_input_dim"] = json!(e.input_dim);
        }
        m
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
        assert_eq!(c.mid_block, Some(MidBlockKind::CrossAttn));
        assert_eq!(c.layers_per_block, vec![2; 4]);
    }

    #[test]
    fn null_mid_block_drops_it() {
        let mut v = sd15();
        v["mid_block_type"] = Value::Null;
        assert_eq!(UNetConfig::from_json(&v).unwrap().mid_block, None);
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
        v["addition_embed_type"] = json!("text");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("addition_embed_type") && e.contains("\"text\""), "{e}");
        let mut v = sd15();
        v["addition_embed_type"] = json!("text_time");
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("addition_time_embed_dim") && e.contains("required"), "{e}");
        let mut v = sd15();
        v["transformer_layers_per_block"] = json!([1, [2, 2], 1, 1]);
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("reverse_transformer_layers_per_block"), "{e}");
        v["reverse_transformer_layers_per_block"] = json!([1, 1, [2, 2], 1]);
        let e = UNetConfig::from_json(&v).unwrap_err().to_string();
        assert!(e.contains("reverse_transformer_layers_per_block") && e.contains("block 2 lists 2 depths for its 3"), "{e}");
        let mut v = sd15();
        v["mid_block_type"] = json!("UNetMidBlock2DSimpleCrossAttn");
        assert!(UNetConfig::from_json(&v).unwrap_err().to_string().contains("mid_block_type"));
    }

    fn sdxl() -> Value {
        serde_json::from_str(include_str!("../../configs/reference/sdxl_unet_config.json")).unwrap()
    }

    #[test]
    fn sdxl_depths_and_micro_conditioning() {
        let c = UNetConfig::from_json(&sdxl()).unwrap();
        assert_eq!(c.num_heads, vec![5, 10, 20]);
        assert_eq!(c.addition_embed, Some(TextTimeEmbed { time_embed_dim: 256, input_dim: 2816 }));
        assert_eq!((c.down_depth(2, 1), c.mid_depth(), c.up_depth(0, 2), c.up_depth(1, 0)), (10, 10, 10, 2));
        assert_eq!(c.transformer_block_count(), 70);
        // SSD-1B's asymmetric decoder and single-resnet mid block
        let mut v = sdxl();
        v["transformer_layers_per_block"] = json!([1, [2, 2], [4, 4]]);
        v["reverse_transformer_layers_per_block"] = json!([[4, 4, 10], [2, 1, 1], 1]);
        v["mid_block_type"] = json!("UNetMidBlock2D");
        let c = UNetConfig::from_json(&v).unwrap();
        assert_eq!(c.mid_block, Some(MidBlockKind::Plain));
        assert_eq!(c.transformer_block_count(), 12 + 22);
        assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
    }

    /// `sdkd plan --probe-width-divisor`: the same blocks, depths and heads, every width / k.
    #[test]
    fn narrowed_keeps_the_blocks_and_divides_every_width() {
        let c = UNetConfig::from_json(&sdxl()).unwrap();
        let n = c.narrowed(32).unwrap();
        assert_eq!(n.block_out_channels, vec![10, 20, 40]);
        assert_eq!((n.cross_attention_dim, n.norm_num_groups, n.num_heads.clone()), (64, 2, vec![5, 10, 20]));
        assert_eq!(n.addition_embed, Some(TextTimeEmbed { time_embed_dim: 8, input_dim: 40 + 6 * 8 }));
        assert_eq!(n.transformer_block_count(), c.transformer_block_count());
        assert_eq!((n.down_depth(2, 1), n.mid_depth(), n.up_depth(0, 2)), (10, 10, 10));
        assert_eq!(UNetConfig::from_json(&n.to_json()).unwrap(), n);
        assert_eq!(c.narrowed(1).unwrap(), c);
        // 320 / 3 is no width, nor 320 / 128
        let e = format!("{:#}", c.narrowed(3).unwrap_err());
        assert!(e.contains("block_out_channels") && e.contains("not divisible by 3"), "{e}");
        assert!(c.narrowed(128).is_err());
    }

    #[test]
    fn json_round_trip() {
        let c = UNetConfig::from_json(&sd15()).unwrap();
        assert_eq!(UNetConfig::from_json(&c.to_json()).unwrap(), c);
    }
}
