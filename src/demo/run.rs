//! The whole job of `sdkd demo` on embedded data, through the same library calls and run YAMLs a
//! user would use: synthetic data -> the demo pipeline (tokenizer, frozen text encoder, a VAE
//! trained here) -> latent caches -> a teacher UNet trained from scratch (task loss only) -> a
//! `bk_small` student distilled from it with KD, and as a control the same student trained from
//! scratch for the same steps -> exported pipelines -> the same prompts through each -> a grid
//! and a report with each model's held-out denoising loss.
use super::{build_demo_teacher, DemoTeacherOptions, VaeTrainOptions, DEMO_RESOLUTION};
use crate::config::RunConfig;
use crate::data::synthetic::{write_dataset, write_parquet, write_webdataset};
use crate::data::{build_cache, open_image_rows, CacheOptions, DataFormat, DataOptions, ImageFolder, LatentCache, OnBadSample, Transform};
use crate::distill::encoder::{LatentScale, TeacherEncoder};
use crate::distill::evaluate::denoising_loss;
use crate::distill::progress::ProgressMode;
use crate::distill::trainer::Trainer;
use crate::export::write_pipeline_dir;
use crate::grid::grid;
use crate::models::{weights, PipelineDir, UNet};
use crate::pipeline::{prompt_rows, GenerateRequest, Parts};
use crate::schedulers::{NoiseSchedule, SchedulerConfig, SchedulerKind};
use anyhow::{Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The sizes of a demo run; the defaults take about ten minutes on two CPU cores.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seed: u64,
    /// Training image-caption pairs, and held-out pairs (never trained on, VAE included).
    pub count: usize,
    pub held_out: usize,
    pub vae_steps: usize,
    pub teacher_steps: u64,
    pub student_steps: u64,
    pub batch_size: usize,
    /// Images per model in the grid (held-out captions).
    pub prompts: usize,
    pub sampling_steps: usize,
    pub guidance_scale: f64,
    pub progress: ProgressMode,
    /// The layout the training pairs are written in and read from (VAE, caches).
    pub data_format: DataFormat,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seed: 0,
            count: 1000,
            held_out: 64,
            vae_steps: VaeTrainOptions::default().steps,
            teacher_steps: 900,
            student_steps: 240,
            batch_size: 16,
            prompts: 6,
            sampling_steps: 25,
            guidance_scale: 4.0,
            progress: ProgressMode::detect(),
            data_format: DataFormat::Imagefolder,
        }
    }
}

/// One trained (or copied) model of the demo and what was measured on it.
#[derive(Debug, Clone)]
pub struct ModelResult {
    pub name: String,
    pub what: String,
    pub params: i64,
    pub steps: u64,
    pub seconds: f64,
    pub held_out_loss: f64,
}

#[derive(Debug)]
pub struct DemoSummary {
    pub models: Vec<ModelResult>,
    pub grid: PathBuf,
    pub report: PathBuf,
    pub seconds: f64,
}

