//! A Stable Diffusion pipeline: a diffusers folder (`model_index.json` plus the `unet/ vae/
//! text_encoder/ tokenizer/ scheduler/` parts) or a single-file checkpoint in the LDM layout
//! (`models::single_file`, with the embedded CLIP tokenizer and SD's scheduler config), so
//! every command that takes a pipeline takes either. Opening checks only `model_index.json` (or
//! the file's header); each part is checked when it is loaded (a distillation teacher needs only
//! its UNet when it trains from a latent cache), and every error names the part at fault.
use super::clip::{ClipTextConfig, ClipTextEncoder};
use super::clip_tokenizer::ClipTokenizer;
use super::single_file::{Family, SingleFile, SingleFileOptions, VAE_PREFIX, XL_OPEN_CLIP_PREFIX};
use super::unet::UNet;
use super::layers::Init;
use super::unet_config::UNetConfig;
use super::vae::{Vae, VaeConfig};
use super::weights;
use crate::schedulers::SchedulerConfig;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tch::{Device, Kind};

/// One part of a pipeline folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    Unet,
    Vae,
    TextEncoder,
    Tokenizer,
    Scheduler,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`, OpenCLIP ViT-bigG).
    TextEncoder2,
    Tokenizer2,
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
            Part::TextEncoder2 => "text_encoder_2",
            Part::Tokenizer2 => "tokenizer_2",
        }
    }

    /// The classes sdkd can load for this part (`None`: any, the scheduler's class is only read).
    fn classes(self) -> Option<&'static [&'static str]> {
        match self {
            Part::Unet => Some(&["UNet2DConditionModel"]),
            Part::Vae => Some(&["AutoencoderKL"]),
            Part::TextEncoder => Some(&["CLIPTextModel"]),
            Part::Tokenizer | Part::Tokenizer2 => Some(&["CLIPTokenizer", "CLIPTokenizerFast"]),
            Part::TextEncoder2 => Some(&["CLIPTextModelWithProjection"]),
            Part::Scheduler => None,
        }
    }

    /// The file whose presence makes the folder this part.
    fn config_file(self) -> &'static str {
        match self {
            Part::Scheduler => "scheduler_config.json",
            Part::Tokenizer | Part::Tokenizer2 => "tokenizer_config.json",
            _ => "config.json",
        }
    }
}

/// An opened pipeline folder or single file.
#[derive(Debug, Clone)]
pub struct PipelineDir {
    root: PathBuf,
    index: Map<String, Value>,
    single: Option<Rc<SingleFile>>,
}

/// The configs of SD's published schedulers (SD-1.5's; SD-2.x differs only in prediction type).
const SD_SCHEDULER_CONFIG: &str = include_str!("../../configs/reference/sd15_scheduler_config.json");
/// SDXL base's (`EulerDiscreteScheduler`, leading spacing).
const SDXL_SCHEDULER_CONFIG: &str = include_str!("../../configs/reference/sdxl_scheduler_config.json");

impl PipelineDir {
    /// Reads `<dir>/model_index.json`, or the header of a single-file checkpoint.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, &SingleFileOptions::default())
    }

    /// `open`, with what a single file cannot say itself (EMA weights, prediction type).
    pub fn open_with(dir: &Path, options: &SingleFileOptions) -> Result<Self> {
        if dir.is_file() {
            let single = SingleFile::open(dir, options)?;
            return Ok(PipelineDir { root: dir.to_path_buf(), index: Map::new(), single: Some(Rc::new(single)) });
        }
        if !dir.is_dir() {
            bail!("pipeline {}: not a folder or a single-file checkpoint", dir.display());
        }
        let path = dir.join("model_index.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("pipeline {}: reading {} (a diffusers pipeline folder has one)", dir.display(), path.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("pipeline {}: {} is not valid JSON", dir.display(), path.display()))?;
        let index = json.as_object().cloned().ok_or_else(|| anyhow!("pipeline {}: {} is not a JSON object", dir.display(), path.display()))?;
        match index.get("_class_name").and_then(Value::as_str) {
            Some(class @ ("StableDiffusionXLImg2ImgPipeline" | "StableDiffusionXLInpaintPipeline")) => bail!(
                "pipeline {}: model_index.json key \"_class_name\" is {class:?} (the SDXL refiner or an inpainting model); \
                 sdkd takes text-to-image pipelines: StableDiffusionPipeline or StableDiffusionXLPipeline (an SDXL base)",
                dir.display()
            ),
            _ => {}
        }
        Ok(PipelineDir { root: dir.to_path_buf(), index, single: None })
    }

    /// Whether this is an SDXL pipeline (`StableDiffusionXLPipeline`: two text encoders and a
    /// `text_time` UNet).
    pub fn is_xl(&self) -> bool {
        self.class_name() == Some("StableDiffusionXLPipeline")
    }

    /// model_index.json's `force_zeros_for_empty_prompt` (diffusers' default: true): with no
    /// negative prompt, SDXL's unconditional embeddings are zeros, not the empty prompt's.
    pub fn force_zeros_for_empty_prompt(&self) -> Result<bool> {
        match self.index.get("force_zeros_for_empty_prompt") {
            None | Some(Value::Null) => Ok(true),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => bail!(
                "pipeline {}: model_index.json key \"force_zeros_for_empty_prompt\": {other} is not true or false",
                self.root.display()
            ),
        }
    }

    /// The single-file checkpoint this pipeline is, if it is one.
    pub fn single_file(&self) -> Option<&SingleFile> {
        self.single.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `_class_name` of model_index.json (e.g. `StableDiffusionPipeline`).
    pub fn class_name(&self) -> Option<&str> {
        if let Some(f) = &self.single {
            return Some(if f.family == Family::Sdxl { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" });
        }
        self.index.get("_class_name").and_then(Value::as_str)
    }

    /// The class model_index.json gives a part (`["diffusers", "AutoencoderKL"]` -> `AutoencoderKL`).
    pub fn part_class(&self, part: Part) -> Option<&str> {
        if self.single.is_some() {
            return part.classes().map(|c| c[0]).or(Some("PNDMScheduler"));
        }
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
        if let Some(f) = &self.single {
            for &part in parts {
                match part {
                    Part::Vae => f.check_has(VAE_PREFIX, "VAE (first_stage_model)")?,
                    Part::TextEncoder => f.check_has(f.text_prefix(), "text encoder")?,
                    Part::TextEncoder2 => f.check_has(XL_OPEN_CLIP_PREFIX, "second text encoder (OpenCLIP ViT-bigG)")?,
                    _ => {}
                }
            }
            return Ok(());
        }
        for &part in parts {
            self.part_dir(part)?;
        }
        Ok(())
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        if let Some(f) = &self.single {
            return f.unet_config();
        }
        let dir = self.part_dir(Part::Unet)?;
        UNetConfig::from_path(&dir).with_context(|| self.context(Part::Unet))
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        if let Some(f) = &self.single {
            return f.vae_config();
        }
        let dir = self.part_dir(Part::Vae)?;
        VaeConfig::from_path(&dir).with_context(|| self.context(Part::Vae))
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        if let Some(f) = &self.single {
            return f.text_encoder_config();
        }
        let dir = self.part_dir(Part::TextEncoder)?;
        ClipTextConfig::from_path(&dir).with_context(|| self.context(Part::TextEncoder))
    }

    pub fn load_unet(&self, device: Device, kind: Kind) -> Result<UNet> {
        if let Some(f) = &self.single {
            return f.load_unet(device, kind);
        }
        let dir = self.part_dir(Part::Unet)?;
        UNet::load(&dir, device, kind).with_context(|| self.context(Part::Unet))
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<Vae> {
        if let Some(f) = &self.single {
            return f.load_vae(device, kind);
        }
        let dir = self.part_dir(Part::Vae)?;
        Vae::load(&dir, device, kind).with_context(|| self.context(Part::Vae))
    }

    pub fn load_text_encoder(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        if let Some(f) = &self.single {
            return f.load_text_encoder(device, kind);
        }
        let dir = self.part_dir(Part::TextEncoder)?;
        ClipTextEncoder::load(&dir, device, kind).with_context(|| self.context(Part::TextEncoder))
    }

    /// SDXL's `text_encoder_2` (with its projection).
    pub fn load_text_encoder_2(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        if let Some(f) = &self.single {
            return f.load_text_encoder_2(device, kind);
        }
        let dir = self.part_dir(Part::TextEncoder2)?;
        ClipTextEncoder::load_with_projection(&dir, device, kind).with_context(|| self.context(Part::TextEncoder2))
    }

    /// SDXL's `tokenizer_2`: its pad token ("!" in SDXL's) is read from its files.
    pub fn load_tokenizer_2(&self) -> Result<ClipTokenizer> {
        if let Some(f) = &self.single {
            return match &f.options.config {
                Some(dir) => ClipTokenizer::from_dir(&dir.join("tokenizer_2")).with_context(|| format!("--config {}: tokenizer_2", dir.display())),
                None => ClipTokenizer::embedded("!"), // SDXL's tokenizer_2 pads with "!"
            };
        }
        let dir = self.part_dir(Part::Tokenizer2)?;
        ClipTokenizer::from_dir(&dir).with_context(|| self.context(Part::Tokenizer2))
    }

    pub fn load_tokenizer(&self) -> Result<ClipTokenizer> {
        if let Some(f) = &self.single {
            return match &f.options.config {
                Some(dir) => ClipTokenizer::from_dir(&dir.join("tokenizer")).with_context(|| format!("--config {}: tokenizer", dir.display())),
                None => ClipTokenizer::embedded(f.family.pad_token()),
            };
        }
        let dir = self.part_dir(Part::Tokenizer)?;
        ClipTokenizer::from_dir(&dir).with_context(|| self.context(Part::Tokenizer))
    }

    /// `scheduler/scheduler_config.json`, for the schedulers to parse.
    pub fn scheduler_config_path(&self) -> Result<PathBuf> {
        Ok(self.part_dir(Part::Scheduler)?.join(Part::Scheduler.config_file()))
    }

    /// The scheduler config as JSON: the folder's file, or for a single file SD's with the
    /// file's prediction type.
    pub fn scheduler_json(&self) -> Result<Value> {
        if let Some(f) = &self.single {
            if let Some(dir) = &f.options.config {
                let path = dir.join("scheduler").join(Part::Scheduler.config_file());
                let text = std::fs::read_to_string(&path).with_context(|| format!("--config: reading {}", path.display()))?;
                return serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()));
            }
            let base = if f.family == Family::Sdxl { SDXL_SCHEDULER_CONFIG } else { SD_SCHEDULER_CONFIG };
            let mut v: Value = serde_json::from_str(base)?;
            v["prediction_type"] = Value::String(f.prediction_type()?);
            return Ok(v);
        }
        let path = self.scheduler_config_path()?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
    }

    /// The scheduler config, parsed and checked: a value any command would refuse is refused
    /// here, for every command that opens the pipeline.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        if self.single.is_some() {
            return SchedulerConfig::from_json(&self.scheduler_json()?).with_context(|| self.context(Part::Scheduler));
        }
        SchedulerConfig::from_path(&self.scheduler_config_path()?).with_context(|| self.context(Part::Scheduler))
    }
}

/// Which diffusers pipeline a folder sdkd writes is, for its `model_index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineClass {
    /// `StableDiffusionPipeline`, without safety checker.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`, with what an empty prompt becomes.
    StableDiffusionXl { force_zeros_for_empty_prompt: bool },
}

