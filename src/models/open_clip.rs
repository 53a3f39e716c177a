//! open_clip's `CLIP` with a ViT image tower (ViT-g-14 `laion2b_s34b_b88k`, the CLIP score of
//! BK-SDM's protocol, and the other ViT-*-14-like configs), read from open_clip's published
//! `open_clip_pytorch_model.bin` or `open_clip_model.safetensors` under its own names.
//!
//! Image tower (open_clip `VisionTransformer`): patch conv without bias, class token, learned
//! positions, `ln_pre`, pre-norm residual blocks (`nn.MultiheadAttention` with fused
//! `in_proj`, no mask; MLP `c_fc` -> GELU -> `c_proj`), `ln_post` on the class token, `@ proj`.
//! Text tower: the same function as sdkd's `ClipTextModel` (transformers' `CLIPTextModel`, the
//! SD-2 text encoder, which was converted from this very tower): the open_clip names are mapped
//! onto it with q/k/v split out of `in_proj`, its causal mask is open_clip's `attn_mask`, its
//! "largest id" pooling (`eos_token_id` 2) is open_clip's `argmax` pooling, then `@ text_projection`.
//!
//! The sizes come from the tensors' shapes. The head counts are not in the shapes: they come
//! from `open_clip_config.json` beside the weights (the hub repos publish it), else from the rule
//! every open_clip ViT config follows (image: width / 64 heads up to width 1024, 16 above, so
//! ViT-g-14's 1408 has 16; text: width / 64, so ViT-g-14's 1024 has 16).
use super::clip::{Activation, ClipTextConfig, ClipTextEncoder};
use super::layers::Init;
use super::weights;
use crate::torch_pickle;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Where users get the weights (sdkd downloads nothing).
pub const WEIGHTS_HELP: &str = "open_clip's ViT-g-14 laion2b_s34b_b88k weights: open_clip_pytorch_model.bin or \
open_clip_model.safetensors from the Hugging Face repo laion/CLIP-ViT-g-14-laion2B-s34B-b88K \
(https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s34B-b88K); pass the file with --clip";

/// The sidecar file with open_clip's `model_cfg` (hub layout).
pub const CONFIG_FILE: &str = "open_clip_config.json";

/// open_clip's LayerNorm eps (torch's default).
const LN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub patch_size: i64,
    pub image_size: i64,
    /// `int(width * mlp_ratio)`.
    pub mlp_width: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub context_length: i64,
    pub vocab_size: i64,
    pub mlp_width: i64,
}

/// What a checkpoint's shapes (and its `open_clip_config.json`, when present) say.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenClipConfig {
    pub embed_dim: i64,
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// GELU (ViT-g-14), or QuickGELU for `quick_gelu: true` configs (OpenAI's weights).
    pub act: Activation,
}

/// open_clip's image-tower head count for a width when no config says otherwise: width / 64 up
/// to 1024, 16 above (the rule all 48 ViT configs in open_clip 3.3's model_configs follow).
pub fn default_vision_heads(width: i64) -> i64 {
    if width <= 1024 {
        (width / 64).max(1)
    } else {
        16
    }
}

/// The text tower's: width / 64 (likewise for every open_clip config).
pub fn default_text_heads(width: i64) -> i64 {
    (width / 64).max(1)
}

/// One pre-norm residual block of open_clip's `Transformer` (no mask: the image tower).
struct Block {
    ln_1: (Tensor, Tensor),
    in_proj: (Tensor, Tensor),
    out_proj: (Tensor, Tensor),
    ln_2: (Tensor, Tensor),
    c_fc: (Tensor, Tensor),
    c_proj: (Tensor, Tensor),
}

