//! `validation.eval`: the metrics of `sdkd eval --model` on the student during training, so a
//! run's checkpoints can be ranked by FID, IS and CLIP score rather than by loss. The networks,
//! captions and real statistics are read once when the run starts (a bad file fails before the
//! first step); each evaluation generates into `<output_dir>/eval/.step-N.partial/` and renames it
//! to `eval/step-N/` when scored. Only the newest evaluation keeps its images (1,000 images of
//! 512² are about 0.4 GB); every one keeps its `report.json`.
use super::config::EvalConfig;
use super::generate::{self as gen, Generation};
use super::inception::InceptionV3;
use super::protocol::{ClipWeights, GenerationSettings, Images, RealStats, Report, Scorer, Scores, Settings, FID_DIMS, INCEPTION_BATCH};
use super::{prompts, Metric};
use crate::pipeline::{GenerateRequest, Parts};
use crate::schedulers::NoiseSchedule;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

/// What a run's evaluations share: the settings, the captions and the scorer.
pub struct PeriodicEval {
    cfg: EvalConfig,
    captions: Vec<String>,
    scorer: Scorer,
}

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
            (true, Some(path)) => Some((InceptionV3::load(path, device).context("validation.eval.inception")?, path.clone())),
            _ => None,
        };
        let real = match (&inception, cfg.metrics.contains(&Metric::Fid), &cfg.real) {
            (Some((net, _)), true, Some(real)) => {
                if !real.exists() {
                    anyhow::bail!("validation.eval.real {}: no such folder or file", real.display());
                }
                let stats = RealStats::read(real, net, FID_DIMS, INCEPTION_BATCH).with_context(|| format!("validation.eval.real {}", real.display()))?;
                if let Some(w) = stats.warning(FID_DIMS) {
                    eprintln!("validation.eval: {w}");
                }
                Some(stats)
            }
            _ => None,
        };
        let clip = match (cfg.metrics.contains(&Metric::Clip), &cfg.clip) {
            (true, Some(path)) => {
                drop(super::clip_score::ClipScorer::load(path, Device::Cpu).context("validation.eval.clip")?);
                Some(ClipWeights::EachTime { path: path.clone(), device })
            }
            _ => None,
        };
        let scorer = Scorer { metrics: cfg.metrics.clone(), inception, real, clip, dims: FID_DIMS, batch: INCEPTION_BATCH };
        Ok(PeriodicEval { cfg: cfg.clone(), captions, scorer })
    }

    fn generation(&self, parts: &Parts<'_>) -> Result<Generation> {
        let resolution = match self.cfg.resolution {
            Some(r) => r,
            None => parts.image_size(&GenerateRequest::default())?.0,
        };
        Ok(Generation {
            scheduler: self.cfg.scheduler,
            steps: self.cfg.steps as usize,
            guidance_scale: self.cfg.guidance_scale,
            seed: self.cfg.seed,
            seeding: self.cfg.seeding,
            resolution,
        })
    }

    /// Generates the captions with `parts` (whose UNet is the model evaluated, `what` names it),
    /// scores them, and writes `<eval_root>/step-<step>/` whole (`fs_safe::write_dir`; a step
    /// evaluated again is replaced); the images of earlier steps are removed.
    pub fn run(&self, parts: &Parts<'_>, what: &str, step: u64, eval_root: &Path) -> Result<Scores> {
        let generation = self.generation(parts)?;
        let started = std::time::Instant::now();
        std::fs::create_dir_all(eval_root).with_context(|| format!("creating {}", eval_root.display()))?;
        crate::fs_safe::clean_stale(eval_root)?;
        let target = eval_root.join(format!("step-{step}"));
        let mut scores = None;
        crate::fs_safe::write_dir(&target, None, |dir| {
            scores = Some(self.evaluate_into(dir, &target, parts, what, step, generation, started)?);
            Ok(())
        })?;
        self.remove_older_images(eval_root, &target)?;
        Ok(scores.expect("set when the folder was written"))
    }

    /// One evaluation into `dir` (renamed to `target` when complete).
    #[allow(clippy::too_many_arguments)]
    fn evaluate_into(&self, dir: &Path, target: &Path, parts: &Parts<'_>, what: &str, step: u64, generation: Generation, started: std::time::Instant) -> Result<Scores> {
        let images = dir.join("images");
        let text = [("model", what.to_string()), ("step", step.to_string())];
        let outcome = gen::generate_missing(parts, &self.captions, &generation, self.cfg.batch_size, &images, &text, &mut |_, _| {})?;
        let generated: Vec<PathBuf> = (0..self.captions.len()).map(|k| images.join(gen::image_name(k))).collect();
        let scored = match self.cfg.score_size {
            0 => generated.clone(),
            size => gen::resized(&generated, &dir.join(format!("images_{size}")), size)?,
        };
        let captioned: Vec<(PathBuf, String)> = generated.iter().cloned().zip(self.captions.iter().cloned()).collect();
        let scores = self.scorer.score(&Images { folder: &target.join("images"), scored: &scored, captioned, cache: None })?;
        let settings = Settings {
            scoring: self.scorer.settings(scores.clip_settings.clone()),
            generation: Some(GenerationSettings {
                generation,
                batch_size: self.cfg.batch_size,
                score_size: self.cfg.score_size,
                prompts: self.cfg.prompts.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                sample_seed: self.cfg.sample_seed,
                model: None,
            }),
        };
        let report = Report {
            model: what.to_string(),
            step: Some(step),
            count: self.captions.len(),
            images: None,
            scored: None,
            unet_params: None,
            kept: None,
            generated: None,
            seconds_per_image: Some(Some(outcome.seconds / outcome.generated.max(1) as f64)),
            seconds: Some(started.elapsed().as_secs_f64()),
            warnings: scores.warnings.clone(),
            scores: scores.clone(),
            settings,
        };
        std::fs::write(dir.join("report.json"), report.to_json()?).with_context(|| format!("writing {}", dir.join("report.json").display()))?;
        Ok(scores)
    }

    /// Removes the images of every evaluation but `kept` (their reports stay).
    fn remove_older_images(&self, eval_root: &Path, kept: &Path) -> Result<()> {
        for entry in std::fs::read_dir(eval_root)? {
            let dir = entry?.path();
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if dir == kept || !name.starts_with("step-") || !dir.is_dir() {
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