impl PipelineClass {
    /// `model_index.json` of such a pipeline whose scheduler is of class `scheduler`.
    pub fn model_index_json(self, scheduler: &str) -> Value {
        match self {
            PipelineClass::StableDiffusionXl { force_zeros_for_empty_prompt } => serde_json::json!({
                "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
                "feature_extractor": [null, null], "force_zeros_for_empty_prompt": force_zeros_for_empty_prompt,
                "image_encoder": [null, null], "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            }),
            PipelineClass::StableDiffusion => serde_json::json!({
                "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
                "feature_extractor": [null, null], "image_encoder": [null, null], "requires_safety_checker": false,
                "safety_checker": [null, null], "scheduler": ["diffusers", scheduler], "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            }),
        }
    }
}

/// A UNet folder given directly or as a pipeline's `unet/`.
pub fn unet_dir(path: &Path) -> PathBuf {
    if path.join("model_index.json").is_file() {
        path.join("unet")
    } else {
        path.to_path_buf()
    }
}

/// Where a replacement UNet comes from (`--unet`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnetSource {
    /// A diffusers UNet folder (from `prune`, `export`, or a pipeline's `unet/`).
    Folder(PathBuf),
    /// A training checkpoint: `unet/config.json` plus these weights (`student.safetensors` or
    /// `ema.safetensors`).
    Checkpoint { config_dir: PathBuf, weights: PathBuf },
}

impl UnetSource {
    /// Reads what `path` is: a UNet folder, a pipeline folder (its `unet/`), a training
    /// checkpoint (`unet/config.json` + `student.safetensors` / `ema.safetensors`), or a run's
    /// `final/` (`unet/`, `unet_ema/`). `ema` picks the EMA weights (`ema.safetensors` or
    /// `unet_ema/`); otherwise a checkpoint gives its student weights, or its EMA when that is all
    /// it has.
    pub fn resolve(path: &Path, ema: bool) -> Result<Self> {
        if !path.is_dir() {
            bail!("--unet {}: not a folder (a UNet folder, a pipeline folder or a checkpoint folder)", path.display());
        }
        let is_unet = |dir: &Path| {
            dir.join("config.json").is_file() && weights::weight_files(dir, "diffusion_pytorch_model").is_ok()
        };
        let path = unet_dir(path);
        let config_dir = path.join("unet");
        if config_dir.join("config.json").is_file() {
            let (student, ema_file) = (path.join("student.safetensors"), path.join("ema.safetensors"));
            let weights = match (ema, student.is_file(), ema_file.is_file()) {
                (true, _, true) | (false, false, true) => Some(ema_file),
                (false, true, _) => Some(student),
                _ => None,
            };
            if let Some(weights) = weights {
                return Ok(UnetSource::Checkpoint { config_dir, weights });
            }
        }
        let candidates = if ema { vec![path.join("unet_ema")] } else { vec![path.clone(), config_dir] };
        if let Some(dir) = candidates.into_iter().find(|d| is_unet(d)) {
            return Ok(UnetSource::Folder(dir));
        }
        if ema {
            bail!(
                "--unet {} --ema: no EMA weights there (a checkpoint's ema.safetensors or a run's final/unet_ema/)",
                path.display()
            );
        }
        bail!(
            "--unet {}: found no UNet in it (expected config.json + diffusion_pytorch_model.safetensors, a pipeline \
             folder, or a checkpoint folder with unet/config.json and student.safetensors or ema.safetensors)",
            path.display()
        )
    }

    pub fn load(&self, device: Device, kind: Kind) -> Result<UNet> {
        match self {
            UnetSource::Folder(dir) => UNet::load(dir, device, kind),
            UnetSource::Checkpoint { config_dir, weights: file } => {
                let config = UNetConfig::from_path(config_dir)?;
                let unet = UNet::build(&config, device, kind, Init::Empty);
                weights::load_strict(&unet.vs.variables(), std::slice::from_ref(file)).with_context(|| {
                    format!("loading checkpoint UNet {} with {}", file.display(), config_dir.display())
                })?;
                Ok(unet)
            }
        }
    }

    /// What the PNG's `unet` chunk records.
    pub fn describe(&self) -> String {
        match self {
            UnetSource::Folder(dir) => dir.display().to_string(),
            UnetSource::Checkpoint { weights, .. } => weights.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_sources() {
        let root = std::env::temp_dir().join(format!("sdkd-unet-source-{}", std::process::id()));
        let touch = |p: &str| {
            let p = root.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"{}").unwrap();
        };
        for f in ["u/config.json", "u/diffusion_pytorch_model.safetensors"] {
            touch(f);
        }
        for f in ["p/model_index.json", "p/unet/config.json", "p/unet/diffusion_pytorch_model.fp16.safetensors"] {
            touch(f);
        }
        for f in [
            "c/unet/config.json",
            "c/student.safetensors",
            "c/ema.safetensors",
            "e/unet/config.json",
            "e/ema.safetensors",
        ] {
            touch(f);
        }
        for f in ["f/unet/config.json", "f/unet/diffusion_pytorch_model.safetensors"] {
            touch(f);
        }
        for f in ["f/unet_ema/config.json", "f/unet_ema/diffusion_pytorch_model.safetensors"] {
            touch(f);
        }
        let r = |p: &str, ema: bool| UnetSource::resolve(&root.join(p), ema);
        let folder = |p: &str| UnetSource::Folder(root.join(p));
        let ckpt = |c: &str, w: &str| UnetSource::Checkpoint { config_dir: root.join(c), weights: root.join(w) };
        assert_eq!(r("u", false).unwrap(), folder("u"));
        assert_eq!(r("p", false).unwrap(), folder("p/unet"));
        assert_eq!(r("c", false).unwrap(), ckpt("c/unet", "c/student.safetensors"));
        assert_eq!(r("c", true).unwrap(), ckpt("c/unet", "c/ema.safetensors"));
        assert_eq!(r("e", false).unwrap(), ckpt("e/unet", "e/ema.safetensors")); // only the EMA exists
        assert_eq!(r("f", false).unwrap(), folder("f/unet"));
        assert_eq!(r("f", true).unwrap(), folder("f/unet_ema"));
        for (p, ema, needle) in
            [("u", true, "--ema"), ("p", true, "--ema"), ("nope", false, "nope"), ("c/unet", false, "c/unet")]
        {
            let e = r(p, ema).unwrap_err().to_string();
            assert!(e.contains(needle), "{p}: {e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
