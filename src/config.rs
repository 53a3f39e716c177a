//! The run YAML of `sdkd train`, parsed once into typed structs.
//!
//! Defaults follow BK-SDM's training script: batch 64 x 4, constant lr 5e-5, 50K steps, 512 px.
//! Unknown keys are errors naming the key and line (serde_yaml reports both); `validate` checks
//! ranges and cross-key rules with messages naming the key and value. Relative paths resolve
//! against the config file's directory, so a run directory can be launched from anywhere.
//! docs/config.md documents every key: keep the two in step.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::runtime::{DeviceChoice, Precision};
use crate::runtime::parsed;
pub use crate::schedulers::SchedulerKind;

/// A whole distillation (or from-scratch) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Teacher pipeline folder (diffusers layout), single file, or hub id (`org/name`, kept as
    /// written when no such path exists). May be null only for a from-scratch run
    /// (`student_init: random` and `distill: false`).
    #[serde(default)]
    pub teacher: Option<PathBuf>,
    /// The hub revision (branch, tag or commit) of a hub-id teacher; `sdkd train` records the
    /// commit it resolved to here, so a resume loads the same weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// diffusers' `variant` of a hub-id teacher's weights (`fp16`): which files are fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A preset name (`bk_base`, `bk_small`, `bk_tiny`, aliases) or a path to a spec YAML.
    pub student: String,
    pub output_dir: PathBuf,
    /// Where the student's weights start: copied from the teacher, or PyTorch's default init.
    #[serde(default)]
    pub student_init: StudentInit,
    /// false = task loss only: the teacher UNet never runs and the KD weights are ignored.
    #[serde(default = "yes")]
    pub distill: bool,
    pub data: DataConfig,
    #[serde(default)]
    pub loss: LossWeights,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub validation: ValidationConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentInit {
    /// BK-SDM: the student's weights are copied from the teacher by the copy map.
    #[default]
    Teacher,
    /// PyTorch's default initialisation (a from-scratch baseline).
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Image folder with metadata.jsonl / metadata.csv (`file_name`, `text`).
    pub path: Option<PathBuf>,
    /// A `sdkd preprocess` output folder, read instead of images.
    pub cache: Option<PathBuf>,
    pub resolution: u32,
    pub center_crop: bool,
    pub random_flip: bool,
    pub on_bad_sample: OnBadSample,
    // The shard keys are left out of the serialised config at their defaults, so that configs
    // without them hash (`config_hash`) as before and earlier checkpoints still resume.
    /// webdataset or parquet shards: a folder, a brace pattern (`laion/{00000..01023}.tar`) or a
    /// file listing one shard per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<String>,
    /// imagefolder, webdataset or parquet; detected from data.path / data.shards when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// The caption: webdataset `txt` or a json key; parquet a column (default `text`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// parquet: the image column, a {bytes, path} struct (default `image`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_column: Option<String>,
    /// Rows whose image's short side (from the metadata) is smaller are left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u32>,
    /// Rows whose long side / short side is larger are left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_aspect: Option<f64>,
    /// Conditions on json keys / parquet columns, e.g. `aesthetic_score: ">= 6.5"`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub filter: std::collections::BTreeMap<String, String>,
    /// Probability that a training sample's caption is replaced by the empty prompt (diffusers'
    /// `proportion_empty_prompts`; SD trained with 0.1), which teaches the unconditional
    /// prediction classifier-free guidance samples with.
    #[serde(skip_serializing_if = "is_zero")]
    pub caption_dropout: f64,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: None,
            cache: None,
            resolution: 512,
            center_crop: true,
            random_flip: true,
            on_bad_sample: OnBadSample::Skip,
            shards: None,
            format: None,
            caption: None,
            image_column: None,
            min_size: None,
            max_aspect: None,
            filter: Default::default(),
            caption_dropout: 0.0,
        }
    }
}

impl DataConfig {
    /// Where the images are (`data.shards` or `data.path`) and the key that says so.
    pub fn location(&self) -> Option<(String, &'static str)> {
        match (&self.shards, &self.path) {
            (Some(s), _) => Some((s.clone(), "data.shards")),
            (None, Some(p)) => Some((p.to_string_lossy().into_owned(), "data.path")),
            (None, None) => None,
        }
    }

    /// How to read the images (validated by `RunConfig::validate`).
    pub fn options(&self) -> std::result::Result<DataOptions, ConfigError> {
        let filters = Filters::from_config(self.min_size, self.max_aspect, &self.filter).map_err(|(k, m)| invalid(&k, m))?;
        Ok(DataOptions { format: self.format, caption: self.caption.clone(), image_column: self.image_column.clone(), filters })
    }
}

pub use crate::data::{DataFormat, DataOptions, Filters, OnBadSample};

/// λ weights of `loss = task + output_kd + Σ feature_kd` (BK-SDM's defaults: all 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    pub task: f64,
    pub output_kd: f64,
    pub feature_kd: f64,
}

impl Default for LossWeights {
    /// BK-SDM's defaults: all three λ = 1.
    fn default() -> Self {
        LossWeights { task: 1.0, output_kd: 1.0, feature_kd: 1.0 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
    /// Global grad-norm clip; null disables clipping.
    pub max_grad_norm: Option<f64>,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// The dtype AdamW keeps its two moments in (`distill::optim`).
    pub state_dtype: StateDtype,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 5.0e-5,
            betas: [0.9, 0.999],
            weight_decay: 0.01,
            eps: 1.0e-8,
            max_grad_norm: Some(1.0),
            schedule: Schedule::default(),
            warmup_steps: 0,
            state_dtype: StateDtype::default(),
        }
    }
}