fn write_run_yaml(out: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let dir = out.join("configs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A run YAML of the demo (paths relative to `configs/`).
// Each argument is one value the YAML spells out; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn run_yaml(o: &DemoOptions, teacher: &str, student: &str, init: &str, distill: bool, name: &str, steps: u64, lr: f64) -> String {
    format!(
        "# written by `sdkd demo`; rerun with: sdkd train --config <this file>\n\
         teacher: ../{teacher}\nstudent: {student}\nstudent_init: {init}\ndistill: {distill}\noutput_dir: ../runs/{name}\n\
         data:\n  cache: ../cache\n  resolution: {DEMO_RESOLUTION}\n\
         train:\n  batch_size: {}\n  grad_accum: 1\n  max_steps: {steps}\n  seed: {}\n  device: cpu\n  precision: fp32\n\
         optim:\n  lr: {lr:e}\n  schedule: cosine\n  warmup_steps: {}\n  weight_decay: 0.01\n\
         checkpoint:\n  every: {steps}\n  keep: 1\nlog:\n  every: 20\n  tensorboard: true\nvalidation:\n  every: 0\n",
        o.batch_size,
        o.seed,
        (steps / 20).max(1)
    )
}

fn train(config: &Path, progress: ProgressMode) -> Result<(UNet, f64)> {
    let t = Instant::now();
    let cfg = RunConfig::load(config)?;
    let mut trainer = Trainer::new(cfg, None)?;
    trainer.run(&AtomicBool::new(false), progress)?;
    Ok((trainer.into_student(), t.elapsed().as_secs_f64()))
}

/// Latent batches of a cache, drawn once with a fixed seed (the held-out problems).
fn cache_batches(cache: &Path, batch: usize, seed: i64) -> Result<Vec<(Tensor, Tensor)>> {
    let c = LatentCache::open(cache)?;
    let scale = LatentScale::from_description(&c.index.encoder)?;
    tch::manual_seed(seed);
    let rows: Vec<usize> = (0..c.len()).collect();
    rows.chunks(batch)
        .map(|r| {
            let b = c.gather(r)?;
            Ok((scale.draw(&b.latent_mean, &b.latent_std), b.text_embeddings))
        })
        .collect()
}

fn encode(pipeline: &Path, data: &Path, cache: &Path, seed: u64) -> Result<()> {
    let p = PipelineDir::open(pipeline)?;
    let encoder = TeacherEncoder::load(&p, Device::Cpu, Kind::Float)?;
    let opts = CacheOptions {
        transform: Transform { resolution: DEMO_RESOLUTION, center_crop: true, random_flip: false },
        seed,
        shard_size: 1024,
        batch_size: 64,
        on_bad_sample: OnBadSample::Fail,
        threads: 0,
    };
    build_cache(open_image_rows(&data.to_string_lossy(), "demo data", &DataOptions::default())?, &encoder, cache, &opts)?;
    Ok(())
}

/// Runs the whole demo into `out`.
pub fn run_demo(out: &Path, o: &DemoOptions) -> Result<DemoSummary> {
    let t0 = Instant::now();
    let step = |msg: &str| eprintln!("[{:>6.1}s] {msg}", t0.elapsed().as_secs_f64());
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    step("synthetic data");
    match o.data_format {
        DataFormat::Imagefolder => write_dataset(&out.join("data"), o.count, o.seed, DEMO_RESOLUTION)?,
        DataFormat::Webdataset => write_webdataset(&out.join("data"), o.count, o.seed, DEMO_RESOLUTION)?,
        DataFormat::Parquet => write_parquet(&out.join("data"), o.count, o.seed, DEMO_RESOLUTION)?,
    }
    write_dataset(&out.join("heldout"), o.held_out, o.seed.wrapping_add(1_000_003), DEMO_RESOLUTION)?;

    step("demo pipeline: tokenizer, frozen text encoder, VAE trained on the images");
    let topts = DemoTeacherOptions {
        seed: o.seed,
        vae: VaeTrainOptions { steps: o.vae_steps, progress: o.progress, ..VaeTrainOptions::default() },
        ..DemoTeacherOptions::default()
    };
    let parts = build_demo_teacher(&out.join("pipeline-init"), &out.join("data"), &topts)?;
    parts.grid.save(out.join("vae_reconstructions.png"))?;
    step(&format!("VAE: PSNR {:.1} dB on held-out images", parts.psnr_held_out));

    step("latent caches (sdkd preprocess)");
    encode(&out.join("pipeline-init"), &out.join("data"), &out.join("cache"), o.seed)?;
    encode(&out.join("pipeline-init"), &out.join("heldout"), &out.join("cache-heldout"), o.seed)?;

    step(&format!("teacher: training the UNet from scratch, {} steps", o.teacher_steps));
    let cfg = write_run_yaml(out, "teacher", &run_yaml(o, "pipeline-init", "../pipeline-init/unet", "random", false, "teacher", o.teacher_steps, 1e-3))?;
    let (teacher, teacher_secs) = train(&cfg, o.progress)?;
    let teacher_config = teacher.model.config.clone();
    write_pipeline_dir(&out.join("teacher"), &out.join("pipeline-init"), &teacher_config, &weights::named_tensors(&teacher.vs), None)?;

    step(&format!("student bk_small: distilling from the teacher, {} steps", o.student_steps));
    let cfg = write_run_yaml(out, "student_kd", &run_yaml(o, "teacher", "bk_small", "teacher", true, "student_kd", o.student_steps, 5e-4))?;
    let (kd, kd_secs) = train(&cfg, o.progress)?;
    write_pipeline_dir(&out.join("student_kd"), &out.join("teacher"), &kd.model.config, &weights::named_tensors(&kd.vs), None)?;

    step(&format!("control bk_small: the same student from scratch, task loss only, {} steps", o.student_steps));
    let cfg = write_run_yaml(out, "student_scratch", &run_yaml(o, "teacher", "bk_small", "random", false, "student_scratch", o.student_steps, 1e-3))?;
    let (scratch, scratch_secs) = train(&cfg, o.progress)?;
    write_pipeline_dir(&out.join("student_scratch"), &out.join("teacher"), &scratch.model.config, &weights::named_tensors(&scratch.vs), None)?;

    // the student as pruned, before any training: what KD starts from
    let pruned = {
        let plan = crate::distill::student::StudentPlan::resolve("bk_small", Some(&teacher_config))?;
        let s = UNet::build(&plan.config, Device::Cpu, Kind::Float, crate::models::Init::Torch);
        crate::distill::student::copy_from_teacher(&plan, &teacher, &s)?;
        s
    };

    step("held-out denoising loss");
    let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_path(&out.join("teacher/scheduler"))?)?);
    let held = cache_batches(&out.join("cache-heldout"), 64, o.seed as i64 + 17)?;
    let eval = |u: &UNet| denoising_loss(&u.model, &schedule, &held, 10, o.seed as i64 + 23);
    let models = vec![
        ModelResult { name: "teacher".into(), what: "trained from scratch (task loss)".into(), params: teacher.num_params(), steps: o.teacher_steps, seconds: teacher_secs, held_out_loss: eval(&teacher) },
        ModelResult { name: "bk_small pruned".into(), what: "the teacher's copy map, untrained".into(), params: pruned.num_params(), steps: 0, seconds: 0.0, held_out_loss: eval(&pruned) },
        ModelResult { name: "bk_small KD".into(), what: "pruned, then task + output KD + feature KD".into(), params: kd.num_params(), steps: o.student_steps, seconds: kd_secs, held_out_loss: eval(&kd) },
        ModelResult { name: "bk_small scratch".into(), what: "random init, task loss only (control)".into(), params: scratch.num_params(), steps: o.student_steps, seconds: scratch_secs, held_out_loss: eval(&scratch) },
    ];

    step("generating the held-out captions with each model");
    let heldout = ImageFolder::open(&out.join("heldout"))?;
    let p = PipelineDir::open(&out.join("teacher"))?;
    let encoder = TeacherEncoder::load(&p, Device::Cpu, Kind::Float)?;
    let base = Parts { tokenizer: &encoder.tokenizer, text_encoder: &encoder.text_encoder.model, vae: &encoder.vae.model, unet: &teacher.model, schedule: &schedule };
    let mut originals = vec![];
    let mut prompts = vec![];
    for i in 0..o.prompts.min(heldout.len()) {
        let (img, caption) = heldout.decode(i).map_err(|e| anyhow::anyhow!("{}: {}", e.file.display(), e.reason))?;
        originals.push(img);
        prompts.push(caption);
    }
    let req = GenerateRequest {
        scheduler: SchedulerKind::Unipc,
        steps: o.sampling_steps,
        guidance_scale: o.guidance_scale,
        seed: o.seed,
        ..GenerateRequest::default()
    };
    let mut rows: Vec<Vec<RgbImage>> = vec![originals];
    rows.extend(prompt_rows(&base, &[&teacher.model, &kd.model, &scratch.model], &prompts, &req)?);
    let enlarged: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|r| r.iter().map(|im| image::imageops::resize(im, im.width() * 4, im.height() * 4, image::imageops::FilterType::Nearest)).collect())
        .collect();
    let grid_path = out.join("grid.png");
    grid(&enlarged).save(&grid_path).with_context(|| format!("writing {}", grid_path.display()))?;

    let report = out.join("report.md");
    std::fs::write(&report, report_markdown(o, &models, &prompts, &parts, t0.elapsed().as_secs_f64()))?;
    step(&format!("done: {} and {}", grid_path.display(), report.display()));
    Ok(DemoSummary { models, grid: grid_path, report, seconds: t0.elapsed().as_secs_f64() })
}