fn layer_norm(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Tensor {
    x.layer_norm([w.size()[0]], Some(w), Some(b), LN_EPS, true)
}

fn linear(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Tensor {
    x.linear(w, Some(b))
}

impl Block {
    fn forward(&self, x: &Tensor, heads: i64, act: Activation) -> Tensor {
        let (b, n, dim) = x.size3().expect("(batch, tokens, width)");
        let qkv = linear(&layer_norm(x, &self.ln_1), &self.in_proj).view([b, n, 3, heads, dim / heads]).permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false).transpose(1, 2).reshape([b, n, dim]);
        let x = x + linear(&a, &self.out_proj);
        let h = linear(&layer_norm(&x, &self.ln_2), &self.c_fc);
        let h = match act {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
            Activation::GeluTanh => h.gelu("tanh"),
        };
        &x + linear(&h, &self.c_proj)
    }
}

/// open_clip's `VisionTransformer` (class-token pooling, `ln_post` before pooling).
pub struct VisionTower {
    pub config: VisionConfig,
    conv1: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: (Tensor, Tensor),
    blocks: Vec<Block>,
    ln_post: (Tensor, Tensor),
    proj: Tensor,
    act: Activation,
}

impl VisionTower {
    pub fn device(&self) -> Device {
        self.conv1.device()
    }

    /// `pixels`: (b, 3, image_size, image_size), preprocessed (`clip_score::preprocess`).
    /// Returns `encode_image(pixels)`, unnormalized: (b, embed_dim).
    pub fn forward(&self, pixels: &Tensor) -> Tensor {
        let c = &self.config;
        let x = pixels.to_device(self.conv1.device()).to_kind(Kind::Float).conv2d(
            &self.conv1,
            None::<Tensor>,
            [c.patch_size, c.patch_size],
            [0, 0],
            [1, 1],
            1,
        );
        let b = x.size()[0];
        let x = x.reshape([b, c.width, -1]).permute([0, 2, 1]);
        let cls = self.class_embedding.view([1, 1, c.width]).expand([b, 1, c.width], false);
        let mut x = layer_norm(&(Tensor::cat(&[cls, x], 1) + &self.positional_embedding), &self.ln_pre);
        for blk in &self.blocks {
            x = blk.forward(&x, c.heads, self.act);
        }
        layer_norm(&x, &self.ln_post).select(1, 0).matmul(&self.proj)
    }
}

/// open_clip's text tower on sdkd's `ClipTextModel`.
pub struct TextTower {
    pub config: TextConfig,
    encoder: ClipTextEncoder,
    text_projection: Tensor,
}

impl TextTower {
    /// `tokens`: (b, context_length) ids as open_clip's tokenizer gives them
    /// (`clip_score::Tokenizer`). Returns `encode_text(tokens)`, unnormalized: (b, embed_dim).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        self.encoder.model.forward(tokens).pooled.matmul(&self.text_projection)
    }
}

/// Both towers of an open_clip ViT CLIP.
pub struct OpenClip {
    pub config: OpenClipConfig,
    pub visual: VisionTower,
    pub text: TextTower,
    /// The file it was read from, for reports.
    pub path: PathBuf,
}

/// Tensors by name, taken one by one with checks, so that the first missing or mis-shaped one
/// is named and anything left over (a layer scale, an attentional pool: another function) too.
struct Weights {
    map: HashMap<String, Tensor>,
    path: PathBuf,
    device: Device,
}

impl Weights {
    fn shape(&self, name: &str) -> Result<Vec<i64>> {
        self.map.get(name).map(Tensor::size).ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: &str) -> anyhow::Error {
        anyhow!("{} is not an open_clip ViT CLIP checkpoint (ViT-g-14's layout): it lacks the tensor {name}", self.path.display())
    }

    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.map.remove(name).ok_or_else(|| self.missing(name))?;
        if t.size() != shape {
            bail!("{}: tensor {name} has shape {:?}, the other tensors imply {shape:?}", self.path.display(), t.size());
        }
        if !t.is_floating_point() {
            bail!("{}: tensor {name} holds {:?}, not floating-point weights", self.path.display(), t.kind());
        }
        Ok(t.to_kind(Kind::Float).to_device(self.device).contiguous())
    }

    fn pair(&mut self, name: &str, suffixes: [&str; 2], shapes: [&[i64]; 2]) -> Result<(Tensor, Tensor)> {
        Ok((self.take(&format!("{name}.{}", suffixes[0]), shapes[0])?, self.take(&format!("{name}.{}", suffixes[1]), shapes[1])?))
    }

    fn ln(&mut self, name: &str, dim: i64) -> Result<(Tensor, Tensor)> {
        self.pair(name, ["weight", "bias"], [&[dim], &[dim]])
    }

    fn lin(&mut self, name: &str, cin: i64, cout: i64) -> Result<(Tensor, Tensor)> {
        self.pair(name, ["weight", "bias"], [&[cout, cin], &[cout]])
    }

    fn block(&mut self, p: &str, width: i64, mlp: i64) -> Result<Block> {
        Ok(Block {
            ln_1: self.ln(&format!("{p}.ln_1"), width)?,
            in_proj: self.pair(&format!("{p}.attn"), ["in_proj_weight", "in_proj_bias"], [&[3 * width, width], &[3 * width]])?,
            out_proj: self.lin(&format!("{p}.attn.out_proj"), width, width)?,
            ln_2: self.ln(&format!("{p}.ln_2"), width)?,
            c_fc: self.lin(&format!("{p}.mlp.c_fc"), width, mlp)?,
            c_proj: self.lin(&format!("{p}.mlp.c_proj"), mlp, width)?,
        })
    }

    /// How many `{prefix}N.ln_1.weight` there are, N = 0, 1, ...
    fn count_layers(&self, prefix: &str) -> i64 {
        (0..).take_while(|i| self.map.contains_key(&format!("{prefix}{i}.ln_1.weight"))).count() as i64
    }
}