/// `optim.state_dtype`: AdamW's moments in fp32, or in bf16 (half the memory; the update itself
/// still runs in fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    #[default]
    Fp32,
    Bf16,
}

impl StateDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            StateDtype::Fp32 => tch::Kind::Float,
            StateDtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// LR schedules with diffusers' `get_scheduler` semantics (see `distill::optim::lr_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// diffusers `constant`, or `constant_with_warmup` when warmup_steps > 0.
    #[default]
    Constant,
    /// diffusers `cosine` (half a cosine from lr to 0 after the warmup).
    Cosine,
    /// diffusers `linear` (straight from lr to 0 after the warmup).
    Linear,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Samples per micro-batch (one forward/backward).
    pub batch_size: usize,
    /// Micro-batches per optimizer step: the effective batch is batch_size x grad_accum.
    pub grad_accum: usize,
    /// Optimizer steps of the whole run.
    pub max_steps: u64,
    pub seed: u64,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// EMA of the student (e.g. 0.9999), starting from the student's initial weights; null = off.
    pub ema_decay: Option<f64>,
    /// diffusers' `--noise_offset`: noise += offset · N(0, 1) per (sample, channel); 0 = off.
    pub noise_offset: f64,
    /// Seconds a collective of a multi-process run (torchrun, SLURM) may wait for the other
    /// ranks before the run fails naming the lost rank (docs/distributed.md).
    pub dist_timeout_s: f64,
    /// What the student's backward recomputes instead of storing: `none`, `blocks`, `attention`.
    pub gradient_checkpointing: crate::models::Checkpointing,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 64,
            grad_accum: 4,
            max_steps: 50_000,
            seed: 42,
            device: DeviceChoice::default(),
            precision: Precision::default(),
            ema_decay: None,
            noise_offset: 0.0,
            dist_timeout_s: 1800.0,
            gradient_checkpointing: crate::models::Checkpointing::None,
        }
    }
}

fn named<S: serde::Serializer>(kind: &SchedulerKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kind.name())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Optimizer steps between checkpoints (one is always written at the end); 0 = only at the end.
    pub every: u64,
    /// Complete checkpoints kept (the newest is never deleted).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 500, keep: 3 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Optimizer steps between log lines and TensorBoard scalars.
    pub every: u64,
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { every: 10, tensorboard: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Optimizer steps between validation grids; 0 = off.
    pub every: u64,
    pub prompts: Vec<String>,
    /// Sampler steps per image.
    pub steps: u32,
    /// The sampler (unipc, ddim, euler, euler_a, dpmpp_2m, ddpm, pndm), checked when the config loads.
    #[serde(deserialize_with = "parsed", serialize_with = "named")]
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale (1 = no guidance).
    pub guidance_scale: f64,
    /// FID / IS / CLIP score of the student at a cadence (`sdkd eval`'s protocol on a caption subset).
    pub eval: EvalConfig,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            every: 1000,
            prompts: vec!["a toy panda standing on a pile of broccoli".to_string()],
            steps: 25,
            scheduler: SchedulerKind::Unipc,
            guidance_scale: 7.5,
            eval: EvalConfig::default(),
        }
    }
}

/// `validation.eval`: every `every` steps the student (its EMA when the run keeps one) draws
/// `count` captions by `sdkd eval --model`'s protocol (PNDM, 25 steps, guidance 7.5, one
/// generator seeded 1234), the images are scored, and `eval/fid`, `eval/is`, `eval/clip_score`
/// go to TensorBoard and `<output_dir>/eval/step-N/report.json`, so a checkpoint can be picked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Optimizer steps between evaluations; 0 = off.
    pub every: u64,
    /// Captions: a metadata.csv or .jsonl (file_name, text or caption), or COCO's captions_val2014.json.
    pub prompts: Option<PathBuf>,
    /// Images per evaluation: the first `count` captions, or a seeded sample with `sample_seed`.
    pub count: usize,
    pub sample_seed: Option<u32>,
    pub metrics: Vec<crate::eval::Metric>,
    /// Real images' folder or a pytorch-fid `.npz` (FID).
    pub real: Option<PathBuf>,
    /// pytorch-fid's Inception weights (FID, IS).
    pub inception: Option<PathBuf>,
    /// open_clip's weights (CLIP score).
    pub clip: Option<PathBuf>,
    #[serde(deserialize_with = "parsed", serialize_with = "named")]
    pub scheduler: SchedulerKind,
    pub steps: u32,
    pub guidance_scale: f64,
    pub seed: u64,
    pub seeding: crate::eval::generate::Seeding,
    /// Square image side in pixels; default: the student's `sample_size` times the VAE's factor.
    pub resolution: Option<i64>,
    /// FID and IS score copies resized to this size with Pillow's BICUBIC (BK-SDM's 256); 0 = as generated.
    pub score_size: u32,
    /// Prompts per UNet call (the images do not depend on it).
    pub batch_size: usize,
    /// Evaluate the EMA weights when the run keeps an EMA (`train.ema_decay`).
    pub ema: bool,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            every: 0,
            prompts: None,
            count: 1000,
            sample_seed: None,
            metrics: vec![crate::eval::Metric::Fid, crate::eval::Metric::Is],
            real: None,
            inception: None,
            clip: None,
            scheduler: SchedulerKind::Pndm,
            steps: 25,
            guidance_scale: 7.5,
            seed: 1234,
            seeding: crate::eval::generate::Seeding::Consecutive,
            resolution: None,
            score_size: 256,
            batch_size: 8,
            ema: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// Keys that may change between a run and its resumption without changing the trained function
