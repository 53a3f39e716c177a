//! The demo's step-distillation stage (`sdkd demo --lcm`): the KD student distilled into a latent
//! consistency model (`method: lcm`, `lcm.student_init` the KD run's `final/`, the demo teacher's
//! guided ODE as the target; Luo et al. 2023), then every held-out caption drawn by the teacher
//! and the KD student at the demo's sampling steps and by the LCM student at 1, 2, 4 and 8 LCM
//! steps, one model after the other in this process: caption-following accuracy, pixel distance
//! to the held-out images, images per second, FID and IS with `--inception`. It adds a section
//! to `report.md` and writes `grid_lcm.png`, on top of a finished demo output.
use super::caption_score;
use super::run::{held_out_pairs, percent, record_samples, run_yaml, sample_batched, score_samples, write_run_yaml, DemoOptions, TrainJob};
use crate::distill::encoder::TeacherEncoder;
use crate::export::write_pipeline_dir;
use crate::fs_safe::{self, Existing, Marker, Purpose};
use crate::grid::grid;
use crate::models::{weights, PipelineDir, UNet};
use crate::pipeline::{GenerateRequest, Parts};
use crate::schedulers::{NoiseSchedule, SchedulerConfig, SchedulerKind};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind};

/// The LCM step counts the student is scored at (the and diffusers' validation's).
pub const LCM_SAMPLING_STEPS: [usize; 4] = [1, 2, 4, 8];

/// The report's heading of the stage: a rerun replaces the section from here on.
const SECTION: &str = "## LCM stage";

/// The samples folder of the LCM student at `steps`.
fn samples_dir(steps: usize) -> String {
    format!("student_lcm-{steps}steps")
}

/// What the stage writes into a demo output besides its run YAML, logs and report section
/// (relative paths): removed before a rerun, once `foreign_to_stage` has found none of the
/// user's files there.
fn stage_outputs() -> Vec<String> {
    let mut v: Vec<String> = ["runs/student_lcm", "student_lcm", "grid_lcm.png"].map(String::from).to_vec();
    v.extend(LCM_SAMPLING_STEPS.map(|n| format!("samples/{}", samples_dir(n))));
    v
}

/// The LCM stage's training run.
#[derive(Debug, Clone)]
pub struct LcmOptions {
    /// Optimizer steps of the LCD run (two data-parallel ranks of half the demo batch each).
    pub steps: u64,
    pub lr: f64,
    /// Guidance w ~ U[w_min, w_max] per sample in the LCM convention (the demo samples at
    /// guidance 4, w = 3 embedded).
    pub w_min: f64,
    pub w_max: f64,
    /// Points of the DDIM solver's grid (`lcm.num_ddim_timesteps`), also the student's
    /// `original_inference_steps`.
    pub num_ddim_timesteps: usize,
}

impl Default for LcmOptions {
    /// A short run's recipe: diffusers' `train_lcm_distill_sd_wds.py` defaults but a 25-point
    /// grid (skips of 40 timesteps, not 20). On the quick demo's models at 240 steps it took the
    /// 4-step student from 11 to 14 of 16 held-out backgrounds, the 25-step KD student's count
    /// (README, "The LCM stage"): fewer, longer links carry the boundary condition across the
    /// grid in fewer steps, as in the LCM paper's skipping-step ablation (Luo et al. 2023: larger
    /// skips converge faster, up to k = 20 there).
    fn default() -> Self {
        LcmOptions { steps: 240, lr: 5e-4, w_min: 2.0, w_max: 4.0, num_ddim_timesteps: 25 }
    }
}

/// One sampled model of the stage and what was measured on its images.
#[derive(Debug, Clone)]
pub struct LcmRow {
    pub name: String,
    pub sampler: SchedulerKind,
    pub steps: usize,
    pub accuracy: [f64; 3],
    /// Root mean square difference (0-255) between each image and the held-out image of its
    /// caption, over all pixels and images.
    pub pixel_rmse: f64,
    pub images_per_second: f64,
    pub fid: Option<f64>,
    pub inception_score: Option<(f64, f64)>,
}

#[derive(Debug)]
pub struct LcmSummary {
    /// teacher, KD student, then the LCM student at each of `LCM_SAMPLING_STEPS`.
    pub rows: Vec<LcmRow>,
    pub train_seconds: f64,
    pub grid: PathBuf,
    pub report: PathBuf,
    pub seconds: f64,
}

