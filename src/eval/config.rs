//! The run YAML's `validation.eval:` section: FID / IS / CLIP score of the student during
//! training by `sdkd eval --model`'s protocol. docs/config.md documents every key.
use super::generate::Seeding;
use super::inception_score::SPLITS;
use super::Metric;
use crate::config_error::{invalid, ConfigError};
use crate::schedulers::SchedulerKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    pub metrics: Vec<Metric>,
    /// Real images' folder or a pytorch-fid `.npz` (FID).
    pub real: Option<PathBuf>,
    /// pytorch-fid's Inception weights (FID, IS).
    pub inception: Option<PathBuf>,
    /// open_clip's weights (CLIP score).
    pub clip: Option<PathBuf>,
    pub scheduler: SchedulerKind,
    pub steps: u32,
    pub guidance_scale: f64,
    pub seed: u64,
    pub seeding: Seeding,
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
            metrics: vec![Metric::Fid, Metric::Is],
            real: None,
            inception: None,
            clip: None,
            scheduler: SchedulerKind::Pndm,
            steps: 25,
            guidance_scale: 7.5,
            seed: 1234,
            seeding: Seeding::Consecutive,
            resolution: None,
            score_size: 256,
            batch_size: 8,
            ema: true,
        }
    }
}

impl EvalConfig {
    /// The `validation.eval.*` checks (that it needs the teacher's VAE and text encoder is
    /// `RunConfig`'s); each message names the key and value. Nothing to check when it is off.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let e = self;
        if e.every == 0 {
            return Ok(());
        }
        let every = e.every;
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
        if e.metrics.contains(&Metric::Is) && e.count < SPLITS {
            return Err(invalid("validation.eval.count", format!("validation.eval.count = {}: the Inception Score's {SPLITS} splits need at least {SPLITS} images", e.count)));
        }
        if !(e.guidance_scale.is_finite() && e.guidance_scale >= 0.0) {
            return Err(invalid("validation.eval.guidance_scale", format!("validation.eval.guidance_scale = {}: must be >= 0", e.guidance_scale)));
        }
        if let Some(r) = e.resolution.filter(|&r| r < 8) {
            return Err(invalid("validation.eval.resolution", format!("validation.eval.resolution = {r}: must be >= 8 pixels")));
        }
        if !e.seeding.allows(e.scheduler) {
            return Err(invalid(
                "validation.eval.seeding",
                format!("validation.eval.scheduler {} draws step noise, which seeding: consecutive cannot keep batch-invariant: set seeding: per-image", e.scheduler),
            ));
        }
        Ok(())
    }

    /// Makes the relative paths (prompts, real, inception, clip) absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.prompts, &mut self.real, &mut self.inception, &mut self.clip].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}