/// (cadences, the step budget, where things go, which GPU): left out of `config_hash`.
/// `train.gradient_checkpointing` changes memory, not the computation; `optim.state_dtype` may be
/// switched on resume (the moments are converted, `AdamW::load_state_file`).
pub const RESUME_MUTABLE_KEYS: &[&str] = &[
    "output_dir",
    "train.max_steps",
    "train.device",
    "train.dist_timeout_s",
    "train.gradient_checkpointing",
    "optim.state_dtype",
    "checkpoint",
    "log",
    "validation",
];

impl RunConfig {
    /// Reads, parses, resolves relative paths against the file's folder, and validates.
    pub fn load(path: &Path) -> Result<RunConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading run config {}", path.display()))?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        Self::from_yaml(&text, &base, &path.display().to_string())
    }

    /// Parses YAML text whose relative paths are relative to `base_dir`; `source` names the text
    /// in errors (usually the file path).
    pub fn from_yaml(text: &str, base_dir: &Path, source: &str) -> Result<RunConfig> {
        // serde_yaml's message already names the key path and the line/column.
        let mut cfg: RunConfig = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        cfg.resolve_paths(base_dir);
        if let Err(e) = cfg.validate() {
            let at = line_of_key(text, &e.key).map(|l| format!(" (line {l})")).unwrap_or_default();
            bail!("invalid run config {source}{at}: {e}");
        }
        Ok(cfg)
    }

    /// The resolved config as YAML (written to `<output_dir>/config.yaml`).
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Makes every relative path absolute against `base`. The student is a path only when it
    /// looks like one (ends in .yaml/.yml or contains a separator); otherwise it is a preset name.
    pub fn resolve_paths(&mut self, base: &Path) {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(t) = self.teacher.as_mut().filter(|t| !crate::hub::is_hub_id(t, Some(base))) {
            abs(t);
        }
        abs(&mut self.output_dir);
        if let Some(p) = self.data.path.as_mut() {
            abs(p);
        }
        if let Some(p) = self.data.cache.as_mut() {
            abs(p);
        }
        if let Some(s) = self.data.shards.as_mut() {
            if Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).to_string_lossy().into_owned();
            }
        }
        let e = &mut self.validation.eval;
        for p in [&mut e.prompts, &mut e.real, &mut e.inception, &mut e.clip].into_iter().flatten() {
            abs(p);
        }
        if let Some(mut spec) = self.student_spec_path() {
            abs(&mut spec);
            self.student = spec.to_string_lossy().into_owned();
        }
    }

    /// The teacher as a local path (a hub id fetched into the Hugging Face cache as needed, at
    /// `revision` with `variant`), and the hub repository and commit when it was one.
    pub fn teacher_local(&self, want: crate::hub::Want) -> Result<Option<crate::hub::Resolved>> {
        let options = crate::hub::Options { revision: self.revision.clone(), variant: self.variant.clone() };
        self.teacher.as_deref().map(|t| crate::hub::resolve(t, want, &options).context("teacher")).transpose()
    }

    /// Resolves a hub-id teacher and records the commit in `revision` (a path teacher is left as
    /// it is). `recorded`: the commit an earlier run of this output_dir recorded, which a resume
    /// keeps unless `revision` names a commit itself.
    pub fn pin_teacher(&mut self, recorded: Option<&str>) -> Result<()> {
        if !self.teacher.as_deref().is_some_and(|t| crate::hub::is_hub_id(t, None)) {
            return Ok(());
        }
        if let Some(commit) = recorded.filter(|_| !self.revision.as_deref().is_some_and(crate::hub::cache::is_commit)) {
            self.revision = Some(commit.to_string());
        }
        if let Some(origin) = self.teacher_local(crate::hub::Want::Pipeline)?.and_then(|r| r.origin) {
            self.revision = Some(origin.commit);
            // `org/name@rev[/file]` becomes `org/name[/file]` with the commit in `revision`
            let id = self.teacher.as_deref().and_then(|t| t.to_str()).and_then(crate::hub::HubId::parse);
            if let Some(id) = id.filter(|i| i.revision.is_some()) {
                self.teacher = Some(PathBuf::from(crate::hub::HubId { revision: None, ..id }.to_string()));
            }
        }
        Ok(())
    }

    /// The spec file when `student` names one rather than a preset (made absolute by `resolve_paths`).
    pub fn student_spec_path(&self) -> Option<PathBuf> {
        let s = self.student.as_str();
        let looks_like_path = s.ends_with(".yaml") || s.ends_with(".yml") || s.contains('/') || s.contains('\\');
        looks_like_path.then(|| PathBuf::from(s))
    }

    /// True when the run trains on the task loss alone from random weights: no teacher UNet needed.
    pub fn from_scratch(&self) -> bool {
        self.student_init == StudentInit::Random && !self.distill
    }

    /// Range and cross-key checks; each message names the key and the value at fault.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.student.trim().is_empty() {
            return Err(invalid(
                "student",
                "student is empty: give a preset (bk_base, bk_small, bk_tiny) or a spec YAML path".to_string(),
            ));
        }
        if self.output_dir.as_os_str().is_empty() {
            return Err(invalid("output_dir", "output_dir is empty".to_string()));
        }
        if self.teacher.is_none() {
            if self.student_init == StudentInit::Teacher {
                return Err(invalid("teacher", "teacher is null but student_init = teacher: the student's weights come from the teacher (use student_init: random for a from-scratch run)".to_string()));
            }
            if self.distill {
                return Err(invalid("teacher", "teacher is null but distill = true: distillation needs the teacher (use distill: false for a from-scratch run)".to_string()));
            }
            if self.data.cache.is_none() {
                return Err(invalid("teacher", "teacher is null and data.cache is not set: without a teacher pipeline there is no VAE or text encoder to encode raw images; run `sdkd preprocess` and set data.cache".to_string()));
            }
            if self.validation.every > 0 {
                return Err(invalid("teacher", format!("teacher is null but validation.every = {}: validation images need the teacher pipeline's VAE and text encoder; set validation.every: 0", self.validation.every)));
            }
        }
        let d = &self.data;
        if d.path.is_none() && d.cache.is_none() && d.shards.is_none() {
            return Err(invalid(
                "data.path",
                "data: set data.path (an image folder), data.shards (webdataset or parquet shards) or data.cache (a `sdkd preprocess` output)".to_string(),
            ));
        }
        if d.path.is_some() && d.shards.is_some() {
            return Err(invalid("data.shards", "data: set data.path (an image folder) or data.shards (webdataset or parquet shards), not both".to_string()));
        }
        if d.format == Some(DataFormat::Imagefolder) && d.shards.is_some() {
            return Err(invalid("data.format", "data.format = imagefolder but data.shards is set: an imagefolder is given by data.path".to_string()));
        }
        if d.shards.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(invalid("data.shards", "data.shards is empty".to_string()));
        }
        if d.min_size == Some(0) {
            return Err(invalid("data.min_size", "data.min_size = 0: must be at least 1 (or leave it out)".to_string()));
        }
        for (key, v) in [("data.caption", &d.caption), ("data.image_column", &d.image_column)] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, format!("{key} is empty: name a field or column (or leave it out)")));
            }
        }
        d.options()?;
        if !(0.0..=1.0).contains(&d.caption_dropout) {
            return Err(invalid(
                "data.caption_dropout",
                format!("data.caption_dropout = {}: must be a probability in [0, 1]", d.caption_dropout),
            ));
        }
        if d.caption_dropout > 0.0 && self.teacher.is_none() {
            return Err(invalid(
                "data.caption_dropout",
                format!("data.caption_dropout = {} needs the empty prompt's embedding from the text encoder that made data.cache: set teacher to its pipeline", d.caption_dropout),
            ));
        }
        if d.resolution == 0 || !d.resolution.is_multiple_of(8) {
            return Err(invalid(
                "data.resolution",
                format!(
                    "data.resolution = {}: must be a positive multiple of 8 (the VAE downsamples by 8)",
                    d.resolution
                ),
            ));
        }
        for (key, v) in [
            ("loss.task", self.loss.task),
            ("loss.output_kd", self.loss.output_kd),
            ("loss.feature_kd", self.loss.feature_kd),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, format!("{key} = {v}: must be a finite number >= 0")));
            }
        }
        let active =
            if self.distill { self.loss.task + self.loss.output_kd + self.loss.feature_kd } else { self.loss.task };
        if active == 0.0 {
            let which = if self.distill {
                "loss.task, loss.output_kd and loss.feature_kd are all 0"
            } else {
                "loss.task = 0 with distill = false"
            };
            return Err(invalid("loss", format!("{which}: nothing to train on")));
        }
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid("optim.lr", format!("optim.lr = {}: must be > 0", o.lr)));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(invalid("optim.betas", format!("optim.betas[{i}] = {b}: must be in [0, 1)")));
            }
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(invalid(
                "optim.weight_decay",
                format!("optim.weight_decay = {}: must be >= 0", o.weight_decay),
            ));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(invalid("optim.eps", format!("optim.eps = {}: must be > 0", o.eps)));
        }
        if let Some(n) = o.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(invalid(
                    "optim.max_grad_norm",
                    format!("optim.max_grad_norm = {n}: must be > 0 (or null to disable clipping)"),
                ));
            }
        }
        let t = &self.train;
        if o.warmup_steps > t.max_steps {
            return Err(invalid(
                "optim.warmup_steps",
                format!("optim.warmup_steps = {} exceeds train.max_steps = {}", o.warmup_steps, t.max_steps),
            ));
        }
        if t.batch_size < 1 {
            return Err(invalid("train.batch_size", format!("train.batch_size = {}: must be >= 1", t.batch_size)));
        }
        if t.grad_accum < 1 {
            return Err(invalid("train.grad_accum", format!("train.grad_accum = {}: must be >= 1", t.grad_accum)));
        }
        if t.max_steps < 1 {
            return Err(invalid("train.max_steps", format!("train.max_steps = {}: must be >= 1", t.max_steps)));
        }
        if let Some(e) = t.ema_decay {
            if !(e > 0.0 && e < 1.0) {
                return Err(invalid(
                    "train.ema_decay",
                    format!("train.ema_decay = {e}: must be in (0, 1) (or null for no EMA)"),
                ));
            }
        }
        if !(t.dist_timeout_s.is_finite() && t.dist_timeout_s > 0.0 && t.dist_timeout_s <= 7.0 * 86400.0) {
            return Err(invalid(
                "train.dist_timeout_s",
                format!("train.dist_timeout_s = {}: must be > 0 and at most a week (604800)", t.dist_timeout_s),
            ));
        }
        if !(t.noise_offset.is_finite() && t.noise_offset >= 0.0) {
            return Err(invalid(
                "train.noise_offset",
                format!("train.noise_offset = {}: must be >= 0", t.noise_offset),
            ));
        }
        if self.checkpoint.keep < 1 {
            return Err(invalid(
                "checkpoint.keep",
                format!("checkpoint.keep = {}: must be >= 1", self.checkpoint.keep),
            ));
        }
        if self.log.every < 1 {
            return Err(invalid("log.every", format!("log.every = {}: must be >= 1", self.log.every)));
        }
        let v = &self.validation;
        if v.every > 0 {
            if v.prompts.is_empty() {
                return Err(invalid("validation.prompts", format!("validation.prompts is empty but validation.every = {}: give at least one prompt or set every: 0", v.every)));
            }
            if let Some(i) = v.prompts.iter().position(|p| p.trim().is_empty()) {
                return Err(invalid("validation.prompts", format!("validation.prompts[{i}] is empty")));
            }
        }
        if v.steps < 1 {
            return Err(invalid("validation.steps", format!("validation.steps = {}: must be >= 1", v.steps)));
        }
        if !(v.guidance_scale.is_finite() && v.guidance_scale >= 0.0) {
            return Err(invalid(
                "validation.guidance_scale",
                format!("validation.guidance_scale = {}: must be >= 0", v.guidance_scale),
            ));
        }
        self.validate_eval()
    }

    fn validate_eval(&self) -> std::result::Result<(), ConfigError> {
        use crate::eval::Metric;
        let e = &self.validation.eval;
        if e.every == 0 {
            return Ok(());
        }
        let every = e.every;
        if self.teacher.is_none() {
            return Err(invalid("teacher", format!("teacher is null but validation.eval.every = {every}: generating needs the teacher pipeline's VAE and text encoder; set validation.eval.every: 0")));
        }
        if e.prompts.is_none() {
            return Err(invalid("validation.eval.prompts", format!("validation.eval.every = {every} but validation.eval.prompts is not set: give a metadata.csv, .jsonl or captions_val2014.json")));
        }
        if e.metrics.is_empty() {
            return Err(invalid("validation.eval.metrics", "validation.eval.metrics is empty: give one or more of fid, is, clip".to_string()));
        }
        let needs = |m: Metric, key: &str, what: &Option<PathBuf>, help: &str| match e.metrics.contains(&m) && what.is_none() {
            true => Err(invalid(&format!("validation.eval.{key}"), format!("validation.eval.metrics has {} but validation.eval.{key} is not set: {help}", format!("{m:?}").to_lowercase()))),
            false => Ok(()),
        };
        needs(Metric::Fid, "real", &e.real, "give the real images' folder or a pytorch-fid .npz")?;
        needs(Metric::Fid, "inception", &e.inception, "give pytorch-fid's pt_inception-2015-12-05-6726825d.pth")?;
        needs(Metric::Is, "inception", &e.inception, "give pytorch-fid's pt_inception-2015-12-05-6726825d.pth")?;
        needs(Metric::Clip, "clip", &e.clip, "give open_clip's open_clip_pytorch_model.bin or open_clip_model.safetensors")?;
        for (key, value, min) in [("count", e.count, 1), ("batch_size", e.batch_size, 1), ("steps", e.steps as usize, 1)] {
            if value < min {
                return Err(invalid(&format!("validation.eval.{key}"), format!("validation.eval.{key} = {value}: must be >= {min}")));
            }
        }
        if e.metrics.contains(&Metric::Is) && e.count < crate::eval::inception_score::SPLITS {
            let splits = crate::eval::inception_score::SPLITS;
            return Err(invalid("validation.eval.count", format!("validation.eval.count = {}: the Inception Score's {splits} splits need at least {splits} images", e.count)));
        }
        if !(e.guidance_scale.is_finite() && e.guidance_scale >= 0.0) {
            return Err(invalid("validation.eval.guidance_scale", format!("validation.eval.guidance_scale = {}: must be >= 0", e.guidance_scale)));
        }
        if let Some(r) = e.resolution.filter(|&r| r < 8) {
            return Err(invalid("validation.eval.resolution", format!("validation.eval.resolution = {r}: must be >= 8 pixels")));
        }
        if e.seeding == crate::eval::generate::Seeding::Consecutive && matches!(e.scheduler, SchedulerKind::Ddpm | SchedulerKind::EulerAncestral) {
            return Err(invalid(
                "validation.eval.seeding",
                format!("validation.eval.scheduler {} draws step noise, which seeding: consecutive cannot keep batch-invariant: set seeding: per-image", e.scheduler),
            ));
        }
        Ok(())
    }

    /// The part of the config that defines the trained function: everything but
    /// `RESUME_MUTABLE_KEYS`, as JSON with sorted keys. Stored in checkpoints so a refused resume
    /// can name the keys that differ (`identity_diff`).
    pub fn resume_identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("RunConfig serialises to JSON");
        for key in RESUME_MUTABLE_KEYS {
            remove_path(&mut v, key);
        }
        sort_keys(v)
    }

    /// A stable 64-bit FNV-1a hash (16 hex digits) of `resume_identity`: equal across runs,
    /// machines and sdkd builds for equal configs.
    pub fn config_hash(&self) -> String {
        let text = serde_json::to_string(&self.resume_identity()).expect("JSON value serialises");
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }
}

