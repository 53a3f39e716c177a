//! transformers' `CLIPTextModel`, the Stable Diffusion text encoder: token + position
//! embeddings, pre-norm causal self-attention layers, a final layer norm. Parameter names are
//! the published ones (`text_model.embeddings.token_embedding.weight`, ...); transformers 5
//! writes them without the `text_model.` prefix, and both load.
use super::layers::{count_params, Builder, Embedding, Init, LayerNorm, Linear};
use super::weights;
use crate::json_config::{self, check_size, MAX_WIDTH};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// The MLP activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP, SD-1.x.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// exact (erf) GELU: OpenCLIP ViT-H, SD-2.x.
    #[serde(rename = "gelu")]
    Gelu,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
}

impl Activation {
    pub fn name(self) -> &'static str {
        match self {
            Activation::QuickGelu => "quick_gelu",
            Activation::Gelu => "gelu",
            Activation::GeluTanh => "gelu_pytorch_tanh",
        }
    }

    fn forward(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
        }
    }
}

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`), with its defaults for missing keys.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// Picks the pooled position: the first EOS, or (old configs that say 2) the largest id.
    pub eos_token_id: i64,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`: SDXL's second encoder).
    pub projection_dim: i64,
    /// `architectures` names `CLIPTextModelWithProjection`: the model has `text_projection`.
    #[serde(skip)]
    pub with_projection: bool,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
            projection_dim: 512,
            with_projection: false,
        }
    }
}

impl ClipTextConfig {
    /// openai/clip-vit-large-patch14's text tower: SD-1.x's text encoder and SDXL's first.
    pub fn clip_vit_l() -> Self {
        ClipTextConfig { hidden_size: 768, intermediate_size: 3072, num_attention_heads: 12, ..Default::default() }
    }

    /// OpenCLIP ViT-bigG/14's text tower with its projection: SDXL's `text_encoder_2`.
    pub fn open_clip_big_g() -> Self {
        ClipTextConfig {
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            hidden_act: Activation::Gelu,
            projection_dim: 1280,
            with_projection: true,
            ..Default::default()
        }
    }

    /// Reads `config.json`, or `<dir>/config.json` when given a folder.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = json_config::config_file(path, "config.json");
        let obj = json_config::read_object(&file, "text encoder config", str::to_string)?;
        Self::from_object(&obj).with_context(|| format!("text encoder config {}", file.display()))
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        Self::from_object(json_config::object(value)?)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Self> {
        let mut with_projection = false;
        if let Some(arch) = obj.get("architectures").and_then(Value::as_array) {
            with_projection = arch.iter().any(|a| a.as_str() == Some("CLIPTextModelWithProjection"));
            if !with_projection && !arch.iter().any(|a| a.as_str() == Some("CLIPTextModel")) {
                bail!(
                    "key \"architectures\": {} is not supported (CLIPTextModel or CLIPTextModelWithProjection)",
                    Value::Array(arch.clone())
                );
            }
        }
        if let Some(t) = obj.get("model_type").and_then(Value::as_str) {
            if t != "clip_text_model" {
                bail!("key \"model_type\": {t:?} is not supported (only clip_text_model)");
            }
        }
        let mut c: ClipTextConfig = json_config::typed(obj)?;
        c.with_projection = with_projection;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 20),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, 256),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 16),
            ("projection_dim", self.projection_dim, MAX_WIDTH),
        ] {
            check_size(key, v, 1, max)?;
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!("key \"num_attention_heads\": hidden_size {} is not divisible into {} heads", self.hidden_size, self.num_attention_heads);
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        let mut m = serde_json::to_value(self).expect("a ClipTextConfig serializes to JSON");
        m["architectures"] = json!([if self.with_projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }]);
        m["model_type"] = json!("clip_text_model");
        m
    }
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl ClipAttention {
    fn new(b: Builder, dim: i64, heads: i64) -> Self {
        ClipAttention {
            q_proj: Linear::new(b.pp("q_proj"), dim, dim, true),
            k_proj: Linear::new(b.pp("k_proj"), dim, dim, true),
            v_proj: Linear::new(b.pp("v_proj"), dim, dim, true),
            out_proj: Linear::new(b.pp("out_proj"), dim, dim, true),
            heads,
        }
    }

    /// Causal self-attention: token i sees tokens 0..=i. `x`: (b, n, dim).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, dim) = x.size3().expect("CLIP attention input must be (batch, tokens, channels)");
        let split = |t: Tensor| t.view([b, n, self.heads, dim / self.heads]).transpose(1, 2); // (b, heads, n, d)
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false)
            .transpose(1, 2)
            .reshape([b, n, dim]);
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(b: Builder, c: &ClipTextConfig) -> Self {
        ClipEncoderLayer {
            layer_norm1: LayerNorm::new(b.pp("layer_norm1"), c.hidden_size, c.layer_norm_eps),
            self_attn: ClipAttention::new(b.pp("self_attn"), c.hidden_size, c.num_attention_heads),
            layer_norm2: LayerNorm::new(b.pp("layer_norm2"), c.hidden_size, c.layer_norm_eps),
            fc1: Linear::new(b.pp("mlp").pp("fc1"), c.hidden_size, c.intermediate_size, true),
            fc2: Linear::new(b.pp("mlp").pp("fc2"), c.intermediate_size, c.hidden_size, true),
            act: c.hidden_act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let h = self.fc2.forward(&self.act.forward(&self.fc1.forward(&self.layer_norm2.forward(&x))));
        x + h
    }
}