impl LcmSummary {
    /// The LCM student at `steps`.
    pub fn lcm_at(&self, steps: usize) -> &LcmRow {
        self.rows.iter().find(|r| r.sampler == SchedulerKind::Lcm && r.steps == steps).expect("a scored step count")
    }
}

/// The pieces of a finished demo the stage reads, checked before minutes of training.
pub fn check_demo_output(out: &Path) -> Result<()> {
    for p in ["teacher/model_index.json", "student_kd/model_index.json", "runs/student_kd/final/unet/config.json", "cache", "heldout/metadata.jsonl", "report.md"] {
        if !out.join(p).exists() {
            bail!("--lcm: --out {} holds no finished demo ({p} is missing): run `sdkd demo --lcm --out {0} --overwrite` to make the whole demo and its LCM stage", out.display());
        }
    }
    Ok(())
}

/// The LCD run's YAML: the demo's run file with `method: lcm` (paths relative to `configs/`).
fn lcm_yaml(o: &DemoOptions, l: &LcmOptions) -> String {
    let method = format!(
        "method: lcm\nlcm:\n  student_init: ../runs/student_kd/final\n  w_min: {:?}\n  w_max: {:?}\n  num_ddim_timesteps: {}\n",
        l.w_min, l.w_max, l.num_ddim_timesteps
    );
    run_yaml(o, "teacher", "bk_small", "teacher", true, "student_lcm", l.steps, l.lr, (o.batch_size / 2).max(1), &method)
}

/// Mean pixel RMSE (0-255) of `images` against `originals`, pairwise.
fn pixel_rmse(images: &[RgbImage], originals: &[RgbImage]) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (a, b) in images.iter().zip(originals) {
        for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
            sum += (*x as f64 - *y as f64).powi(2);
            n += 1;
        }
    }
    (sum / n.max(1) as f64).sqrt()
}

/// Whether `out` holds a demo that finished (its marker lists its files).
pub fn finished_demo(out: &Path) -> Result<bool> {
    Ok(matches!(fs_safe::existing(out)?, Existing::Made(m) if m.purpose == Purpose::Demo && m.files.is_some()))
}

/// The files in the demo output `out` that sdkd did not write (kept out of its listing), none
/// of them where the LCM stage writes: it replaces its earlier outputs.
fn foreign_to_stage(out: &Path) -> Result<Vec<String>> {
    let foreign = match fs_safe::existing(out)? {
        Existing::Made(m) => fs_safe::foreign_files(out, &m)?,
        _ => vec![],
    };
    let ours = stage_outputs();
    let inside: Vec<String> = foreign.iter().filter(|f| ours.iter().any(|p| *f == p || f.starts_with(&format!("{p}/")))).cloned().collect();
    if !inside.is_empty() {
        bail!("--lcm: --out {} holds {}, which sdkd did not write, where the LCM stage writes: move them out first", out.display(), fs_safe::list_some(&inside));
    }
    Ok(foreign)
}

/// Runs the stage on the finished demo in `out` (`check_demo_output`), replacing an earlier one,
/// and lists its files in the folder's marker (the user's own files left out of the listing).
pub fn run_lcm_stage(out: &Path, o: &DemoOptions, l: &LcmOptions) -> Result<LcmSummary> {
    check_demo_output(out)?;
    let theirs = foreign_to_stage(out)?;
    let s = stage(out, o, l)?;
    let mut marker = Marker::new(Purpose::Demo).listing(out)?;
    if let Some(files) = marker.files.as_mut() {
        files.retain(|f, _| !theirs.contains(f));
    }
    marker.write_into(out)?;
    Ok(s)
}

