//! `validation.eval`: the metrics of `sdkd eval --model` on the student during training, so a
//! run's checkpoints can be ranked by FID, IS and CLIP score rather than by loss. The networks,
//! captions and real statistics are read once when the run starts (a bad file fails before the
//! first step); each evaluation generates into `<output_dir>/eval/.step-N.partial/` and renames it
//! to `eval/step-N/` when scored. Only the newest evaluation keeps its images (1,000 images of
//! 512² are about 0.4 GB); every one keeps its `report.json`.
use super::generate::{self as gen, Generation};
use super::inception::InceptionV3;
use super::{clip_score, fid, inception_score, prompts, Metric};
use crate::config::EvalConfig;
use crate::pipeline::{GenerateRequest, Parts};
use crate::schedulers::NoiseSchedule;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

/// One evaluation's numbers (each present when its metric was asked for).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores {
    pub fid: Option<f64>,
    /// Inception Score mean and std over torch-fidelity's 10 splits.
    pub is: Option<(f64, f64)>,
    /// Mean raw cosine (BK-SDM's CLIP score).
    pub clip: Option<f64>,
}

impl Scores {
    /// The TensorBoard scalars: `eval/fid`, `eval/is`, `eval/is_std`, `eval/clip_score`.
    pub fn scalars(&self) -> Vec<(&'static str, f32)> {
        let mut v = vec![];
        v.extend(self.fid.map(|f| ("eval/fid", f as f32)));
        if let Some((m, sd)) = self.is {
            v.extend([("eval/is", m as f32), ("eval/is_std", sd as f32)]);
        }
        v.extend(self.clip.map(|c| ("eval/clip_score", c as f32)));
        v
    }

    /// One line for the progress output.
    pub fn summary(&self) -> String {
        let mut parts = vec![];
        parts.extend(self.fid.map(|f| format!("FID {f:.3}")));
        parts.extend(self.is.map(|(m, sd)| format!("IS {m:.3} ± {sd:.3}")));
        parts.extend(self.clip.map(|c| format!("CLIP score {c:.4}")));
        parts.join(", ")
    }
}

/// What a run's evaluations share: the settings, the captions and the loaded networks.
pub struct PeriodicEval {
    cfg: EvalConfig,
    captions: Vec<String>,
    inception: Option<InceptionV3>,
    real: Option<fid::Stats>,
    device: Device,
}

/// FID over pool3 features, as BK-SDM reports it.
const FID_DIMS: i64 = 2048;
/// Images per Inception batch (pytorch-fid's default).
const INCEPTION_BATCH: usize = 50;

impl PeriodicEval {
    /// Reads the captions, loads the Inception network and computes (or reads) the real
    /// statistics, and checks the CLIP weights load; errors name the `validation.eval` key.
    pub fn prepare(cfg: &EvalConfig, schedule: &Arc<NoiseSchedule>, device: Device) -> Result<PeriodicEval> {
        cfg.scheduler.build(schedule, cfg.steps as usize).with_context(|| format!("validation.eval.scheduler {} with validation.eval.steps {}", cfg.scheduler, cfg.steps))?;
        let file = cfg.prompts.as_ref().context("validation.eval.prompts is not set")?;
        let captions = prompts::select(prompts::read(file).with_context(|| format!("validation.eval.prompts {}", file.display()))?, Some(cfg.count), cfg.sample_seed)
            .with_context(|| format!("validation.eval.count {} of {}", cfg.count, file.display()))?;
        let captions: Vec<String> = captions.into_iter().map(|c| c.text).collect();
        let inception = match (cfg.metrics.iter().any(|m| m.needs_inception()), &cfg.inception) {
            (true, Some(path)) => Some(InceptionV3::load(path, device).context("validation.eval.inception")?),
            _ => None,
        };
        let real = match (&inception, cfg.metrics.contains(&Metric::Fid), &cfg.real) {
            (Some(net), true, Some(real)) => {
                if !real.exists() {
                    anyhow::bail!("validation.eval.real {}: no such folder or file", real.display());
                }
                let stats = super::stats_of(real, net, FID_DIMS, INCEPTION_BATCH).with_context(|| format!("validation.eval.real {}", real.display()))?;
                if let Some(w) = stats.count.and_then(|n| super::few_images_warning(real, n, FID_DIMS)) {
                    eprintln!("validation.eval: {w}");
                }
                Some(stats)
            }
            _ => None,
        };
        if let (true, Some(path)) = (cfg.metrics.contains(&Metric::Clip), &cfg.clip) {
            // the model is loaded again for each evaluation and dropped after it: ViT-g-14 would
            // hold 5.5 GB of the training device between evaluations
            drop(clip_score::ClipScorer::load(path, Device::Cpu).context("validation.eval.clip")?);
        }
        Ok(PeriodicEval { cfg: cfg.clone(), captions, inception, real, device })
    }

