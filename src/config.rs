//! The run YAML of `sdkd train`, parsed once into typed structs.
//!
//! Defaults follow BK-SDM's training script: batch 64 x 4, constant lr 5e-5, 50K steps, 512 px.
//! Unknown keys are errors naming the key and line (serde_yaml reports both); `validate` checks
//! ranges and cross-key rules with messages naming the key and value. Relative paths resolve
//! against the config file's directory, so a run directory can be launched from anywhere.
//! docs/config.md documents every key: keep the two in step.
//!
//! Each section is beside what it configures, with the checks that need no other section
//! (`DataConfig` in `data/config.rs`, `LossWeights` in `distill/loss.rs`, `OptimConfig` in
//! `distill/optim.rs`, `LogConfig` in `distill/scalars.rs`, `StudentChoice` in
//! `distill/student.rs`, `EvalConfig` in `eval/config.rs`, `DeviceChoice` and `Precision` in
//! `runtime.rs`); `RunConfig` composes them and keeps only the rules across sections.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::config_error::ConfigError;
use crate::config_error::invalid;
pub use crate::data::config::DataConfig;
pub use crate::data::{DataFormat, DataOptions, Filters, OnBadSample};
pub use crate::distill::lcm::{ConsistencyLoss, LcmConfig, Method};
pub use crate::distill::loss::LossWeights;
pub use crate::distill::optim::{OptimConfig, Schedule, StateDtype};
pub use crate::distill::scalars::LogConfig;
pub use crate::distill::student::StudentChoice;
pub use crate::eval::config::EvalConfig;
pub use crate::lora::config::LoraConfig;
pub use crate::runtime::{DeviceChoice, Precision};
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
    /// A preset (`bk_base`, `bk_small`, `bk_tiny`, aliases), a spec YAML or a UNet config.
    pub student: StudentChoice,
    pub output_dir: PathBuf,
    /// Where the student's weights start: copied from the teacher, or PyTorch's default init.
    #[serde(default)]
    pub student_init: StudentInit,
    /// false = task loss only: the teacher UNet never runs and the KD weights are ignored.
    #[serde(default = "yes")]
    pub distill: bool,
    /// `kd` (BK-SDM's objective) or `lcm` (latent consistency distillation, the `lcm:` section).
    /// Left out of the serialised config at `kd`, so configs written before it keep their hash.
    #[serde(default, skip_serializing_if = "Method::is_kd")]
    pub method: Method,
    #[serde(default, skip_serializing_if = "LcmConfig::is_default")]
    pub lcm: LcmConfig,
    /// Train LoRA adapters on the frozen student instead of the student itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
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

impl TrainConfig {
    /// The `train.*` checks; each message names the key and value.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let t = self;
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
        Ok(())
    }
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

impl CheckpointConfig {
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.keep < 1 {
            return Err(invalid("checkpoint.keep", format!("checkpoint.keep = {}: must be >= 1", self.keep)));
        }
        Ok(())
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
    pub scheduler: SchedulerKind,
    /// Classifier-free guidance scale (1 = no guidance); an LCM student embeds `guidance_scale − 1`.
    pub guidance_scale: f64,
    /// `method: lcm`: the LCM step counts the student is sampled at, one grid row each (under the
    /// teacher's row at `steps` with `scheduler`), on the run's `lcm:` grid.
    #[serde(skip_serializing_if = "is_default_lcm_steps")]
    pub lcm_steps: Vec<u32>,
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
            lcm_steps: DEFAULT_LCM_STEPS.to_vec(),
            eval: EvalConfig::default(),
        }
    }
}

/// The LCM step counts of diffusers' LCM examples and the LCM paper's tables.
const DEFAULT_LCM_STEPS: [u32; 4] = [1, 2, 4, 8];

fn is_default_lcm_steps(steps: &Vec<u32>) -> bool {
    steps[..] == DEFAULT_LCM_STEPS
}

