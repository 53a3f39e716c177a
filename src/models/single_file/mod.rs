//! Single-file Stable Diffusion checkpoints in the CompVis/LDM key layout (what the official
//! `v1-5-pruned-emaonly.safetensors` / `v2-1_768-ema-pruned.safetensors` and the model-sharing
//! sites ship, and what ComfyUI, AUTOMATIC1111 and stable-diffusion.cpp load):
//!
//! - `model.diffusion_model.{time_embed,input_blocks,middle_block,output_blocks,out}.*`: the UNet
//!   (optionally `model_ema.*`, LDM's EMA with the dots of the name removed);
//! - `first_stage_model.*`: the VAE, its mid-block attention as 1×1 convs (or, in files
//!   converted from newer diffusers folders, linears);
//! - `cond_stage_model.transformer.text_model.*` (SD-1.x, transformers' CLIP names) or
//!   `cond_stage_model.model.*` (SD-2.x, OpenCLIP names: `in_proj` fuses q/k/v, and the last of
//!   its layers is not used: SD-2 conditions on the penultimate one).
//!
//! The map between these names and diffusers' is a function of the diffusers config, for any
//! UNet sdkd can build: LDM numbers `input_blocks`/`output_blocks` consecutively, so a pruned
//! student's blocks come out contiguous with its downsamplers and upsamplers where LDM puts
//! them, and a student without a mid block has no `middle_block`. Reading, the configs are
//! inferred from the tensor shapes; what shapes cannot tell (attention heads, v-prediction) comes
//! from a sidecar LDM `.yaml` (`<stem>.yaml`) or SD's defaults, and an SD-2.x file with neither
//! is refused rather than guessed.
//!
//! One file per concern: `state_dict` (the tensors of a `.safetensors` or `.ckpt`), `names`
//! (diffusers <-> LDM names, both directions), `yaml` (the sidecar LDM config, read and written),
//! `infer` (the diffusers configs from the shapes) and `load` (the weights into sdkd's models).
mod infer;
mod load;
mod names;
mod state_dict;
mod yaml;

pub use names::{text_encoder_to_ldm, unet_to_ldm, vae_to_ldm};
pub use state_dict::StateDict;
pub use yaml::ldm_yaml;

use super::clip::{Activation, ClipTextConfig};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use yaml::sidecar;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
const EMA_PREFIX: &str = "model_ema.";

/// Which Stable Diffusion generation a file is, by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 text encoder (768 wide).
    Sd1,
    /// OpenCLIP ViT-H/14 text encoder (1024 wide), penultimate layer.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD-1.x",
            Family::Sd2 => "SD-2.x",
        }
    }

    /// The tokenizer's pad token in the published pipelines.
    pub fn pad_token(self) -> &'static str {
        match self {
            Family::Sd1 => "<|endoftext|>",
            Family::Sd2 => "!",
        }
    }
}

/// What the user said about a file beyond its weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SingleFileOptions {
    /// Read the UNet from `model_ema.*` instead of `model.diffusion_model.*`.
    pub use_ema: bool,
    /// `epsilon` or `v_prediction`; wins over the sidecar `.yaml`.
    pub prediction_type: Option<String>,
}

/// The family of a pipeline by its text encoder: gelu and a 1024-wide context are SD-2's
/// OpenCLIP, anything else is written in SD-1's CLIP names.
pub fn family_of(config: &ClipTextConfig) -> Family {
    if config.hidden_act == Activation::Gelu {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

/// A single file opened as a Stable Diffusion pipeline: its family and the configs its shapes
/// (and sidecar `.yaml`) give.
#[derive(Debug)]
pub struct SingleFile {
    pub state: StateDict,
    pub family: Family,
    pub options: SingleFileOptions,
    /// The sidecar LDM config, when there is one.
    pub yaml: Option<(PathBuf, serde_yaml::Value)>,
    /// Where the SD-1 text encoder's names start (older files lack `text_model.`).
    sd1_text_prefix: String,
}

impl SingleFile {
    pub fn open(path: &Path, options: &SingleFileOptions) -> Result<SingleFile> {
        let state = StateDict::open(path)?;
        Self::from_state(state, options)
    }

    pub fn from_state(state: StateDict, options: &SingleFileOptions) -> Result<SingleFile> {
        let file = state.path().display().to_string();
        for key in ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "model.diffusion_model.label_emb.0.0.weight"] {
            if state.contains(key) || (key.starts_with("conditioner") && state.has_prefix("conditioner.embedders.")) {
                bail!("{file}: key {key}: this is an SDXL checkpoint; SDXL is not supported yet (SD-1.x and SD-2.x are)");
            }
        }
        if !state.has_prefix(UNET_PREFIX) {
            bail!("{file}: no {UNET_PREFIX}* keys: not a Stable Diffusion 1.x/2.x checkpoint in the CompVis/LDM layout");
        }
        let family = if state.has_prefix(OPEN_CLIP_PREFIX) {
            Family::Sd2
        } else if state.has_prefix(CLIP_PREFIX) {
            Family::Sd1
        } else {
            // No text encoder: the UNet's context width tells (768 CLIP-L, 1024 OpenCLIP-H).
            let ctx = state.names().find(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight")).and_then(|k| state.shape(k)).map(|s| s[1]);
            if ctx == Some(1024) { Family::Sd2 } else { Family::Sd1 }
        };
        let sd1_text_prefix =
            if state.has_prefix(&format!("{CLIP_PREFIX}text_model.")) || !state.has_prefix(CLIP_PREFIX) {
                format!("{CLIP_PREFIX}text_model.")
            } else {
                CLIP_PREFIX.to_string()
            };
        let yaml = match sidecar(state.path()) {
            Some(p) => {
                let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                let v: serde_yaml::Value = serde_yaml::from_str(&text).with_context(|| format!("{}: not valid YAML", p.display()))?;
                Some((p, v))
            }
            None => None,
        };
        if options.use_ema && !state.has_prefix(EMA_PREFIX) {
            bail!("{file}: --use-ema: the file has no {EMA_PREFIX}* keys (no EMA weights)");
        }
        Ok(SingleFile { state, family, options: options.clone(), yaml, sd1_text_prefix })
    }

    fn file(&self) -> String {
        self.state.path().display().to_string()
    }

    fn shape(&self, key: &str) -> Result<&[i64]> {
        self.state.shape(key).ok_or_else(|| anyhow!("{}: missing key {key}", self.file()))
    }

    /// Whether the file holds a part (`first_stage_model.*`, `cond_stage_model.*`).
    pub fn check_has(&self, prefix: &str, what: &str) -> Result<()> {
        if !self.state.has_prefix(prefix) {
            bail!("{}: no {prefix}* keys: the file holds no {what}, which this needs", self.file());
        }
        Ok(())
    }

    fn text_prefix(&self) -> &str {
        match self.family {
            Family::Sd1 => CLIP_PREFIX,
            Family::Sd2 => OPEN_CLIP_PREFIX,
        }
    }

}