/// What the text encoder computes.
pub struct ClipTextOutput {
    /// (b, n, hidden): the last layer's output after `final_layer_norm` (SD's prompt embedding).
    pub last_hidden_state: Tensor,
    /// (b, hidden): `last_hidden_state` at the EOS position.
    pub pooled: Tensor,
    /// transformers' `hidden_states`: the embeddings, then each layer's output (before the
    /// final layer norm); `num_hidden_layers + 1` tensors of (b, n, hidden).
    pub hidden_states: Vec<Tensor>,
    /// (b, projection_dim): `pooled` through `text_projection`, for `CLIPTextModelWithProjection`.
    pub text_embeds: Option<Tensor>,
}

#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
}

impl ClipTextModel {
    /// `b` is the model root; parameters go under `text_model.`.
    pub fn new(b: Builder, config: &ClipTextConfig) -> Self {
        let c = config;
        let t = b.pp("text_model");
        let emb = t.pp("embeddings");
        ClipTextModel {
            config: c.clone(),
            token_embedding: Embedding::new(emb.pp("token_embedding"), c.vocab_size, c.hidden_size),
            position_embedding: Embedding::new(emb.pp("position_embedding"), c.max_position_embeddings, c.hidden_size),
            layers: (0..c.num_hidden_layers).map(|i| ClipEncoderLayer::new(t.pp("encoder").pp("layers").pp(i), c)).collect(),
            final_layer_norm: LayerNorm::new(t.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps),
            // beside text_model, as transformers' CLIPTextModelWithProjection names it
            text_projection: c.with_projection.then(|| Linear::new(b.pp("text_projection"), c.hidden_size, c.projection_dim, false)),
        }
    }

    /// `input_ids`: (b, n) integer ids, n <= max_position_embeddings.
    pub fn forward(&self, input_ids: &Tensor) -> ClipTextOutput {
        let (b, n) = input_ids.size2().expect("input_ids must be (batch, tokens)");
        assert!(
            n <= self.config.max_position_embeddings,
            "{n} tokens exceed max_position_embeddings {}",
            self.config.max_position_embeddings
        );
        let ids = input_ids.to_kind(Kind::Int64).to_device(self.token_embedding.weight.device());
        let positions = Tensor::arange(n, (Kind::Int64, ids.device())).unsqueeze(0);
        let mut h = self.token_embedding.forward(&ids) + self.position_embedding.forward(&positions); // (b, n, hidden)
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            hidden_states.push(h.shallow_clone());
            h = layer.forward(&h);
        }
        hidden_states.push(h.shallow_clone());
        let last_hidden_state = self.final_layer_norm.forward(&h);
        let eos_pos = if self.config.eos_token_id == 2 {
            // configs from before transformers PR #24773: EOS is the largest id
            ids.argmax(-1, false)
        } else {
            ids.eq(self.config.eos_token_id).to_kind(Kind::Int).argmax(-1, false)
        };
        let rows = Tensor::arange(b, (Kind::Int64, ids.device()));
        let pooled = last_hidden_state.index(&[Some(rows), Some(eos_pos)]); // (b, hidden)
        debug_assert_eq!(pooled.size(), vec![b, self.config.hidden_size]);
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled));
        ClipTextOutput { last_hidden_state, pooled, hidden_states, text_embeds }
    }

    /// The prompt embedding diffusers feeds the UNet. `clip_skip` 0 is the last layer; k skips
    /// the last k layers and applies the final layer norm to what remains (diffusers'
    /// `clip_skip`, where 1 means "the penultimate layer").
    pub fn prompt_embeds(&self, input_ids: &Tensor, clip_skip: usize) -> Tensor {
        let out = self.forward(input_ids);
        if clip_skip == 0 {
            return out.last_hidden_state;
        }
        assert!(
            clip_skip < out.hidden_states.len(),
            "clip_skip {clip_skip} exceeds the {} layers of the text encoder",
            self.layers.len()
        );
        self.final_layer_norm.forward(&out.hidden_states[out.hidden_states.len() - 1 - clip_skip])
    }

    /// What SDXL's pipeline takes from this encoder: the hidden state `clip_skip + 2` from the end
    /// (the penultimate layer's output for 0, no final layer norm), and `text_embeds` when the
    /// model has a projection.
    pub fn penultimate_and_pooled(&self, input_ids: &Tensor, clip_skip: usize) -> (Tensor, Option<Tensor>) {
        let mut out = self.forward(input_ids);
        let n = out.hidden_states.len();
        assert!(clip_skip + 2 <= n, "clip_skip {clip_skip} exceeds the {} layers of the text encoder", n - 1);
        (out.hidden_states.swap_remove(n - 2 - clip_skip), out.text_embeds)
    }
}