/// Reads the state dict: safetensors by extension, else a `torch.save` zip.
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        bail!("the CLIP weights file {} does not exist; sdkd needs {WEIGHTS_HELP}", path.display());
    }
    let read = if path.extension().is_some_and(|e| e == "safetensors") { weights::read_all(path) } else { torch_pickle::load_state_dict(path) };
    read.with_context(|| format!("reading the CLIP weights {} (expected {WEIGHTS_HELP})", path.display()))
}

/// What `open_clip_config.json` says that the shapes do not.
struct Sidecar {
    vision_heads: Option<i64>,
    text_heads: Option<i64>,
    act: Activation,
}

/// Head counts and activation from `open_clip_config.json` beside `path`, if there is one.
fn sidecar(path: &Path) -> Result<Option<Sidecar>> {
    let file = path.with_file_name(CONFIG_FILE);
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", file.display()))?;
    let cfg = v.get("model_cfg").unwrap_or(&v);
    let int = |p: &[&str]| -> Option<i64> { p.iter().try_fold(cfg, |v, k| v.get(k)).and_then(serde_json::Value::as_i64) };
    // options that change the image tower's function (their tensors would also be left over)
    for k in ["ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool", "timm_model_name"] {
        if let Some(val) = cfg.get("vision_cfg").and_then(|c| c.get(k)) {
            if !val.is_null() && val != &serde_json::Value::Bool(false) {
                bail!("{}: vision_cfg.{k} = {val}: sdkd's open_clip image tower is ViT-g-14's, without it", file.display());
            }
        }
    }
    let vision_heads = match (int(&["vision_cfg", "width"]), int(&["vision_cfg", "head_width"])) {
        (Some(w), Some(hw)) if hw > 0 => Some(w / hw),
        (Some(w), None) => Some(w / 64), // CLIPVisionCfg's head_width default
        _ => None,
    };
    let text_heads = int(&["text_cfg", "heads"]).or(cfg.get("text_cfg").map(|_| 8)); // CLIPTextCfg's default
    let quick = cfg.get("quick_gelu").and_then(serde_json::Value::as_bool).unwrap_or(false);
    Ok(Some(Sidecar { vision_heads, text_heads, act: if quick { Activation::QuickGelu } else { Activation::Gelu } }))
}

impl OpenClip {
    /// Loads open_clip's `open_clip_pytorch_model.bin` (`torch.save`) or
    /// `open_clip_model.safetensors`, with `open_clip_config.json` beside it when present.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let tensors = read_tensors(path)?;
        let side = sidecar(path)?;
        let mut w = Weights { map: tensors.into_iter().collect(), path: path.to_path_buf(), device };
        let conv = w.shape("visual.conv1.weight")?;
        if conv.len() != 4 || conv[1] != 3 || conv[2] != conv[3] {
            bail!("{}: visual.conv1.weight has shape {conv:?}, not a ViT patch embedding (width, 3, p, p)", path.display());
        }
        let (width, patch) = (conv[0], conv[2]);
        let pos = w.shape("visual.positional_embedding")?;
        let grid = ((pos[0] - 1) as f64).sqrt().round() as i64;
        if pos.len() != 2 || grid * grid + 1 != pos[0] {
            bail!("{}: visual.positional_embedding has shape {pos:?}, not (grid² + 1, width)", path.display());
        }
        let embed_dim = *w.shape("visual.proj")?.last().unwrap_or(&0);
        let vlayers = w.count_layers("visual.transformer.resblocks.");
        if vlayers == 0 {
            return Err(w.missing("visual.transformer.resblocks.0.ln_1.weight"));
        }
        let vmlp = w.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")?[0];
        let tok = w.shape("token_embedding.weight")?;
        let twidth = tok[1];
        let ctx = w.shape("positional_embedding")?[0];
        let tlayers = w.count_layers("transformer.resblocks.");
        if tlayers == 0 {
            return Err(w.missing("transformer.resblocks.0.ln_1.weight"));
        }
        let tmlp = w.shape("transformer.resblocks.0.mlp.c_fc.weight")?[0];
        let Sidecar { vision_heads: vh, text_heads: th, act } = side.unwrap_or(Sidecar { vision_heads: None, text_heads: None, act: Activation::Gelu });
        let config = OpenClipConfig {
            embed_dim,
            vision: VisionConfig { width, layers: vlayers, heads: vh.unwrap_or(default_vision_heads(width)), patch_size: patch, image_size: grid * patch, mlp_width: vmlp },
            text: TextConfig { width: twidth, layers: tlayers, heads: th.unwrap_or(default_text_heads(twidth)), context_length: ctx, vocab_size: tok[0], mlp_width: tmlp },
            act,
        };
        for (what, width, heads) in [("image", width, config.vision.heads), ("text", twidth, config.text.heads)] {
            if heads < 1 || width % heads != 0 {
                bail!("{}: the {what} tower's width {width} does not split into {heads} heads", path.display());
            }
        }