    fn generation(&self, parts: &Parts<'_>) -> Result<Generation> {
        let resolution = match self.cfg.resolution {
            Some(r) => r,
            None => parts.image_size(&GenerateRequest::default())?.0,
        };
        Ok(Generation {
            scheduler: self.cfg.scheduler.name().to_string(),
            steps: self.cfg.steps as usize,
            guidance_scale: self.cfg.guidance_scale,
            seed: self.cfg.seed,
            seeding: self.cfg.seeding,
            resolution,
        })
    }

    /// Generates the captions with `parts` (whose UNet is the model evaluated, `what` names it),
    /// scores them, and writes `<eval_root>/step-<step>/` (images of earlier steps removed).
    pub fn run(&self, parts: &Parts<'_>, what: &str, step: u64, eval_root: &Path) -> Result<Scores> {
        let generation = self.generation(parts)?;
        let started = std::time::Instant::now();
        std::fs::create_dir_all(eval_root).with_context(|| format!("creating {}", eval_root.display()))?;
        let partial = eval_root.join(format!(".step-{step}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).with_context(|| format!("removing the unfinished {}", partial.display()))?;
        }
        let images = partial.join("images");
        let text = [("model", what.to_string()), ("step", step.to_string())];
        let outcome = gen::generate_missing(parts, &self.captions, &generation, self.cfg.batch_size, &images, &text, &mut |_, _| {})?;
        let generated: Vec<PathBuf> = (0..self.captions.len()).map(|k| images.join(gen::image_name(k))).collect();
        let scored = match self.cfg.score_size {
            0 => generated.clone(),
            size => gen::resized(&generated, &partial.join(format!("images_{size}")), size)?,
        };
        let scores = self.score(&generated, &scored)?;
        let report = json!({
            "model": what, "step": step, "count": self.captions.len(),
            "fid": scores.fid, "is_mean": scores.is.map(|s| s.0), "is_std": scores.is.map(|s| s.1), "clip_score": scores.clip,
            "seconds_per_image": outcome.seconds / outcome.generated.max(1) as f64, "seconds": started.elapsed().as_secs_f64(),
            "settings": self.settings(&generation),
        });
        crate::fs_safe::write_file(&partial.join("report.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;
        self.publish(&partial, eval_root, step)?;
        Ok(scores)
    }

    fn score(&self, generated: &[PathBuf], scored: &[PathBuf]) -> Result<Scores> {
        let mut s = Scores::default();
        let net = || self.inception.as_ref().context("the Inception network is loaded for fid and is");
        for &m in &self.cfg.metrics {
            match m {
                Metric::Fid => {
                    let real = self.real.as_ref().context("the real statistics are read for fid")?;
                    s.fid = Some(super::fid_against(net()?, scored, FID_DIMS, INCEPTION_BATCH, None, real)?.0);
                }
                Metric::Is => s.is = Some(super::inception_score_of(net()?, scored, INCEPTION_BATCH, None)?),
                Metric::Clip => {
                    let path = self.cfg.clip.as_ref().context("validation.eval.clip is set for clip")?;
                    let scorer = clip_score::ClipScorer::load(path, self.device).context("validation.eval.clip")?;
                    // CLIP scores the images as generated (its preprocessing resizes them to its own size)
                    let pairs: Vec<(PathBuf, String)> = generated.iter().cloned().zip(self.captions.iter().cloned()).collect();
                    s.clip = Some(scorer.score_files(&pairs, self.cfg.batch_size)?.mean_cosine);
                }
            }
        }
        Ok(s)
    }

    fn settings(&self, g: &Generation) -> Value {
        let mut v = serde_json::to_value(&self.cfg).expect("the eval config serialises");
        v["resolution"] = g.resolution.into();
        v["fid_dims"] = FID_DIMS.into();
        v["is_splits"] = inception_score::SPLITS.into();
        v
    }

    /// `partial` becomes `step-<step>`; the images of every other step are removed (their
    /// reports stay).
    fn publish(&self, partial: &Path, eval_root: &Path, step: u64) -> Result<()> {
        let target = eval_root.join(format!("step-{step}"));
        if target.exists() {
            // a resumed run evaluating a step again
            std::fs::remove_dir_all(&target).with_context(|| format!("replacing {}", target.display()))?;
        }
        std::fs::rename(partial, &target).with_context(|| format!("renaming {} to {}", partial.display(), target.display()))?;
        for entry in std::fs::read_dir(eval_root)? {
            let dir = entry?.path();
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if dir == target || !name.starts_with("step-") || !dir.is_dir() {
                continue;
            }
            for sub in std::fs::read_dir(&dir)? {
                let sub = sub?.path();
                if sub.is_dir() && sub.file_name().is_some_and(|n| n.to_string_lossy().starts_with("images")) {
                    std::fs::remove_dir_all(&sub).with_context(|| format!("removing {}", sub.display()))?;
                }
            }
        }
        Ok(())
    }
}