fn stage(out: &Path, o: &DemoOptions, l: &LcmOptions) -> Result<LcmSummary> {
    let t0 = Instant::now();
    let step = |msg: &str| eprintln!("[{:>6.1}s] {msg}", t0.elapsed().as_secs_f64());
    for p in stage_outputs().iter().map(|p| out.join(p)).filter(|p| p.exists()) {
        match p.is_dir() {
            true => fs_safe::remove_dir(&p)?,
            false => std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?,
        }
    }

    step(&format!("LCM stage: the KD student distilled into a latent consistency model, {} steps, w ~ U[{}, {}]", l.steps, l.w_min, l.w_max));
    let cfg = write_run_yaml(out, "student_lcm", &lcm_yaml(o, l))?;
    let (_, train_seconds) = TrainJob::start(o, out, "student_lcm", &cfg, 2, 2, true)?.finish()?;
    let run = crate::config::RunConfig::load(&cfg)?;
    // the target network: the EMA of the online student (diffusers' script saves both, as
    // unet_target and unet, and validates both)
    let lcm = UNet::load(&out.join("runs/student_lcm/final/unet_target"), Device::Cpu, Kind::Float)?;
    write_pipeline_dir(&out.join("student_lcm"), &out.join("teacher"), &lcm.model.config, &weights::named_tensors(&lcm.vs), None, run.lcm.grid())?;

    step("drawing every held-out caption: teacher and KD student, then the LCM student at 1, 2, 4 and 8 steps");
    let teacher_dir = PipelineDir::open(&out.join("teacher"))?;
    let encoder = TeacherEncoder::load(&teacher_dir, Device::Cpu, Kind::Float)?;
    let teacher = teacher_dir.load_unet(Device::Cpu, Kind::Float)?;
    let kd = PipelineDir::open(&out.join("student_kd"))?.load_unet(Device::Cpu, Kind::Float)?;
    let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_path(&out.join("teacher/scheduler"))?)?);
    let lcm_schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_path(&out.join("student_lcm/scheduler/scheduler_config.json"))?)?);
    let (originals, captions) = held_out_pairs(&out.join("heldout"))?;
    let base = Parts { tokenizer: &encoder.tokenizer, text_encoder: &encoder.text_encoder.model, vae: &encoder.vae.model, unet: &teacher.model, schedule: &schedule, xl: None };
    let req = GenerateRequest { scheduler: SchedulerKind::Unipc, steps: o.sampling_steps, guidance_scale: o.guidance_scale, seed: o.seed, ..GenerateRequest::default() };
    let mut runs: Vec<(&str, String, Parts<'_>, GenerateRequest)> = vec![
        ("teacher", "teacher".into(), base, req.clone()),
        ("bk_small KD", "student_kd".into(), Parts { unet: &kd.model, ..base }, req.clone()),
    ];
    for n in LCM_SAMPLING_STEPS {
        let parts = Parts { unet: &lcm.model, schedule: &lcm_schedule, ..base };
        runs.push(("bk_small LCM", samples_dir(n), parts, GenerateRequest { scheduler: SchedulerKind::Lcm, steps: n, ..req.clone() }));
    }
    let mut rows = vec![];
    let mut sampled = vec![];
    for (name, dir, parts, req) in &runs {
        let started = Instant::now();
        let images = sample_batched(parts, &captions, req)?;
        let seconds = started.elapsed().as_secs_f64();
        let accuracy = match req.scheduler {
            SchedulerKind::Lcm => record_samples(out, dir, "student_lcm", &format!("/lcm_{}_steps", req.steps), &images, &captions, l.steps)?,
            _ => caption_score::accuracy(&images, &captions)?,
        };
        let pixel_rmse = pixel_rmse(&images, &originals);
        let images_per_second = images.len() as f64 / seconds;
        rows.push(LcmRow { name: name.to_string(), sampler: req.scheduler, steps: req.steps, accuracy, pixel_rmse, images_per_second, fid: None, inception_score: None });
        sampled.push(images);
    }
    if let Some(path) = &o.inception {
        step("FID and IS on the held-out set (--inception)");
        let dirs: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
        for (row, (fid, is)) in rows.iter_mut().zip(score_samples(out, path, &dirs)?) {
            (row.fid, row.inception_score) = (fid, is);
        }
    }

    let columns = o.prompts.min(captions.len());
    let mut grid_rows: Vec<Vec<RgbImage>> = vec![originals[..columns].to_vec()];
    grid_rows.extend(sampled.iter().map(|r| r[..columns].to_vec()));
    let grid_path = out.join("grid_lcm.png");
    grid(&crate::grid::enlarged(&grid_rows, 4)).save(&grid_path).with_context(|| format!("writing {}", grid_path.display()))?;

    let summary = LcmSummary { rows, train_seconds, grid: grid_path, report: out.join("report.md"), seconds: 0.0 };
    let report = std::fs::read_to_string(&summary.report).with_context(|| format!("reading {}", summary.report.display()))?;
    let kept = report.split(&format!("\n{SECTION}")).next().unwrap_or(&report).trim_end();
    let text = format!("{kept}\n\n{}", section_markdown(o, l, &run.lcm, &summary, captions.len(), columns));
    fs_safe::write_file(&summary.report, text.as_bytes())?;
    step(&format!("LCM stage done: {} and {}", summary.grid.display(), summary.report.display()));
    Ok(LcmSummary { seconds: t0.elapsed().as_secs_f64(), ..summary })
}