        let vc = &config.vision;
        let visual = VisionTower {
            conv1: w.take("visual.conv1.weight", &[width, 3, patch, patch])?,
            class_embedding: w.take("visual.class_embedding", &[width])?,
            positional_embedding: w.take("visual.positional_embedding", &[grid * grid + 1, width])?,
            ln_pre: w.ln("visual.ln_pre", width)?,
            blocks: (0..vlayers).map(|i| w.block(&format!("visual.transformer.resblocks.{i}"), width, vmlp)).collect::<Result<_>>()?,
            ln_post: w.ln("visual.ln_post", width)?,
            proj: w.take("visual.proj", &[width, embed_dim])?,
            config: vc.clone(),
            act,
        };

        // The text tower in transformers' names (what diffusers' SD-2 conversion does).
        let tc = &config.text;
        let text_config = ClipTextConfig {
            vocab_size: tc.vocab_size,
            hidden_size: twidth,
            intermediate_size: tmlp,
            num_hidden_layers: tlayers,
            num_attention_heads: tc.heads,
            max_position_embeddings: ctx,
            hidden_act: act,
            layer_norm_eps: LN_EPS,
            eos_token_id: 2, // pool at the largest id: open_clip's argmax pooling
            ..ClipTextConfig::default()
        };
        text_config.validate().with_context(|| format!("{}: the text tower", path.display()))?;
        let encoder = ClipTextEncoder::build(&text_config, device, Kind::Float, Init::Empty);
        let mut named: Vec<(String, Tensor)> = vec![
            ("embeddings.token_embedding.weight".into(), w.take("token_embedding.weight", &[tc.vocab_size, twidth])?),
            ("embeddings.position_embedding.weight".into(), w.take("positional_embedding", &[ctx, twidth])?),
        ];
        for i in 0..tlayers {
            let b = w.block(&format!("transformer.resblocks.{i}"), twidth, tmlp)?;
            let p = format!("encoder.layers.{i}");
            let (qkv_w, qkv_b) = (b.in_proj.0.chunk(3, 0), b.in_proj.1.chunk(3, 0));
            for (j, n) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                named.push((format!("{p}.self_attn.{n}.weight"), qkv_w[j].shallow_clone()));
                named.push((format!("{p}.self_attn.{n}.bias"), qkv_b[j].shallow_clone()));
            }
            for (n, (wt, bs)) in [("self_attn.out_proj", b.out_proj), ("layer_norm1", b.ln_1), ("layer_norm2", b.ln_2), ("mlp.fc1", b.c_fc), ("mlp.fc2", b.c_proj)] {
                named.push((format!("{p}.{n}.weight"), wt));
                named.push((format!("{p}.{n}.bias"), bs));
            }
        }
        let (fw, fb) = w.ln("ln_final", twidth)?;
        named.push(("final_layer_norm.weight".into(), fw));
        named.push(("final_layer_norm.bias".into(), fb));
        let vars = encoder.vs.variables();
        for (name, t) in &named {
            let var = vars.get(&format!("text_model.{name}")).ok_or_else(|| anyhow!("sdkd's CLIP text model has no {name}"))?;
            tch::no_grad(|| var.shallow_clone().copy_(t));
        }
        if named.len() != vars.len() {
            bail!("internal: {} of sdkd's {} text-model tensors filled", named.len(), vars.len());
        }
        let text = TextTower { text_projection: w.take("text_projection", &[twidth, embed_dim])?, config: tc.clone(), encoder };
        // logit_scale (and logit_bias) are for contrastive logits; the CLIP score does not use them.
        w.map.remove("logit_scale");
        w.map.remove("logit_bias");
        w.map.remove("attn_mask"); // a non-persistent buffer in open_clip, but some exports keep it
        if let Some(extra) = w.map.keys().min() {
            bail!(
                "{}: unexpected tensor {extra} ({} left over): this checkpoint has a part ViT-g-14's structure lacks (layer scale, attentional pool, ...)",
                path.display(),
                w.map.len()
            );
        }
        Ok(OpenClip { config, visual, text, path: path.to_path_buf() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_heads_are_open_clip_configs() {
        // (vision width, heads, text width, heads): ViT-B-32, ViT-L-14, ViT-H-14, ViT-g-14, ViT-bigG-14
        for (vw, vh, tw, th) in [(768, 12, 512, 8), (1024, 16, 768, 12), (1280, 16, 1024, 16), (1408, 16, 1024, 16), (1664, 16, 1280, 20)] {
            assert_eq!((default_vision_heads(vw), default_text_heads(tw)), (vh, th));
        }
    }
}