/// Dotted keys whose values differ between two `resume_identity` values (for error messages).
pub fn identity_diff(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    let null = serde_json::Value::Null;
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(format!("{prefix}: {a} vs {b}")),
            _ => {}
        }
    }
    let mut out = vec![];
    walk("", a, b, &mut out);
    out
}

/// A value out of range or an inconsistent combination; `key` is the dotted key at fault
/// (`RunConfig::from_yaml` adds the line where the key appears).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn invalid(key: &str, message: String) -> ConfigError {
    ConfigError { key: key.to_string(), message }
}

/// The 1-based line where a dotted key (`train.batch_size`) is set in block-style YAML, if found.
fn line_of_key(text: &str, dotted: &str) -> Option<usize> {
    let parts: Vec<&str> = dotted.split('.').collect();
    let mut depth = 0; // how many parts have matched
    let mut indents: Vec<usize> = vec![];
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        while let Some(&i) = indents.last() {
            if indent <= i {
                indents.pop();
                depth -= 1;
            } else {
                break;
            }
        }
        let key = trimmed.split(':').next().unwrap_or("").trim().trim_matches(|c| c == '"' || c == '\'');
        if depth < parts.len() && key == parts[depth] && trimmed.contains(':') {
            depth += 1;
            indents.push(indent);
            if depth == parts.len() {
                return Some(n + 1);
            }
        }
    }
    None
}