/// The stage's section of `report.md`.
fn section_markdown(o: &DemoOptions, l: &LcmOptions, lcm: &crate::config::LcmConfig, s: &LcmSummary, held_out: usize, columns: usize) -> String {
    let mut t = format!(
        "{SECTION} (`sdkd demo --lcm`)\n\nThe KD student distilled into a latent consistency model (`configs/student_lcm.yaml`: `method: lcm`, \
         `lcm.student_init` the KD run's `final/`, the teacher's guided ODE with w ~ U[{}, {}] as the target, a {}-point DDIM \
         grid, target EMA {}, {} loss): {} steps of {} samples (two data-parallel processes), lr {:e}, in {:.0} s. \
         The LCM student (`student_lcm/`, the run's target network: the EMA of the online student) samples with `LCMScheduler` on its \
         {}-point grid at guidance {} (w = {} embedded, one UNet call per step); the teacher and the KD student with UniPC at \
         {} steps and classifier-free guidance {}. Every model draws all {held_out} held-out captions (seed {}), one model after \
         the other in this process (LibTorch's default intra-op threads), 16 captions per batched call; images per second is \
         that wall time, text encoder and VAE decode included.\n\n",
        l.w_min,
        l.w_max,
        lcm.num_ddim_timesteps,
        lcm.target_ema,
        format!("{:?}", lcm.loss).to_lowercase(),
        l.steps,
        2 * (o.batch_size / 2).max(1),
        l.lr,
        s.train_seconds,
        lcm.num_ddim_timesteps,
        o.guidance_scale,
        o.guidance_scale - 1.0,
        o.sampling_steps,
        o.guidance_scale,
        o.seed,
    );
    t += "| model | sampler | steps | background | object colour | position | pixel RMSE to the held-out image | images/s |\n|---|---|---|---|---|---|---|---|\n";
    for r in &s.rows {
        t += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {:.2} |\n",
            r.name,
            r.sampler.name(),
            r.steps,
            percent(r.accuracy[0]),
            percent(r.accuracy[1]),
            percent(r.accuracy[2]),
            r.pixel_rmse,
            r.images_per_second
        );
    }
    let (teacher, kd, four) = (&s.rows[0], &s.rows[1], s.lcm_at(4));
    let kept: Vec<f64> = (0..3).map(|i| if kd.accuracy[i] > 0.0 { four.accuracy[i] / kd.accuracy[i] } else { f64::NAN }).collect();
    let reached = kept.iter().all(|k| *k >= 0.9);
    t += &format!(
        "\nAt 4 steps the LCM student keeps {} / {} / {} of the {}-step KD student's accuracies (background / object colour / \
         position): the goal of 90% each is {}. Pixel RMSE is a held-out quality figure that needs no weights (the caption \
         fixes the scene up to a small shift); it rewards blur, so read it beside the accuracies.\n\n\
         Speed: teacher at {} steps {:.2} images/s, KD student at {} steps {:.2} ({:.2}x), LCM student at 4 steps {:.2} \
         ({:.2}x the KD student, **{:.1}x the teacher**).\n\n",
        percent(kept[0]),
        percent(kept[1]),
        percent(kept[2]),
        kd.steps,
        if reached { "reached" } else { "not reached" },
        teacher.steps,
        teacher.images_per_second,
        kd.steps,
        kd.images_per_second,
        kd.images_per_second / teacher.images_per_second,
        four.images_per_second,
        four.images_per_second / kd.images_per_second,
        four.images_per_second / teacher.images_per_second,
    );
    if s.rows.iter().any(|r| r.fid.is_some()) {
        t += "| model | sampler | steps | FID | IS |\n|---|---|---|---|---|\n";
        for r in &s.rows {
            if let (Some(fid), Some((is, sd))) = (r.fid, r.inception_score) {
                t += &format!("| {} | {} | {} | {fid:.2} | {is:.3} ± {sd:.3} |\n", r.name, r.sampler.name(), r.steps);
            }
        }
        t += "\n";
    }
    t += &format!(
        "`grid_lcm.png`: the first {columns} held-out captions; rows: the held-out image, the teacher ({} steps), the KD student \
         ({} steps), the LCM student at 1, 2, 4 and 8 steps. Images: `samples/student_lcm-<n>steps/`.\n",
        o.sampling_steps, o.sampling_steps
    );
    t
}