/// A text encoder with the var store that owns its parameters.
pub struct ClipTextEncoder {
    pub vs: nn::VarStore,
    pub model: ClipTextModel,
}

impl ClipTextEncoder {
    pub fn build(config: &ClipTextConfig, device: Device, kind: Kind, init: Init) -> Self {
        let vs = nn::VarStore::new(device);
        let model = ClipTextModel::new(Builder::new(&vs, kind, init), config);
        ClipTextEncoder { vs, model }
    }

    /// Loads a transformers `CLIPTextModel` folder (config.json + model.safetensors), keeping
    /// `kind`. Accepts names with or without the `text_model.` prefix and ignores the
    /// `position_ids` buffer older checkpoints carry.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_config(dir, &ClipTextConfig::from_path(dir)?, device, kind)
    }

    fn load_config(dir: &Path, config: &ClipTextConfig, device: Device, kind: Kind) -> Result<Self> {
        let enc = Self::build(config, device, kind, Init::Empty);
        let files = weights::weight_files(dir, "model")?;
        let map = |name: &str| -> Option<String> {
            let keep = name.starts_with("text_model.") || name.starts_with("text_projection.");
            let full = if keep { name.to_string() } else { format!("text_model.{name}") };
            (full != "text_model.embeddings.position_ids").then_some(full)
        };
        weights::load_strict_mapped(&enc.vs.variables(), &files, &map)
            .with_context(|| format!("loading text encoder {}", dir.display()))?;
        Ok(enc)
    }

    /// `load` for a `CLIPTextModelWithProjection` folder (SDXL's `text_encoder_2`), also when its
    /// config.json names no architecture.
    pub fn load_with_projection(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let mut config = ClipTextConfig::from_path(dir)?;
        config.with_projection = true;
        Self::load_config(dir, &config, device, kind)
    }

    pub fn num_params(&self) -> i64 {
        count_params(self.vs.variables().values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_text_encoder_counts() {
        // openai/clip-vit-large-patch14's text tower: 123,060,480 parameters.
        let c = ClipTextConfig::clip_vit_l();
        assert_eq!(ClipTextEncoder::build(&c, Device::Cpu, Kind::Float, Init::Empty).num_params(), 123_060_480);
        // SDXL's text_encoder_2 (OpenCLIP ViT-bigG/14 with its projection): 694,659,840.
        let c = ClipTextConfig::open_clip_big_g();
        assert_eq!(ClipTextEncoder::build(&c, Device::Cpu, Kind::Half, Init::Empty).num_params(), 694_659_840);
    }

    #[test]
    fn bad_config_names_the_key() {
        let e = ClipTextConfig::from_json(&json!({"hidden_act": "relu"})).unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
        let e = ClipTextConfig::from_json(&json!({"hidden_size": 30, "num_attention_heads": 4})).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads"), "{e}");
    }

    #[test]
    fn clip_skip_and_causality() {
        let c = ClipTextConfig { vocab_size: 50, hidden_size: 16, intermediate_size: 24, num_hidden_layers: 3, num_attention_heads: 2, max_position_embeddings: 10, eos_token_id: 49, ..Default::default() };
        let enc = ClipTextEncoder::build(&c, Device::Cpu, Kind::Float, Init::Torch);
        let ids = Tensor::from_slice(&[1i64, 5, 7, 49, 49, 3, 4, 49, 0, 0]).view([2, 5]);
        let out = enc.model.forward(&ids);
        assert_eq!(out.hidden_states.len(), 4);
        assert_eq!(out.pooled.size(), vec![2, 16]);
        let e0 = enc.model.prompt_embeds(&ids, 0);
        assert!(e0.allclose(&out.last_hidden_state, 0.0, 0.0, false));
        let e1 = enc.model.prompt_embeds(&ids, 1);
        assert!(!e1.allclose(&e0, 1e-3, 1e-3, false));
        // pooled = the first EOS position of each row: 3 and 2
        assert!(out.pooled.get(0).allclose(&out.last_hidden_state.get(0).get(3), 0.0, 0.0, false));
        assert!(out.pooled.get(1).allclose(&out.last_hidden_state.get(1).get(2), 0.0, 0.0, false));
        // changing a later token leaves earlier positions alone
        let ids2 = Tensor::from_slice(&[1i64, 5, 7, 49, 8, 3, 4, 49, 0, 0]).view([2, 5]);
        let out2 = enc.model.forward(&ids2);
        let a = out.last_hidden_state.narrow(1, 0, 4);
        let b = out2.last_hidden_state.narrow(1, 0, 4);
        assert!(a.allclose(&b, 1e-6, 1e-6, false));
    }
}
