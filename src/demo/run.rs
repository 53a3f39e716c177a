//! The whole job of `sdkd demo` on embedded data, through the same library calls and run YAMLs a
//! user would use: synthetic data -> the demo pipeline (tokenizer, frozen text encoder, a VAE
//! trained here) -> latent caches -> a teacher UNet trained from scratch (task loss only) -> a
//! `bk_small` student distilled from it with KD, and as a control the same student trained from
//! scratch for the same steps (each run a `sdkd train` process: the teacher as two data-parallel
//! ranks, the two students side by side) -> exported pipelines -> the same prompts through each -> a grid
//! and a report with each model's held-out denoising loss.
use super::{build_demo_teacher, DemoTeacherOptions, VaeTrainOptions, DEMO_RESOLUTION};
use crate::config::RunConfig;
use crate::data::synthetic::{write_dataset, write_parquet, write_webdataset};
use crate::data::{build_cache, open_image_rows, CacheOptions, DataFormat, DataOptions, ImageFolder, LatentCache, OnBadSample, Transform};
use crate::distill::encoder::{LatentScale, TeacherEncoder};
use crate::distill::evaluate::denoising_loss;
use crate::distill::progress::ProgressMode;
use crate::distill::tensorboard::EventWriter;
use crate::eval::inception::{InceptionV3, WEIGHTS_HELP};
use crate::eval::protocol::{Images, RealStats, Scorer, FID_DIMS, INCEPTION_BATCH};
use crate::eval::Metric;
use super::caption_score;
use crate::export::write_pipeline_dir;
use crate::schedulers::config::LcmGrid;
use crate::grid::grid;
use crate::models::{weights, PipelineDir, UNet};
use crate::pipeline::{generate_batch, BatchMember, GenerateRequest, Parts};
use crate::schedulers::{NoiseSchedule, SchedulerConfig, SchedulerKind};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// The sizes of a demo run; the defaults take about 9.5 minutes on two idle CPU cores (README).
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
    /// `data.caption_dropout` of every training run: the teacher learns the unconditional
    /// prediction that guidance needs, and the students learn the teacher's.
    pub caption_dropout: f64,
    /// Learning rate of the teacher (from scratch).
    pub teacher_lr: f64,
    /// Learning rate of both students (KD and the control), so they differ only in init and loss.
    pub student_lr: f64,
    /// Processes of the teacher's data-parallel run (each trains on `batch_size` samples a step).
    pub teacher_ranks: usize,
    /// The `sdkd` executable the training runs are started with (`sdkd train --config ...`).
    pub sdkd: PathBuf,
    /// pytorch-fid's Inception weights: FID and IS of each model on the held-out set.
    pub inception: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seed: 0,
            count: 1000,
            held_out: 64,
            vae_steps: VaeTrainOptions::default().steps,
            teacher_steps: 1800,
            student_steps: 240,
            batch_size: 16,
            prompts: 8,
            sampling_steps: 25,
            guidance_scale: 4.0,
            progress: ProgressMode::detect(),
            data_format: DataFormat::Imagefolder,
            caption_dropout: 0.1,
            teacher_lr: 1e-3,
            student_lr: 1.5e-3,
            teacher_ranks: 2,
            sdkd: PathBuf::from("sdkd"),
            inception: None,
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
    /// Caption-following accuracy per `caption_score::ATTRIBUTES` on the held-out captions (None
    /// for the untrained pruned copy, which is not sampled).
    pub caption_accuracy: Option<[f64; 3]>,
    /// FID against the held-out images and IS (mean, std), with `--inception`.
    pub fid: Option<f64>,
    pub inception_score: Option<(f64, f64)>,
}

#[derive(Debug)]
pub struct DemoSummary {
    pub models: Vec<ModelResult>,
    pub grid: PathBuf,
    pub report: PathBuf,
    pub seconds: f64,
}