fn remove_path(v: &mut serde_json::Value, dotted: &str) {
    let mut parts: Vec<&str> = dotted.split('.').collect();
    let last = parts.pop().expect("non-empty key");
    let mut cur = v;
    for p in parts {
        match cur.get_mut(p) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(obj) = cur.as_object_mut() {
        obj.remove(last);
    }
}

fn sort_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                map.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "teacher: models/sd15\nstudent: bk_small\noutput_dir: runs/x\ndata:\n  path: data/set\n";

    fn parse(text: &str) -> Result<RunConfig> {
        RunConfig::from_yaml(text, Path::new("/base"), "run.yaml")
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("config should be rejected"))
    }

    #[test]
    fn shard_keys_are_checked_and_leave_older_hashes_alone() {
        let c = parse(MINIMAL).unwrap();
        let data: Vec<String> = c.resume_identity()["data"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(data, ["cache", "center_crop", "on_bad_sample", "path", "random_flip", "resolution"], "configs without shard keys hash as before");
        let shards = MINIMAL.replace("  path: data/set\n", "  shards: laion/{00000..00009}.tar\n  filter: {aesthetic_score: \">= 6.5\"}\n  min_size: 256\n");
        let s = parse(&shards).unwrap();
        assert_eq!(s.data.shards.as_deref(), Some("/base/laion/{00000..00009}.tar"));
        assert_eq!(s.data.location(), Some(("/base/laion/{00000..00009}.tar".to_string(), "data.shards")));
        assert_ne!(s.config_hash(), c.config_hash());
        for (yaml, key) in [
            ("  filter: {aesthetic_score: \"high\"}\n", "data.filter.aesthetic_score"),
            ("  max_aspect: 0\n", "data.max_aspect"),
            ("  min_size: 0\n", "data.min_size"),
            ("  format: tiff\n", "data.format"),
            ("  caption: \" \"\n", "data.caption"),
            ("  path: d\n", "data.shards"),
            ("  format: imagefolder\n", "data.format"),
        ] {
            let base = MINIMAL.replace("  path: data/set\n", "  shards: laion/{00000..00009}.tar\n");
            let e = err(&format!("{base}{yaml}"));
            assert!(e.contains(key), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn defaults_follow_bk_sdm() {
        let c = parse(MINIMAL).unwrap();
        // no /base/models/sd15: `models/sd15` reads as a hub id and is kept as written; `./` makes it a path
        assert_eq!(c.teacher.as_deref(), Some(Path::new("models/sd15")));
        let path = parse(&MINIMAL.replace("models/sd15", "./models/sd15")).unwrap();
        assert_eq!(path.teacher.as_deref(), Some(Path::new("/base/./models/sd15")));
        assert_eq!(c.output_dir, Path::new("/base/runs/x"));
        assert_eq!(c.data.path.as_deref(), Some(Path::new("/base/data/set")));
        assert_eq!((c.data.resolution, c.data.center_crop, c.data.random_flip), (512, true, true));
        assert_eq!(c.data.on_bad_sample, OnBadSample::Skip);
        assert_eq!(c.loss, LossWeights { task: 1.0, output_kd: 1.0, feature_kd: 1.0 });
        assert_eq!(c.optim, OptimConfig::default());
        assert_eq!((c.optim.lr, c.optim.betas, c.optim.weight_decay, c.optim.eps), (5e-5, [0.9, 0.999], 0.01, 1e-8));
        assert_eq!(c.optim.max_grad_norm, Some(1.0));
        assert_eq!((c.optim.schedule, c.optim.warmup_steps), (Schedule::Constant, 0));
        let t = &c.train;
        assert_eq!((t.batch_size, t.grad_accum, t.max_steps, t.seed), (64, 4, 50_000, 42));
        assert_eq!((t.device, t.precision, t.ema_decay), (DeviceChoice::Auto, Precision::Bf16, None));
        assert_eq!((c.checkpoint.every, c.checkpoint.keep), (500, 3));
        assert_eq!((c.log.every, c.log.tensorboard), (10, true));
        assert_eq!((c.validation.every, c.validation.steps, c.validation.scheduler), (1000, 25, SchedulerKind::Unipc));
        assert_eq!(c.validation.prompts, vec!["a toy panda standing on a pile of broccoli"]);
        assert_eq!((c.student_init, c.distill), (StudentInit::Teacher, true));
    }

    #[test]
    fn a_validation_scheduler_typo_is_refused_at_load() {
        let e = err(&format!("{MINIMAL}validation:\n  scheduler: unipcc\n"));
        assert!(e.contains("validation.scheduler") && e.contains("unipcc") && e.contains("line 7"), "{e}");
        assert_eq!(parse(&format!("{MINIMAL}validation:\n  scheduler: DDIM\n")).unwrap().validation.scheduler, SchedulerKind::Ddim);
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let e = err(&format!("{MINIMAL}  resolutoin: 256\n"));
        assert!(e.contains("resolutoin") && e.contains("line 6"), "{e}");
        let e = err(&format!("{MINIMAL}optimiser:\n  lr: 1.0\n"));
        assert!(e.contains("optimiser") && e.contains("line 6"), "{e}");
        let e = err(&format!("{MINIMAL}train:\n  batch: 3\n"));
        assert!(e.contains("batch") && e.contains("train"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_key() {
        for (yaml, key) in [
            ("train:\n  batch_size: big\n", "train.batch_size"),
            ("train:\n  batch_size: -1\n", "train.batch_size"),
            ("optim:\n  lr: fast\n", "optim.lr"),
            ("optim:\n  betas: [0.9]\n", "optim.betas"),
            ("optim:\n  schedule: step\n", "optim.schedule"),
            ("train:\n  precision: fp8\n", "train.precision"),
            ("train:\n  device: gpu\n", "train.device"),
            ("train:\n  device: cuda:x\n", "train.device"),
            ("data:\n  path: d\n  on_bad_sample: ignore\n", "data.on_bad_sample"),
            ("student_init: zeros\n", "student_init"),
            ("log:\n  tensorboard: sometimes\n", "log.tensorboard"),
            ("validation:\n  prompts: 3\n", "validation.prompts"),
        ] {
            // Later keys replace the minimal ones; serde_yaml refuses duplicates, so rebuild.
            let base: String = MINIMAL
                .lines()
                .filter(|l| !(yaml.starts_with("data:") && (l.starts_with("data:") || l.starts_with("  path"))))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = err(&format!("{base}{yaml}"));
            assert!(e.contains(key), "{yaml:?}: {e}");
            assert!(e.contains("line"), "{yaml:?}: no line in {e}");
        }
    }

    #[test]
    fn out_of_range_values_name_key_and_value() {
        for (yaml, needle) in [
            ("optim:\n  lr: 0\n", "optim.lr = 0"),
            ("optim:\n  lr: -1.0e-4\n", "optim.lr = -0.0001"),
            ("optim:\n  betas: [0.9, 1.0]\n", "optim.betas[1] = 1"),
            ("optim:\n  betas: [-0.1, 0.9]\n", "optim.betas[0] = -0.1"),
            ("optim:\n  eps: 0\n", "optim.eps = 0"),
            ("optim:\n  weight_decay: -0.01\n", "optim.weight_decay = -0.01"),
            ("optim:\n  max_grad_norm: 0\n", "optim.max_grad_norm = 0"),
            ("optim:\n  warmup_steps: 11\ntrain:\n  max_steps: 10\n", "optim.warmup_steps = 11"),
            ("train:\n  batch_size: 0\n", "train.batch_size = 0"),
            ("train:\n  grad_accum: 0\n", "train.grad_accum = 0"),
            ("train:\n  max_steps: 0\n", "train.max_steps = 0"),
            ("train:\n  ema_decay: 1.0\n", "train.ema_decay = 1"),
            ("train:\n  ema_decay: 0\n", "train.ema_decay = 0"),
            ("train:\n  noise_offset: -0.1\n", "train.noise_offset = -0.1"),
            ("train:\n  dist_timeout_s: 0\n", "train.dist_timeout_s = 0"),
            ("loss:\n  feature_kd: -1\n", "loss.feature_kd = -1"),
            ("loss:\n  task: .nan\n", "loss.task = NaN"),
            ("loss:\n  task: 0\n  output_kd: 0\n  feature_kd: 0\n", "all 0"),
            ("checkpoint:\n  keep: 0\n", "checkpoint.keep = 0"),
            ("log:\n  every: 0\n", "log.every = 0"),
            ("validation:\n  steps: 0\n", "validation.steps = 0"),
            ("validation:\n  prompts: []\n", "validation.prompts"),
            ("validation:\n  guidance_scale: -1\n", "validation.guidance_scale = -1"),
        ] {
            let e = err(&format!("{MINIMAL}{yaml}"));
            assert!(e.contains(needle), "{yaml:?}: {e}");
            assert!(e.contains("run.yaml"), "{yaml:?}: no file in {e}");
        }
        let e = err("teacher: t\nstudent: bk_small\noutput_dir: o\ndata:\n  path: d\n  resolution: 500\n");
        assert!(e.contains("data.resolution = 500") && e.contains("(line 6)"), "{e}");
        let e = err(&format!("{MINIMAL}log:\n  tensorboard: true\n  # why not\n  every: 0\n"));
        assert!(e.contains("log.every = 0") && e.contains("(line 9)"), "{e}");
        let e = err("teacher: t\nstudent: bk_small\noutput_dir: o\ndata:\n  resolution: 512\n");
        assert!(e.contains("data.path") && e.contains("data.cache"), "{e}");
        // Validation off: an empty prompt list is fine.
        parse(&format!("{MINIMAL}validation:\n  every: 0\n  prompts: []\n")).unwrap();
    }

    #[test]
    fn teacher_may_be_null_only_from_scratch() {
        let body = "student: bk_small\noutput_dir: o\ndata:\n  cache: c\nvalidation:\n  every: 0\n";
        assert!(err(body).contains("student_init"));
        assert!(err(&format!("{body}student_init: random\n")).contains("distill"));
        let c = parse(&format!("{body}student_init: random\ndistill: false\n")).unwrap();
        assert!(c.from_scratch() && c.teacher.is_none());
        let c = parse(&format!("teacher: null\n{body}student_init: random\ndistill: false\n")).unwrap();
        assert!(c.teacher.is_none());
        let no_cache = "student: bk_small\noutput_dir: o\ndata:\n  path: d\nvalidation:\n  every: 0\nstudent_init: random\ndistill: false\n";
        assert!(err(no_cache).contains("data.cache"));
        let with_val = "student: bk_small\noutput_dir: o\ndata:\n  cache: c\nstudent_init: random\ndistill: false\n";
        assert!(err(with_val).contains("validation.every"));
        // distill: false needs only the task weight.
        parse(&format!("{MINIMAL}distill: false\nloss:\n  output_kd: 0\n  feature_kd: 0\n")).unwrap();
        assert!(err(&format!("{MINIMAL}distill: false\nloss:\n  task: 0\n")).contains("loss.task = 0"));
    }

    #[test]
    fn devices_and_paths() {
        for (s, d) in [
            ("auto", DeviceChoice::Auto),
            ("cpu", DeviceChoice::Cpu),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            let c = parse(&format!("{MINIMAL}train:\n  device: {s}\n")).unwrap();
            assert_eq!(c.train.device, d);
        }
        assert_eq!(DeviceChoice::Cuda(2).to_string(), "cuda:2");
        let c = parse("teacher: /abs/t\nstudent: specs/mine.yaml\noutput_dir: /abs/o\ndata:\n  cache: ../c\n").unwrap();
        assert_eq!(c.teacher.as_deref(), Some(Path::new("/abs/t")));
        assert_eq!(c.student, "/base/specs/mine.yaml");
        assert_eq!(c.student_spec_path().as_deref(), Some(Path::new("/base/specs/mine.yaml")));
        assert_eq!(c.data.cache.as_deref(), Some(Path::new("/base/../c")));
        assert_eq!(parse(MINIMAL).unwrap().student_spec_path(), None);
    }

    #[test]
    fn yaml_round_trip() {
        let c =
            parse(&format!("{MINIMAL}train:\n  ema_decay: 0.9999\n  device: cuda:1\noptim:\n  max_grad_norm: null\n"))
                .unwrap();
        let again = parse(&c.to_yaml().unwrap()).unwrap();
        assert_eq!(c, again);
        assert_eq!(again.optim.max_grad_norm, None);
    }

    #[test]
    fn hash_ignores_resume_mutable_keys_only() {
        let a = parse(MINIMAL).unwrap();
        let h = a.config_hash();
        assert_eq!(h.len(), 16);
        assert_eq!(h, parse(MINIMAL).unwrap().config_hash(), "hash is deterministic");
        for extra in [
            "train:\n  max_steps: 7\n  device: cpu\n",
            "checkpoint:\n  every: 3\n  keep: 9\n",
            "log:\n  every: 1\n  tensorboard: false\n",
            "validation:\n  every: 0\n",
        ] {
            let b = parse(&format!("{MINIMAL}{extra}")).unwrap();
            assert_eq!(h, b.config_hash(), "{extra:?} must not change the hash");
        }
        let moved = parse(&MINIMAL.replace("runs/x", "runs/elsewhere")).unwrap();
        assert_eq!(h, moved.config_hash(), "output_dir must not change the hash");
        for extra in [
            "train:\n  seed: 1\n",
            "optim:\n  lr: 1.0e-4\n",
            "loss:\n  feature_kd: 0.5\n",
            "train:\n  batch_size: 8\n",
            "distill: false\n",
        ] {
            let b = parse(&format!("{MINIMAL}{extra}")).unwrap();
            assert_ne!(h, b.config_hash(), "{extra:?} must change the hash");
            let diff = identity_diff(&a.resume_identity(), &b.resume_identity());
            assert_eq!(diff.len(), 1, "{diff:?}");
        }
        let b = parse(&MINIMAL.replace("bk_small", "bk_tiny")).unwrap();
        let diff = identity_diff(&a.resume_identity(), &b.resume_identity());
        assert_eq!(diff, vec!["student: \"bk_small\" vs \"bk_tiny\"".to_string()]);
    }

    #[test]
    fn every_example_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let c = RunConfig::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
                assert!(c.output_dir.is_absolute() && c.teacher.as_ref().unwrap().is_absolute());
                seen += 1;
            }
        }
        assert!(seen >= 4, "only {seen} example configs in {}", dir.display());
        for preset in ["base", "small", "tiny"] {
            let c = RunConfig::load(&dir.join(format!("sd15_bk_{preset}.yaml"))).unwrap();
            assert_eq!(c.student, format!("bk_{preset}"));
            let t = &c.train;
            assert_eq!((t.batch_size, t.grad_accum, t.max_steps, t.precision), (64, 4, 50_000, Precision::Bf16));
            assert_eq!(
                (c.optim.lr, c.optim.schedule, c.data.resolution, c.checkpoint.every),
                (5e-5, Schedule::Constant, 512, 500)
            );
        }
        let tiny = RunConfig::load(&dir.join("tiny_cpu.yaml")).unwrap();
        assert_eq!((tiny.train.device, tiny.train.precision), (DeviceChoice::Cpu, Precision::Fp32));
    }
}