fn report_markdown(o: &DemoOptions, models: &[ModelResult], prompts: &[String], parts: &super::DemoTeacherReport, seconds: f64) -> String {
    let teacher = &models[0];
    let mut s = String::from("# sdkd demo report\n\n");
    s += &format!(
        "The whole job on embedded data in {seconds:.0} s on this machine: {} synthetic {res}x{res} image-caption pairs \
         ({} held out), a demo pipeline (a VAE trained here to {:.1} dB PSNR on held-out images, a frozen random \
         CLIP text encoder over the captions' words), a teacher UNet trained from scratch, and a BK-SDM `bk_small` \
         student distilled from it, against the same student trained from scratch for the same steps.\n\n",
        o.count,
        o.held_out,
        parts.psnr_held_out,
        res = DEMO_RESOLUTION
    );
    s += "| model | how | parameters | of teacher | steps | train time | held-out denoising loss |\n|---|---|---|---|---|---|---|\n";
    for m in models {
        s += &format!(
            "| {} | {} | {} | {:.1}% | {} | {:.0} s | {:.4} |\n",
            m.name,
            m.what,
            crate::commands::inspect::group_digits(m.params),
            100.0 * m.params as f64 / teacher.params as f64,
            m.steps,
            m.seconds,
            m.held_out_loss
        );
    }
    let kd = &models[2];
    let scratch = &models[3];
    s += &format!(
        "\nHeld-out denoising loss: the MSE of each UNet's noise prediction on {} held-out latents at 10 fixed \
         timesteps with fixed noise (lower is better). With the same steps, data and seed, the distilled student \
         reaches {:.4} and the student trained from scratch {:.4}: {}.\n\n",
        o.held_out,
        kd.held_out_loss,
        scratch.held_out_loss,
        if kd.held_out_loss < scratch.held_out_loss {
            format!("KD is {:.1}% better, as BK-SDM found", 100.0 * (1.0 - kd.held_out_loss / scratch.held_out_loss))
        } else {
            format!("here KD is {:.1}% worse, unlike BK-SDM's finding", 100.0 * (kd.held_out_loss / scratch.held_out_loss - 1.0))
        }
    );
    s += "`grid.png`: one column per held-out caption; rows: the held-out image, the teacher, the KD student, the \
          control (UniPC, ";
    s += &format!("{} steps, guidance {}, seed {}).\n\nCaptions:\n\n", o.sampling_steps, o.guidance_scale, o.seed);
    for (i, p) in prompts.iter().enumerate() {
        s += &format!("{}. {p}\n", i + 1);
    }
    s += "\nEverything here can be rerun by hand: `configs/*.yaml` are the run files (`sdkd train --config ...`), \
          `teacher/`, `student_kd/` and `student_scratch/` are diffusers pipeline folders (`sdkd generate --model ...`), \
          `runs/*/tb` are TensorBoard logs.\n";
    s
}