pub(super) fn write_run_yaml(out: &Path, name: &str, body: &str) -> Result<PathBuf> {
    let dir = out.join("configs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// A run YAML of the demo (paths relative to `configs/`).
// Each argument is one value the YAML spells out; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
/// `batch` is each process's; a run of R processes trains on R × batch samples a step. `method`:
/// the YAML of a `method:` other than KD and its section ("" for KD).
pub(super) fn run_yaml(o: &DemoOptions, teacher: &str, student: &str, init: &str, distill: bool, name: &str, steps: u64, lr: f64, batch: usize, method: &str) -> String {
    format!(
        "# written by `sdkd demo`; rerun with: sdkd train --config <this file>\n\
         teacher: ../{teacher}\nstudent: {student}\nstudent_init: {init}\ndistill: {distill}\noutput_dir: ../runs/{name}\n{method}\
         data:\n  cache: ../cache\n  resolution: {DEMO_RESOLUTION}\n  caption_dropout: {}\n\
         train:\n  batch_size: {}\n  grad_accum: 1\n  max_steps: {steps}\n  seed: {}\n  device: cpu\n  precision: fp32\n  dist_timeout_s: 300\n\
         optim:\n  lr: {lr:e}\n  schedule: cosine\n  warmup_steps: {}\n  weight_decay: 0.01\n\
         checkpoint:\n  every: {steps}\n  keep: 1\nlog:\n  every: 20\n  tensorboard: true\nvalidation:\n  every: 0\n",
        o.caption_dropout,
        batch,
        o.seed,
        (steps / 20).max(1)
    )
}

/// One `sdkd train --config <file>` run started as `ranks` processes of a data-parallel job on
/// this machine (Gloo between CPU processes, rank 0 hosting the rendezvous on a free local port),
/// as `torchrun --nproc-per-node <ranks>` would start them. On two cores this is the demo's
/// speed-up: the kernels of these tiny UNets are too small to split across threads, so two
/// processes of one intra-op thread each (two ranks of the teacher, or the two students side by
/// side) do about twice the work of one process of two threads in the time.
pub(super) struct TrainJob {
    name: String,
    output_dir: PathBuf,
    ranks: Vec<(std::process::Child, PathBuf)>,
    started: Instant,
}

impl TrainJob {
    /// Rank 0 shows its progress when `show` (stderr inherited); every other rank, and rank 0
    /// otherwise, writes its output to `logs/<name>-rank<r>.log`. `sharing` is how many training
    /// processes run on the machine at once: each gets cores / sharing intra-op threads
    /// (`OMP_NUM_THREADS`, as torchrun sets it to 1 for several processes per node), so they do
    /// not oversubscribe the cores. Measured on the demo teacher, 60 steps as two ranks of 8:
    /// 24.9 s with two threads each (LibTorch's default), 13.4 s with one.
    pub(super) fn start(o: &DemoOptions, out: &Path, name: &str, config: &Path, ranks: usize, sharing: usize, show: bool) -> Result<TrainJob> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).context("finding a free local port for the rendezvous")?.port();
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let threads = (cores / sharing.max(1)).max(1);
        let mut children = vec![];
        for rank in 0..ranks {
            let log = logs.join(format!("{name}-rank{rank}.log"));
            let mut cmd = std::process::Command::new(&o.sdkd);
            cmd.args(["train", "--config"]).arg(config);
            if !show || o.progress == ProgressMode::Hidden {
                cmd.arg("--quiet");
            }
            if std::env::var_os("OMP_NUM_THREADS").is_none() {
                cmd.env("OMP_NUM_THREADS", threads.to_string());
            }
            if ranks > 1 {
                cmd.env("RANK", rank.to_string()).env("WORLD_SIZE", ranks.to_string()).env("LOCAL_RANK", rank.to_string());
                cmd.env("LOCAL_WORLD_SIZE", ranks.to_string()).env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
            }
            let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            match show && rank == 0 {
                true => cmd.stdout(file),
                false => cmd.stdout(file.try_clone()?).stderr(file),
            };
            let child = cmd.spawn().with_context(|| format!("starting {} train --config {}", o.sdkd.display(), config.display()))?;
            children.push((child, log));
        }
        let output_dir = RunConfig::load(config)?.output_dir;
        Ok(TrainJob { name: name.to_string(), output_dir, ranks: children, started: Instant::now() })
    }

    /// Waits for every rank; a failed rank stops the others, and the error quotes its log.
    /// Returns the trained UNet (`final/unet`) and the wall seconds.
    pub(super) fn finish(mut self) -> Result<(UNet, f64)> {
        let mut failed = None;
        while failed.is_none() && !self.ranks.is_empty() {
            let mut i = 0;
            while i < self.ranks.len() {
                match self.ranks[i].0.try_wait()? {
                    Some(status) if status.success() => drop(self.ranks.remove(i)),
                    Some(status) => {
                        failed = Some((i, status));
                        break;
                    }
                    None => i += 1,
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        if let Some((i, status)) = failed {
            for (child, _) in &mut self.ranks {
                let _ = child.kill();
                let _ = child.wait();
            }
            let log = &self.ranks[i].1;
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("the {} run failed ({status}); {}:\n{}", self.name, log.display(), tail.join("\n"));
        }
        let seconds = self.started.elapsed().as_secs_f64();
        Ok((UNet::load(&self.output_dir.join("final/unet"), Device::Cpu, Kind::Float)?, seconds))
    }
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
        buckets: None,
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

    step(&format!("teacher: training the UNet from scratch, {} steps, as {} data-parallel processes", o.teacher_steps, o.teacher_ranks));
    // the teacher's ranks share its batch: the same run as one process, in less time
    let teacher_batch = (o.batch_size / o.teacher_ranks.max(1)).max(1);
    let cfg = write_run_yaml(out, "teacher", &run_yaml(o, "pipeline-init", "../pipeline-init/unet", "random", false, "teacher", o.teacher_steps, o.teacher_lr, teacher_batch, ""))?;
    let (teacher, teacher_secs) = TrainJob::start(o, out, "teacher", &cfg, o.teacher_ranks, o.teacher_ranks, true)?.finish()?;
    let teacher_config = teacher.model.config.clone();
    write_pipeline_dir(&out.join("teacher"), &out.join("pipeline-init"), &teacher_config, &weights::named_tensors(&teacher.vs), None, LcmGrid::default())?;

    step(&format!(
        "student bk_small distilled from the teacher, and beside it the control (the same student from scratch, task loss only), {} steps each",
        o.student_steps
    ));
    let kd_cfg = write_run_yaml(out, "student_kd", &run_yaml(o, "teacher", "bk_small", "teacher", true, "student_kd", o.student_steps, o.student_lr, o.batch_size, ""))?;
    let scratch_cfg = write_run_yaml(out, "student_scratch", &run_yaml(o, "teacher", "bk_small", "random", false, "student_scratch", o.student_steps, o.student_lr, o.batch_size, ""))?;
    let kd_job = TrainJob::start(o, out, "student_kd", &kd_cfg, 1, 2, true)?;
    let scratch_job = TrainJob::start(o, out, "student_scratch", &scratch_cfg, 1, 2, false)?;
    let (kd, kd_secs) = kd_job.finish()?;
    let (scratch, scratch_secs) = scratch_job.finish()?;
    write_pipeline_dir(&out.join("student_kd"), &out.join("teacher"), &kd.model.config, &weights::named_tensors(&kd.vs), None, LcmGrid::default())?;
    write_pipeline_dir(&out.join("student_scratch"), &out.join("teacher"), &scratch.model.config, &weights::named_tensors(&scratch.vs), None, LcmGrid::default())?;

    // the student as pruned, before any training: what KD starts from
    let pruned = pruned_student(&teacher)?;

    step("held-out denoising loss");
    let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_path(&out.join("teacher/scheduler"))?)?);
    let held = cache_batches(&out.join("cache-heldout"), 64, o.seed as i64 + 17)?;
    let eval = |u: &UNet| denoising_loss(&u.model, &schedule, &held, 10, o.seed as i64 + 23);
    let row = |name: &str, what: &str, u: &UNet, steps: u64, seconds: f64| ModelResult {
        name: name.into(),
        what: what.into(),
        params: u.num_params(),
        steps,
        seconds,
        held_out_loss: eval(u),
        caption_accuracy: None,
        fid: None,
        inception_score: None,
    };
    let mut models = vec![
        row("teacher", "trained from scratch (task loss)", &teacher, o.teacher_steps, teacher_secs),
        row("bk_small pruned", "the teacher's copy map, untrained", &pruned, 0, 0.0),
        row("bk_small KD", "pruned, then task + output KD + feature KD", &kd, o.student_steps, kd_secs),
        row("bk_small scratch", "random init, task loss only (control)", &scratch, o.student_steps, scratch_secs),
    ];

    step("generating every held-out caption with each model");
    let p = PipelineDir::open(&out.join("teacher"))?;
    let encoder = TeacherEncoder::load(&p, Device::Cpu, Kind::Float)?;
    let base = Parts { tokenizer: &encoder.tokenizer, text_encoder: &encoder.text_encoder.model, vae: &encoder.vae.model, unet: &teacher.model, schedule: &schedule, xl: None };
    let (originals, captions) = held_out_pairs(&out.join("heldout"))?;
    let embedding_cosine = caption_embedding_cosine(&encoder, &captions);
    let req = GenerateRequest {
        scheduler: SchedulerKind::Unipc,
        steps: o.sampling_steps,
        guidance_scale: o.guidance_scale,
        seed: o.seed,
        ..GenerateRequest::default()
    };
    let sampled = [&teacher.model, &kd.model, &scratch.model].iter().map(|u| sample_batched(&Parts { unet: u, ..base }, &captions, &req)).collect::<Result<Vec<_>>>()?;
    let real_accuracy = caption_score::accuracy(&originals, &captions)?;
    let sampled_models = [(0, "teacher"), (2, "student_kd"), (3, "student_scratch")];
    for ((m, dir), images) in sampled_models.iter().zip(&sampled) {
        models[*m].caption_accuracy = Some(record_samples(out, dir, dir, "", images, &captions, models[*m].steps)?);
    }
    let inception = match &o.inception {
        Some(path) => {
            step("FID and IS on the held-out set (--inception)");
            let dirs: Vec<&str> = sampled_models.iter().map(|(_, d)| *d).collect();
            for ((m, _), (fid, is)) in sampled_models.iter().zip(score_samples(out, path, &dirs)?) {
                (models[*m].fid, models[*m].inception_score) = (fid, is);
            }
            Some(path.clone())
        }
        None => None,
    };

    let columns = o.prompts.min(captions.len());
    let mut rows: Vec<Vec<RgbImage>> = vec![originals[..columns].to_vec()];
    rows.extend(sampled.iter().map(|r| r[..columns].to_vec()));
    let grid_path = out.join("grid.png");
    grid(&crate::grid::enlarged(&rows, 4)).save(&grid_path).with_context(|| format!("writing {}", grid_path.display()))?;

    let report = out.join("report.md");
    let facts = ReportFacts { captions: &captions, columns, real_accuracy, embedding_cosine, inception: inception.as_deref() };
    std::fs::write(&report, report_markdown(o, &models, &facts, &parts, t0.elapsed().as_secs_f64()))?;
    step(&format!("done: {} and {}", grid_path.display(), report.display()));
    Ok(DemoSummary { models, grid: grid_path, report, seconds: t0.elapsed().as_secs_f64() })
}

/// The student as pruned from `teacher`, before any training: what KD starts from.
fn pruned_student(teacher: &UNet) -> Result<UNet> {
    let plan = crate::distill::student::StudentPlan::resolve("bk_small", Some(&teacher.model.config))?;
    let s = UNet::build(&plan.config, Device::Cpu, Kind::Float, crate::models::Init::Torch);
    crate::distill::student::copy_from_teacher(&plan, teacher, &s)?;
    Ok(s)
}

/// The held-out images and their captions, in order.
pub(super) fn held_out_pairs(dir: &Path) -> Result<(Vec<RgbImage>, Vec<String>)> {
    let heldout = ImageFolder::open(dir)?;
    let (mut images, mut captions) = (vec![], vec![]);
    for i in 0..heldout.len() {
        let (img, caption) = heldout.decode(i).map_err(|e| anyhow::anyhow!("{}: {}", e.file.display(), e.reason))?;
        images.push(img);
        captions.push(caption);
    }
    Ok((images, captions))
}

/// Writes a model's `images` of the held-out captions to `samples/<dir>/`, and their caption
/// accuracies beside its run's training curves (`runs/<run>/tb`, at its last step `step`, as
/// `eval/caption_accuracy/<attribute><suffix>`).
pub(super) fn record_samples(out: &Path, dir: &str, run: &str, suffix: &str, images: &[RgbImage], captions: &[String], step: u64) -> Result<[f64; 3]> {
    let folder = out.join("samples").join(dir);
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    for (i, im) in images.iter().enumerate() {
        let path = folder.join(format!("{i:06}.png"));
        im.save(&path).with_context(|| format!("writing {}", path.display()))?;
    }
    let acc = caption_score::accuracy(images, captions)?;
    let mut tb = EventWriter::create(&out.join("runs").join(run).join("tb"), None)?;
    let tags: Vec<String> = caption_score::ATTRIBUTES.iter().map(|a| format!("eval/caption_accuracy/{a}{suffix}")).collect();
    let values: Vec<(&str, f32)> = tags.iter().zip(acc).map(|(t, a)| (t.as_str(), a as f32)).collect();
    tb.add_scalars(&values, step)?;
    tb.flush()?;
    Ok(acc)
}

/// FID and IS (mean, std) of the images in each `samples/<dir>` against the held-out ones
/// (`sdkd eval`'s protocol), with the Inception weights at `inception`.
pub(super) fn score_samples(out: &Path, inception: &Path, dirs: &[&str]) -> Result<Vec<(Option<f64>, Option<(f64, f64)>)>> {
    let net = InceptionV3::load(inception, Device::Cpu)?;
    let real = RealStats::read(&out.join("heldout"), &net, FID_DIMS, INCEPTION_BATCH)?;
    let scorer = Scorer {
        metrics: vec![Metric::Fid, Metric::Is],
        inception: Some((net, inception.to_path_buf())),
        real: Some(real),
        clip: None,
        dims: FID_DIMS,
        batch: INCEPTION_BATCH,
    };
    dirs.iter()
        .map(|dir| {
            let folder = out.join("samples").join(dir);
            let paths = crate::eval::list_images(&folder)?;
            let s = scorer.score(&Images { folder: &folder, scored: &paths, captioned: vec![], cache: None })?;
            Ok((s.fid, s.is_mean.zip(s.is_std)))
        })
        .collect()
}

/// `req` for each of `prompts` (same seed), 16 prompts per batched UNet call: the images of
/// one call per prompt, in far less time on the CPU (`pipeline::generate_batch`).
pub(super) fn sample_batched(parts: &Parts<'_>, prompts: &[String], req: &GenerateRequest) -> Result<Vec<RgbImage>> {
    let mut images = vec![];
    for chunk in prompts.chunks(16) {
        let reqs: Vec<GenerateRequest> = chunk.iter().map(|p| GenerateRequest { prompt: p.clone(), ..req.clone() }).collect();
        let never = || None;
        let members: Vec<BatchMember<'_>> = reqs.iter().map(|r| BatchMember { req: r, stop: &never, noise: None }).collect();
        let mut out: Vec<Option<Result<Vec<RgbImage>>>> = (0..chunk.len()).map(|_| None).collect();
        generate_batch(parts, &members, &mut |_, _| {}, &mut |i, r| out[i] = Some(r));
        for r in out {
            images.extend(r.expect("generate_batch settles every member")?);
        }
    }
    Ok(images)
}

/// The mean cosine similarity, over pairs of different captions, of the text encoder's
/// embeddings of their words (positions 1..=12, the longest caption's tokens after the start
/// token), and of the whole 77-token sequence the UNet attends to.
fn caption_embedding_cosine(encoder: &TeacherEncoder, captions: &[String]) -> (f64, f64) {
    let mut unique: Vec<&String> = captions.iter().collect();
    unique.sort();
    unique.dedup();
    let e = encoder.encode_text(&unique).to_kind(Kind::Double);
    let mean_cos = |x: &Tensor| {
        let x = x.flatten(1, -1);
        let x = &x / x.norm_scalaropt_dim(2, [1], true);
        let c = x.mm(&x.tr());
        let n = c.size()[0];
        (c.sum(Kind::Double).double_value(&[]) - n as f64) / (n * (n - 1)).max(1) as f64
    };
    (mean_cos(&e.narrow(1, 1, 12)), mean_cos(&e))
}

/// What the report says besides the model rows.
struct ReportFacts<'a> {
    captions: &'a [String],
    /// The first `columns` captions are the grid's.
    columns: usize,
    /// The reader on the held-out images themselves.
    real_accuracy: [f64; 3],
    /// `caption_embedding_cosine`.
    embedding_cosine: (f64, f64),
    /// The Inception weights FID and IS were computed with.
    inception: Option<&'a Path>,
}

