//! A diffusers Stable Diffusion pipeline folder: `model_index.json` plus the `unet/ vae/
//! text_encoder/ tokenizer/ scheduler/` parts. Opening checks only `model_index.json`; each part
//! is checked when it is loaded (a distillation teacher needs only `unet/` when it trains from a
//! latent cache), and every error names the part at fault.
use super::clip::{ClipTextConfig, ClipTextEncoder};
use super::clip_tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::unet_config::UNetConfig;
use super::vae::{Vae, VaeConfig};
use crate::schedulers::SchedulerConfig;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

/// One part of a pipeline folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
    Tokenizer,
    Scheduler,
}

impl Part {
    pub const ALL: [Part; 5] = [Part::Unet, Part::Vae, Part::TextEncoder, Part::Tokenizer, Part::Scheduler];

    /// The folder and `model_index.json` key.
    pub fn name(self) -> &'static str {
        match self {
            Part::Unet => "unet",
            Part::Vae => "vae",
            Part::TextEncoder => "text_encoder",
            Part::Tokenizer => "tokenizer",
            Part::Scheduler => "scheduler",
        }
    }

    /// The classes sdkd can load for this part (`None`: any, the scheduler's class is only read).
    fn classes(self) -> Option<&'static [&'static str]> {
        match self {
            Part::Unet => Some(&["UNet2DConditionModel"]),
            Part::Vae => Some(&["AutoencoderKL"]),
            Part::TextEncoder => Some(&["CLIPTextModel"]),
            Part::Tokenizer => Some(&["CLIPTokenizer", "CLIPTokenizerFast"]),
            Part::Scheduler => None,
        }
    }

    /// The file whose presence makes the folder this part.
    fn config_file(self) -> &'static str {
        match self {
            Part::Scheduler => "scheduler_config.json",
            Part::Tokenizer => "tokenizer_config.json",
            _ => "config.json",
        }
    }
}

/// An opened pipeline folder.
#[derive(Debug, Clone)]
pub struct PipelineDir {
    root: PathBuf,
    index: Map<String, Value>,
}

impl PipelineDir {
    /// Reads `<dir>/model_index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("pipeline {}: not a folder", dir.display());
        }
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("pipeline {}: reading {} (a diffusers pipeline folder has one)", dir.display(), path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("pipeline {}: {} is not valid JSON", dir.display(), path.display()))?;
        let index = json.as_object().cloned().ok_or_else(|| anyhow!("pipeline {}: {} is not a JSON object", dir.display(), path.display()))?;
        Ok(PipelineDir { root: dir.to_path_buf(), index })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `_class_name` of model_index.json (e.g. `StableDiffusionPipeline`).
    pub fn class_name(&self) -> Option<&str> {
        self.index.get("_class_name").and_then(Value::as_str)
    }

    /// The class model_index.json gives a part (`["diffusers", "AutoencoderKL"]` -> `AutoencoderKL`).
    pub fn part_class(&self, part: Part) -> Option<&str> {
        self.index.get(part.name()).and_then(Value::as_array).and_then(|a| a.get(1)).and_then(Value::as_str)
    }

    fn context(&self, part: Part) -> String {
        format!("pipeline {}: part \"{}\"", self.root.display(), part.name())
    }

    /// The folder of `part`, checked: model_index.json does not set it to null or an
    /// unsupported class, and the folder exists with its config file.
    pub fn part_dir(&self, part: Part) -> Result<PathBuf> {
        self.check_part(part).with_context(|| self.context(part))
    }

    fn check_part(&self, part: Part) -> Result<PathBuf> {
        match self.index.get(part.name()) {
            Some(Value::Array(entry)) if entry.iter().all(Value::is_null) => {
                bail!("model_index.json sets it to null (the pipeline has no {})", part.name())
            }
            _ => {}
        }
        if let (Some(class), Some(allowed)) = (self.part_class(part), part.classes()) {
            if !allowed.contains(&class) {
                bail!("model_index.json gives class {class:?}; sdkd loads {}", allowed.join(" or "));
            }
        }
        let dir = self.root.join(part.name());
        if !dir.is_dir() {
            bail!("missing: no folder {}", dir.display());
        }
        let config = dir.join(part.config_file());
        // A tokenizer may come with tokenizer.json alone.
        let tokenizer_ok = part == Part::Tokenizer && (dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file());
        if !config.is_file() && !tokenizer_ok {
            bail!("missing {}", config.display());
        }
        Ok(dir)
    }

    /// Checks that each of `parts` is present (without loading weights).
    pub fn validate(&self, parts: &[Part]) -> Result<()> {
        for &part in parts {
            self.part_dir(part)?;
        }
        Ok(())
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        let dir = self.part_dir(Part::Unet)?;
        UNetConfig::from_path(&dir).with_context(|| self.context(Part::Unet))
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        let dir = self.part_dir(Part::Vae)?;
        VaeConfig::from_path(&dir).with_context(|| self.context(Part::Vae))
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        let dir = self.part_dir(Part::TextEncoder)?;
        ClipTextConfig::from_path(&dir).with_context(|| self.context(Part::TextEncoder))
    }

    pub fn load_unet(&self, device: Device, kind: Kind) -> Result<UNet> {
        let dir = self.part_dir(Part::Unet)?;
        UNet::load(&dir, device, kind).with_context(|| self.context(Part::Unet))
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<Vae> {
        let dir = self.part_dir(Part::Vae)?;
        Vae::load(&dir, device, kind).with_context(|| self.context(Part::Vae))
    }

    pub fn load_text_encoder(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        let dir = self.part_dir(Part::TextEncoder)?;
        ClipTextEncoder::load(&dir, device, kind).with_context(|| self.context(Part::TextEncoder))
    }

    pub fn load_tokenizer(&self) -> Result<ClipTokenizer> {
        let dir = self.part_dir(Part::Tokenizer)?;
        ClipTokenizer::from_dir(&dir).with_context(|| self.context(Part::Tokenizer))
    }

    /// `scheduler/scheduler_config.json`, for the schedulers to parse.
    pub fn scheduler_config_path(&self) -> Result<PathBuf> {
        Ok(self.part_dir(Part::Scheduler)?.join(Part::Scheduler.config_file()))
    }

    /// The scheduler config, parsed and checked: a value any command would refuse is refused
    /// here, for every command that opens the pipeline.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        SchedulerConfig::from_path(&self.scheduler_config_path()?).with_context(|| self.context(Part::Scheduler))
    }
}
