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
//! SDXL files (Stability's SGM layout, as `sd_xl_base_1.0.safetensors` and its fine-tunes come)
//! keep the UNet and VAE names, add `model.diffusion_model.label_emb.0.{0,2}` (diffusers'
//! `add_embedding.linear_1/2`, the micro-conditioning) and carry two text encoders:
//! `conditioner.embedders.0.transformer.text_model.*` (CLIP ViT-L, transformers' names) and
//! `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG: `transformer.resblocks` for the layers,
//! `in_proj` fusing q/k/v, `text_projection` stored as the matrix that multiplies, the transpose
//! of transformers' linear weight). A file is SDXL when it has the bigG tower (diffusers'
//! `single_file_utils` detects SDXL base by the same keys); the refiner
//! (`conditioner.embedders.0.model.*`, one OpenCLIP encoder) is refused. What the shapes cannot
//! tell, a diffusers folder can: with `SingleFileOptions::config` (diffusers'
//! `from_single_file(config=…)`) the configs come from it.
//!
//! One file per concern: `state_dict` (the tensors of a `.safetensors` or `.ckpt`), `names`
//! (diffusers <-> LDM names, both directions), `yaml` (the sidecar LDM config, read and written),
//! `infer` (the diffusers configs from the shapes) and `load` (the weights into sdkd's models).
mod infer;
mod load;
mod names;
mod state_dict;
mod yaml;

pub use names::{text_encoder_2_to_ldm, text_encoder_to_ldm, unet_module_ldm_names, unet_to_ldm, vae_to_ldm};
pub use state_dict::StateDict;
pub use yaml::ldm_yaml;

use super::clip::{Activation, ClipTextConfig};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use yaml::Sidecar;

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder (CLIP ViT-L, transformers' names below it).
pub const XL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder (OpenCLIP ViT-bigG, open_clip's names below it).
pub const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder (OpenCLIP ViT-bigG).
const XL_REFINER_PREFIX: &str = "conditioner.embedders.0.model.";
const EMA_PREFIX: &str = "model_ema.";

/// Which Stable Diffusion generation a file is, by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 text encoder (768 wide).
    Sd1,
    /// OpenCLIP ViT-H/14 text encoder (1024 wide), penultimate layer.
    Sd2,
    /// SDXL base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection, and a `text_time` UNet.
    Sdxl,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD-1.x",
            Family::Sd2 => "SD-2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// The (first) tokenizer's pad token in the published pipelines (SDXL's `tokenizer_2` pads
    /// with "!").
    pub fn pad_token(self) -> &'static str {
        match self {
            Family::Sd1 | Family::Sdxl => "<|endoftext|>",
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
    /// A diffusers pipeline folder whose config files describe the file (diffusers'
    /// `from_single_file(config=…)`): for models whose hyper-parameters the weights cannot carry
    /// (norm groups, heads) and the defaults do not fit. Its tokenizers and scheduler are used too.
    pub config: Option<PathBuf>,
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
    pub yaml: Option<Sidecar>,
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
        let family = if state.has_prefix("conditioner.embedders.") {
            if state.has_prefix(XL_REFINER_PREFIX) {
                bail!(
                    "{file}: key {XL_REFINER_PREFIX}*: an SDXL refiner (one OpenCLIP text encoder, image-to-image); \
                     sdkd takes text-to-image models: SD-1.x, SD-2.x and SDXL base checkpoints"
                );
            }
            if !state.has_prefix(XL_OPEN_CLIP_PREFIX) || !state.has_prefix(XL_CLIP_PREFIX) {
                let missing = if state.has_prefix(XL_CLIP_PREFIX) { XL_OPEN_CLIP_PREFIX } else { XL_CLIP_PREFIX };
                bail!("{file}: conditioner.embedders.* but no {missing}* keys: not an SDXL base checkpoint (it has both text encoders)");
            }
            Family::Sdxl
        } else if state.has_prefix(&format!("{UNET_PREFIX}label_emb.")) {
            Family::Sdxl // a UNet-only SDXL file: label_emb is its micro-conditioning
        } else if state.has_prefix(OPEN_CLIP_PREFIX) {
            Family::Sd2
        } else if state.has_prefix(CLIP_PREFIX) {
            Family::Sd1
        } else {
            // No text encoder: the UNet's context width tells (768 CLIP-L, 1024 OpenCLIP-H).
            let ctx = state.names().find(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight")).and_then(|k| state.shape(k)).map(|s| s[1]);
            if ctx == Some(1024) { Family::Sd2 } else { Family::Sd1 }
        };
        if !state.has_prefix(UNET_PREFIX) {
            bail!("{file}: no {UNET_PREFIX}* keys: not a Stable Diffusion checkpoint in the CompVis/LDM (or SGM) layout");
        }
        let clip = if family == Family::Sdxl { XL_CLIP_PREFIX } else { CLIP_PREFIX };
        let sd1_text_prefix =
            if state.has_prefix(&format!("{clip}text_model.")) || !state.has_prefix(clip) { format!("{clip}text_model.") } else { clip.to_string() };
        let yaml = Sidecar::beside(state.path())?;
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

    /// Where the (first) text encoder's keys start.
    pub fn text_prefix(&self) -> &'static str {
        match self.family {
            Family::Sd1 => CLIP_PREFIX,
            Family::Sd2 => OPEN_CLIP_PREFIX,
            Family::Sdxl => XL_CLIP_PREFIX,
        }
    }

    /// The diffusers folder's config of `part` (`unet`, `vae`, ...), when `--config` gave one.
    fn config_dir(&self, part: &str) -> Option<PathBuf> {
        self.options.config.as_ref().map(|d| d.join(part))
    }

}