pub(super) fn percent(x: f64) -> String {
    format!("{:.0}%", 100.0 * x)
}

fn report_markdown(o: &DemoOptions, models: &[ModelResult], f: &ReportFacts<'_>, parts: &super::DemoTeacherReport, seconds: f64) -> String {
    let teacher = &models[0];
    let mut s = String::from("# sdkd demo report\n\n");
    s += &format!(
        "The whole job on embedded data in {seconds:.0} s on this machine: {} synthetic {res}x{res} image-caption pairs \
         ({} held out), a demo pipeline (a VAE trained here to {:.1} dB PSNR on held-out images, a frozen random \
         CLIP text encoder over the captions' words, SD-1.5's noise schedule with v-prediction), a teacher UNet \
         trained from scratch as {} data-parallel processes, and a BK-SDM `bk_small` student distilled from it, \
         against the same student trained from scratch for the same steps. Every run trains on the empty prompt \
         with probability {} (`data.caption_dropout`).\n\n",
        o.count,
        o.held_out,
        parts.psnr_held_out,
        o.teacher_ranks,
        o.caption_dropout,
        res = DEMO_RESOLUTION
    );
    s += "| model | how | parameters | of teacher | steps | train time | held-out denoising loss |\n|---|---|---|---|---|---|---|\n";
    for m in models {
        s += &format!(
            "| {} | {} | {} | {:.1}% | {} | {:.0} s | {:.4} |\n",
            m.name,
            m.what,
            crate::formatting::group_digits(m.params),
            100.0 * m.params as f64 / teacher.params as f64,
            m.steps,
            m.seconds,
            m.held_out_loss
        );
    }
    let kd = &models[2];
    let scratch = &models[3];
    s += &format!(
        "\nHeld-out denoising loss: the MSE of each UNet's prediction of its target (v, the scheduler's `prediction_type`) on {} held-out latents at 10 fixed \
         timesteps with fixed noise (lower is better). With the same steps, data, seed and learning rate, the distilled student \
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
    s += &format!(
        "## Caption following\n\nEach model draws all {} held-out captions (UniPC, {} steps, guidance {}, seed {}; \
         `samples/<model>/`), and the attributes the caption states are read back from the pixels \
         (`demo::caption_score`): the background colour (the border's median, nearest palette colour), the object \
         colour (the shape colour most of the pixels far from the background are close to) and the position (the \
         quadrant of those pixels' centroid). Chance is about 25% for each.\n\n",
        f.captions.len(),
        o.sampling_steps,
        o.guidance_scale,
        o.seed
    );
    s += "| images | background | object colour | position |\n|---|---|---|---|\n";
    let acc_row = |name: &str, a: &[f64; 3]| format!("| {name} | {} | {} | {} |\n", percent(a[0]), percent(a[1]), percent(a[2]));
    s += &acc_row("held-out images (the reader's check)", &f.real_accuracy);
    for m in models {
        if let Some(a) = &m.caption_accuracy {
            s += &acc_row(&m.name, a);
        }
    }
    if let (Some(t), Some(k), Some(c)) = (&teacher.caption_accuracy, &kd.caption_accuracy, &scratch.caption_accuracy) {
        let ratio = |i: usize| if t[i] > 0.0 { format!("{:.0}%", 100.0 * k[i] / t[i]) } else { "-".into() };
        s += &format!(
            "\nThe KD student keeps {} / {} / {} of the teacher's accuracies (background / object colour / position); \
             it is ahead of the control by {:+.0} / {:+.0} / {:+.0} points.\n",
            ratio(0),
            ratio(1),
            ratio(2),
            100.0 * (k[0] - c[0]),
            100.0 * (k[1] - c[1]),
            100.0 * (k[2] - c[2])
        );
    }
    s += &format!(
        "\nThe frozen text encoder keeps captions apart: the mean cosine similarity between the embeddings of two \
         different held-out captions is {:.3} over their word positions and {:.3} over the whole 77-token sequence \
         (1 would be indistinguishable).\n\n",
        f.embedding_cosine.0, f.embedding_cosine.1
    );
    s += "## FID and IS\n\n";
    match f.inception {
        Some(path) => {
            s += &format!(
                "Against the {} held-out images, with the Inception weights {} (pytorch-fid's FID, torch-fidelity's IS, \
                 `sdkd eval`'s code). From {} images per set, far fewer than the 2 x 2048 the covariance needs, FID is \
                 biased upward and unstable: these numbers compare the models of this run with each other, not with \
                 published FIDs.\n\n| model | FID | IS |\n|---|---|---|\n",
                f.captions.len(),
                path.display(),
                f.captions.len()
            );
            for m in models {
                if let (Some(fid), Some((is, sd))) = (m.fid, m.inception_score) {
                    s += &format!("| {} | {fid:.2} | {is:.3} ± {sd:.3} |\n", m.name);
                }
            }
            s += "\n";
        }
        None => {
            s += &format!("Not computed: pass `--inception <file>` to add FID and IS on the held-out set; sdkd needs {WEIGHTS_HELP}\n\n");
        }
    }
    s += &format!(
        "`grid.png`: one column per held-out caption (the first {}); rows: the held-out image, the teacher, the KD \
         student, the control.\n\nCaptions:\n\n",
        f.columns
    );
    for (i, p) in f.captions[..f.columns].iter().enumerate() {
        s += &format!("{}. {p}\n", i + 1);
    }
    s += "\nEverything here can be rerun by hand: `configs/*.yaml` are the run files (`sdkd train --config ...`), \
          `teacher/`, `student_kd/` and `student_scratch/` are diffusers pipeline folders (`sdkd generate --model ...`), \
          `runs/*/tb` are TensorBoard logs.\n";
    s
}