impl ValidationConfig {
    /// The validation grid's checks (`eval` has its own); each message names the key and value.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let v = self;
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
        if v.lcm_steps.is_empty() || v.lcm_steps.contains(&0) {
            return Err(invalid("validation.lcm_steps", format!("validation.lcm_steps = {:?}: give at least one step count, each >= 1", v.lcm_steps)));
        }
        if !(v.guidance_scale.is_finite() && v.guidance_scale >= 0.0) {
            return Err(invalid(
                "validation.guidance_scale",
                format!("validation.guidance_scale = {}: must be >= 0", v.guidance_scale),
            ));
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}

/// Keys that may change between a run and its resumption without changing the trained function
/// (cadences, the step budget, where things go, which GPU): left out of `config_hash`.
/// `train.gradient_checkpointing` changes memory, not the computation; `optim.state_dtype` may be
/// switched on resume (the moments are converted, `AdamW::load_state_file`); `optim.shard_state`
/// changes where the moments live, not their values (checkpoints hold them whole).
pub const RESUME_MUTABLE_KEYS: &[&str] = &[
    "output_dir",
    "train.max_steps",
    "train.device",
    "train.dist_timeout_s",
    "train.gradient_checkpointing",
    "optim.state_dtype",
    "optim.shard_state",
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
            let at = e.line_in(text).map(|l| format!(" (line {l})")).unwrap_or_default();
            bail!("invalid run config {source}{at}: {e}");
        }
        Ok(cfg)
    }

    /// The resolved config as YAML (written to `<output_dir>/config.yaml`).
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Makes every relative path absolute against `base` (the student's when it reads as a path,
    /// `StudentChoice::resolve_against`).
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
        self.data.resolve_paths(base);
        self.validation.eval.resolve_paths(base);
        self.lcm.resolve_paths(base);
        if let Some(l) = &mut self.lora {
            l.resolve_paths(base);
        }
        self.student.resolve_against(base);
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

    /// True when the run trains on the task loss alone from random weights: no teacher UNet needed.
    pub fn from_scratch(&self) -> bool {
        self.student_init == StudentInit::Random && !self.distill
    }

    /// Each section's checks and the rules across sections, in the order of the YAML's keys;
    /// each message names the key and the value at fault.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.output_dir.as_os_str().is_empty() {
            return Err(invalid("output_dir", "output_dir is empty".to_string()));
        }
        if self.teacher.is_none() {
            self.validate_without_teacher()?;
        }
        self.data.validate()?;
        if self.data.caption_dropout > 0.0 && self.teacher.is_none() {
            return Err(invalid(
                "data.caption_dropout",
                format!("data.caption_dropout = {} needs the empty prompt's embedding from the text encoder that made data.cache: set teacher to its pipeline", self.data.caption_dropout),
            ));
        }
        self.validate_method()?;
        self.validate_lora()?;
        self.loss.validate()?;
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
        self.optim.validate()?;
        if self.optim.warmup_steps > self.train.max_steps {
            return Err(invalid(
                "optim.warmup_steps",
                format!("optim.warmup_steps = {} exceeds train.max_steps = {}", self.optim.warmup_steps, self.train.max_steps),
            ));
        }
        self.train.validate()?;
        self.checkpoint.validate()?;
        self.log.validate()?;
        self.validation.validate()?;
        let every = self.validation.eval.every;
        if every > 0 && self.teacher.is_none() {
            return Err(invalid("teacher", format!("teacher is null but validation.eval.every = {every}: generating needs the teacher pipeline's VAE and text encoder; set validation.eval.every: 0")));
        }
        self.validation.eval.validate()
    }

    /// `method` against the sections it uses: an `lcm:` section only with `method: lcm`, and LCD
    /// needs the teacher and trains on its own loss.
    fn validate_method(&self) -> std::result::Result<(), ConfigError> {
        if self.method == Method::Kd {
            if !self.lcm.is_default() {
                return Err(invalid("lcm", "an lcm: section is set but method is kd: set method: lcm (or remove the section)".to_string()));
            }
            if !is_default_lcm_steps(&self.validation.lcm_steps) {
                return Err(invalid("validation.lcm_steps", "validation.lcm_steps is set but method is kd (its grid samples the student with validation.scheduler): set method: lcm or remove the key".to_string()));
            }
            return Ok(());
        }
        self.lcm.validate()?;
        if !self.distill || self.teacher.is_none() {
            return Err(invalid("distill", "method: lcm needs the teacher (its guided ODE step is the target): set teacher and distill: true".to_string()));
        }
        if self.loss != LossWeights::default() {
            return Err(invalid(
                "loss",
                "method: lcm takes no loss: section: output KD beside the consistency loss is lcm.output_kd (its weight, default 0; the loss: section's BK-SDM defaults of 1 would turn it on unasked); \
                 feature KD is not offered, as no teacher feature matches the guided target (CFG mixes the outputs of two teacher calls, not their activations), and the task loss regresses the noise, which an LCM student does not predict (docs/config.md)"
                    .to_string(),
            ));
        }
        if self.train.noise_offset != 0.0 {
            return Err(invalid("train.noise_offset", format!("train.noise_offset = {}: method: lcm noises with the DDIM solver's timesteps and no offset; set it to 0", self.train.noise_offset)));
        }
        Ok(())
    }

    /// `lora:` against the sections it changes: its base must be trained weights, its dropout
    /// cannot be recomputed by gradient checkpointing, LCM-LoRA has no target network.
    fn validate_lora(&self) -> std::result::Result<(), ConfigError> {
        let Some(lora) = &self.lora else { return Ok(()) };
        lora.validate()?;
        if lora.dropout > 0.0 && self.train.gradient_checkpointing != crate::models::Checkpointing::None {
            return Err(invalid(
                "lora.dropout",
                format!(
                    "lora.dropout = {} with train.gradient_checkpointing = {}: the recomputed forward would draw another dropout mask; set one of them to 0 / none",
                    lora.dropout,
                    serde_json::to_value(self.train.gradient_checkpointing).map(|v| v.to_string()).unwrap_or_default()
                ),
            ));
        }
        if lora.base.is_none() && self.student_init == StudentInit::Random {
            return Err(invalid("lora.base", "lora: with student_init: random and no lora.base the adapters would train on random weights: set lora.base (or student_init: teacher)".to_string()));
        }
        if let Some(d) = self.train.ema_decay {
            return Err(invalid("train.ema_decay", format!("train.ema_decay = {d} with lora: an EMA of the adapters is not implemented: remove it")));
        }
        if self.lcm.student_init.is_some() {
            return Err(invalid("lcm.student_init", "lcm.student_init with lora: the frozen base comes from lora.base: move the path there".to_string()));
        }
        if self.method == Method::Lcm && self.lcm.target_ema != LcmConfig::default().target_ema {
            return Err(invalid("lcm.target_ema", "lcm.target_ema with lora: LCM-LoRA has no target network (the target is the adapted student without gradients, as diffusers' LCM-LoRA script): remove it".to_string()));
        }
        Ok(())
    }

    /// A run without a teacher pipeline: from scratch, on a latent cache, without validation images.
    fn validate_without_teacher(&self) -> std::result::Result<(), ConfigError> {
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
    crate::json_config::differing_keys(a, b).into_iter().map(|(k, a, b)| format!("{k}: {a} vs {b}")).collect()
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
mod tests;
