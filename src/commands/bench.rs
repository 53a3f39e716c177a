//! `sdkd bench`: how fast the distillation training step (`--mode train`) or one denoising step
//! of inference (`--mode infer`) runs, on random latents and text embeddings.
//!
//! Train mode times `Distiller::micro_step` + `Distiller::update` exactly as `sdkd train` runs
//! them (noise and timesteps, the frozen teacher's forward with the paired features, the student's
//! forward and backward, the three losses, clipping, AdamW), one optimizer step per timed step,
//! without EMA (the PyTorch reference has none). Infer mode times one UNet forward on the CFG
//! batch (2·B: unconditional and conditional) plus the guidance combination, under no-grad.
//! Weights are random when the teacher is given as a bare config.json: speed does not depend on
//! their values. Every step is timed on its own after `--warmup` untimed steps; the median is the
//! headline (robust to the other processes of a shared machine).
//!
//! Under torchrun or SLURM (as `sdkd train`, docs/distributed.md) each rank runs the step and its
//! gradients are averaged across the ranks as the trainer does, timed on their own
//! (`allreduce_ms`); `--mode allreduce` times that averaging alone, on gradients shaped as the
//! student's (no teacher, no forward), so a small machine can measure a large student's.
use crate::models::pipeline_dir::unet_dir;
use crate::config::StateDtype;
use crate::runtime::{DeviceChoice, Precision};
use crate::distill::loss::LossWeights;
use crate::distill::optim::AdamWConfig;
use crate::distill::student::{copy_from_teacher, StudentPlan};
use crate::distill::trainer::{Distiller, Teacher};
use crate::distributed::{Launch, Ranks};
use crate::models::unet::AddedCond;
use crate::models::unet_config::TIME_IDS;
use crate::models::{Checkpointing, Init, UNet, UNetConfig};
use crate::schedulers::{NoiseSchedule, SchedulerConfig};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchMode {
    /// The distillation training step.
    Train,
    /// One denoising step with classifier-free guidance.
    Infer,
    /// The gradient all-reduce of a data-parallel step alone (under a launch).
    Allreduce,
}

/// What `--student` names in infer mode to time the teacher itself.
pub const TEACHER_ITSELF: &str = "teacher";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The teacher: a diffusers UNet folder, a pipeline folder (its unet/), or a UNet
    /// config.json (random weights).
    #[arg(long)]
    pub teacher: PathBuf,
    /// A preset (bk_base/sd_small, bk_small, bk_tiny/sd_tiny; on an SDXL teacher also ssd_1b, vega, koala_1b, koala_700m), a spec YAML, a UNet folder or
    /// config.json; in infer mode `teacher` times the teacher itself.
    #[arg(long)]
    pub student: String,
    /// Training: samples per step. Inference: images per step (the UNet sees twice as many).
    #[arg(long, default_value_t = 1)]
    pub batch_size: i64,
    /// Latent height and width (image size / 8).
    #[arg(long, default_value_t = 64)]
    pub latent_size: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (allocator, oneDNN/cuDNN kernel choice, first-touch page faults).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Compute dtype of the teacher and the student (train) or of the timed UNet (infer); the
    /// trained student keeps fp32 master weights, as in `sdkd train`.
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: Precision,
    #[arg(long, value_enum, default_value = "train")]
    pub mode: BenchMode,
    /// LibTorch intra-op threads (default: LibTorch's choice, one per core).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Train mode: what the student's backward recomputes (none, blocks, attention), as
    /// `train.gradient_checkpointing`.
    #[arg(long, default_value = "none", value_parser = parse_yaml_value::<Checkpointing>)]
    pub gradient_checkpointing: Checkpointing,
    /// Train mode: the dtype of AdamW's moments (fp32, bf16), as `optim.state_dtype`.
    #[arg(long, default_value = "fp32", value_parser = parse_yaml_value::<StateDtype>)]
    pub state_dtype: StateDtype,
    /// The memory peak of the steps alone (CPU: peak RSS; CUDA: the caching allocator's peak)
    /// and what was held before them (train and infer mode).
    #[arg(long)]
    pub report_memory: bool,
}

/// A flag value spelled as in the run YAML (`blocks`, `bf16`).
fn parse_yaml_value<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(Value::String(s.to_string())).map_err(|e| e.to_string())
}

/// `--report-memory`: the steps' memory peak (warm-up included), in MiB.
#[derive(Debug, Serialize)]
pub struct StepMemory {
    /// Held when the steps began: the models, AdamW's moments, the EMA, the runtime.
    pub before_mb: f64,
    pub peak_mb: f64,
    /// `peak_mb - before_mb`: the gradients, the activations and the temporaries of a step.
    pub step_mb: f64,
    /// What AdamW's moments take (part of `before_mb`).
    pub optimizer_state_mb: f64,
    /// CPU: the peak of the tensor bytes allocated during the steps and live at once (the
    /// gradients, activations and temporaries, without the heap's slack that `step_mb` has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_tensors_mb: Option<f64>,
    pub method: &'static str,
}

/// Timings of the timed steps, in milliseconds.
#[derive(Debug, Clone)]
pub struct StepTimes(pub Vec<f64>);

impl StepTimes {
    pub fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return f64::NAN;
        }
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    pub fn min(&self) -> f64 {
        self.0.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// The teacher's config and, when `path` is a folder, its weights.
fn teacher_source(path: &Path) -> Result<(UNetConfig, Option<PathBuf>)> {
    let path = &crate::hub::local(path, crate::hub::Want::Unet)?;
    if path.is_dir() {
        let dir = unet_dir(path);
        Ok((UNetConfig::from_path(&dir).with_context(|| format!("--teacher {}", path.display()))?, Some(dir)))
    } else if path.is_file() {
        Ok((UNetConfig::from_path(path).with_context(|| format!("--teacher {}", path.display()))?, None))
    } else {
        bail!("--teacher {}: no such file or folder (a UNet folder, a pipeline folder or a UNet config.json)", path.display())
    }
}

/// The teacher UNet: loaded from its folder, or random from a bare config.
fn teacher_unet(config: &UNetConfig, dir: Option<&Path>, device: Device, kind: Kind) -> Result<UNet> {
    match dir {
        Some(dir) => UNet::load(dir, device, kind),
        None => Ok(UNet::build(config, device, kind, Init::Torch)),
    }
}

/// Waits for queued GPU work so that a step's time is its own.
fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn rusage() -> Option<libc::rusage> {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct it is given.
    (unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0).then_some(usage)
}

/// Peak resident set size of this program in MiB: VmHWM, not getrusage's ru_maxrss, which also
/// counts the parent's resident set when the process was forked from a large one (a test
/// harness, `sdkd plan`). Under `--report-memory` the kernel's mark was restarted before the
/// steps, so the larger of the mark before that and the one after.
pub fn peak_rss_mb(window: Option<&crate::memory::PeakWindow>) -> f64 {
    let now = crate::memory::peak_rss_bytes();
    let before = window.and_then(|w| w.rss_peak_before_start);
    match (now, before) {
        (Some(n), b) => n.max(b.unwrap_or(0)) as f64 / 1048576.0,
        (None, _) => rusage().map(|u| u.ru_maxrss as f64 / 1024.0).unwrap_or(f64::NAN),
    }
}

/// CPU time (user + system, all threads) this process has used, in milliseconds: unlike wall
/// time it does not grow while other processes hold the cores.
pub fn cpu_time_ms() -> f64 {
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    rusage().map(|u| ms(u.ru_utime) + ms(u.ru_stime)).unwrap_or(f64::NAN)
}

/// GPU memory this process holds at the end, in MiB, from nvidia-smi: what LibTorch's caching
/// allocator reserved (an upper bound of the peak of live tensors, which tch cannot read). None
/// where nvidia-smi is missing or does not list this process (e.g. another PID namespace).
fn gpu_mem_mb() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    let pid = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
        let mut parts = line.split(',').map(str::trim);
        (parts.next()? == pid).then(|| parts.next()?.parse().ok()).flatten()
    })
}

/// Runs `step(i)` for i in `0..warmup + steps`; returns the wall and CPU times of each of the
/// last `steps` runs.
fn time_steps(device: Device, warmup: usize, steps: usize, mut step: impl FnMut(usize) -> Result<()>) -> Result<(StepTimes, StepTimes)> {
    let (mut wall, mut cpu) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
    for i in 0..warmup + steps {
        sync(device);
        let (t0, c0) = (Instant::now(), cpu_time_ms());
        step(i)?;
        sync(device);
        if i >= warmup {
            wall.push(t0.elapsed().as_secs_f64() * 1e3);
            cpu.push(cpu_time_ms() - c0);
        }
    }
    Ok((StepTimes(wall), StepTimes(cpu)))
}

/// The most steps (timed and warm-up) one benchmark runs.
const MAX_STEPS: usize = 10_000;

fn check_args(args: &BenchArgs) -> Result<()> {
    if args.batch_size < 1 {
        bail!("--batch-size {} must be at least 1", args.batch_size);
    }
    if args.latent_size < 1 {
        bail!("--latent-size {} must be at least 1", args.latent_size);
    }
    if args.steps < 1 {
        bail!("--steps {} must be at least 1", args.steps);
    }
    // Each step's random inputs are drawn before the clock starts, so the count sizes memory.
    if args.steps.saturating_add(args.warmup) > MAX_STEPS {
        bail!("--steps {} and --warmup {}: at most {MAX_STEPS} steps in all (their inputs are drawn before timing)", args.steps, args.warmup);
    }
    if args.mode == BenchMode::Infer && (args.gradient_checkpointing != Checkpointing::None || args.state_dtype != StateDtype::Fp32) {
        bail!("--gradient-checkpointing and --state-dtype are for --mode train");
    }
    if args.mode == BenchMode::Allreduce && args.report_memory {
        bail!("--report-memory is for --mode train and --mode infer");
    }
    if let Some(t) = args.threads {
        if t < 1 {
            bail!("--threads {t} must be at least 1");
        }
    }
    Ok(())
}

/// A UNet that was timed: its name, size and config.
#[derive(Debug, Serialize)]
pub struct TimedUnet {
    pub name: String,
    pub params: i64,
    pub config: Value,
    /// Train mode: the (teacher, student) feature pairs of the KD loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature_pairs: Option<Vec<[String; 2]>>,
}

#[derive(Debug, Serialize)]
pub struct TeacherSize {
    pub params: i64,
}

/// What `sdkd bench --json` prints.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub mode: &'static str,
    pub device: String,
    pub precision: &'static str,
    pub threads: i64,
    pub omp_wait_policy: Option<String>,
    pub gomp_spincount: Option<String>,
    pub batch_size: i64,
    /// What the UNet sees: twice `batch_size` in infer mode (the CFG batch).
    pub unet_batch: i64,
    pub latent_size: i64,
    pub steps: usize,
    pub warmup: usize,
    pub steps_per_s: f64,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    pub step_ms: Vec<f64>,
    pub step_cpu_ms_median: f64,
    pub step_cpu_ms: Vec<f64>,
    pub peak_mem_mb: f64,
    pub peak_mem_kind: &'static str,
    /// CUDA only (null when nvidia-smi cannot say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem_mb: Option<Option<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem_kind: Option<&'static str>,
    /// CUDA only: the caching allocator's peak of live tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_peak_allocated_mb: Option<f64>,
    /// `--report-memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<StepMemory>,
    /// Train mode: the student's `gradient_checkpointing` and AdamW's `state_dtype`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<Checkpointing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dtype: Option<StateDtype>,
    /// Train mode: the teacher and the student.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<TeacherSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student: Option<TimedUnet>,
    /// Infer mode: the UNet timed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unet: Option<TimedUnet>,
    /// Under a launch: the processes, and the gradient averaging of each timed step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_ms_median: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_ms: Option<Vec<f64>>,
    /// Bytes of gradients each rank contributes per step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_bytes: Option<usize>,
}

/// Wall and CPU times of each timed step, and what was timed.
struct Measured {
    times: (StepTimes, StepTimes),
    memory: Option<StepMemory>,
    window: Option<crate::memory::PeakWindow>,
    teacher: Option<TeacherSize>,
    timed: TimedUnet,
    /// Under a launch: each timed step's gradient averaging, and the gradients' bytes.
    allreduce: Option<(StepTimes, usize)>,
}

/// An SDXL (`text_time`) UNet's added conditioning for `rows` rows of `l`² latents: random
/// pooled embeddings and the time ids of an uncropped square image; empty for SD-1.x/2.x.
fn added_cond(config: &UNetConfig, rows: i64, l: i64, device: Device, kind: Kind) -> AddedCond {
    let Some(e) = &config.addition_embed else { return AddedCond::default() };
    let pooled = e.input_dim - TIME_IDS * e.time_embed_dim;
    let px = (l * 8) as f64;
    let ids = Tensor::from_slice(&[px, px, 0.0, 0.0, px, px]).to_kind(kind).to_device(device).view([1, TIME_IDS]).repeat([rows, 1]);
    AddedCond { text_embeds: Some(Tensor::randn([rows, pooled], (kind, device))), time_ids: Some(ids), timestep_cond: None }
}

/// One denoising step with classifier-free guidance: the UNet on the CFG batch, then the guidance.
fn infer(args: &BenchArgs, teacher_config: &UNetConfig, teacher_dir: Option<&Path>, device: Device, kind: Kind) -> Result<Measured> {
    let (b, l) = (args.batch_size, args.latent_size);
    let (unet, description) = if args.student == TEACHER_ITSELF {
        let unet = teacher_unet(teacher_config, teacher_dir, device, kind)?;
        let d = TimedUnet { name: TEACHER_ITSELF.into(), params: unet.num_params(), config: teacher_config.to_json(), feature_pairs: None };
        (unet, d)
    } else {
        // A student's speed does not depend on its values: random weights, no teacher load.
        let plan = StudentPlan::resolve(&args.student, Some(teacher_config)).with_context(|| format!("--student {:?}", args.student))?;
        let unet = UNet::build(&plan.config, device, kind, Init::Torch);
        let d = TimedUnet { name: plan.name.clone(), params: unet.num_params(), config: plan.config.to_json(), feature_pairs: None };
        (unet, d)
    };
    let latents = Tensor::randn([b, teacher_config.in_channels, l, l], (kind, device));
    let context = Tensor::randn([2 * b, 77, teacher_config.cross_attention_dim], (kind, device));
    let t = Tensor::from(500i64).to_device(device);
    let guidance = 7.5;
    let added = added_cond(teacher_config, 2 * b, l, device, kind);
    let window = args.report_memory.then(|| crate::memory::PeakWindow::start(device)).transpose()?;
    let times = tch::no_grad(|| {
        time_steps(device, args.warmup, args.steps, |_| {
            let eps = unet.model.predict_cond(&Tensor::cat(&[&latents, &latents], 0), &t, &context, &added); // (2b, c, l, l)
            let (uncond, cond) = (eps.narrow(0, 0, b), eps.narrow(0, b, b));
            let _guided = &uncond + (cond - &uncond) * guidance;
            Ok(())
        })
    })?;
    let memory = window.as_ref().map(|w| step_memory(w, 0)).transpose()?;
    Ok(Measured { times, memory, window, teacher: None, timed: description, allreduce: None })
}

/// The scheduler config of the pipeline a UNet folder belongs to, else SD-1.5's defaults (the
/// noise schedule does not change the step's cost).
fn scheduler_config(teacher_dir: Option<&Path>) -> Result<SchedulerConfig> {
    match teacher_dir.and_then(Path::parent).map(|p| p.join("scheduler/scheduler_config.json")) {
        Some(path) if path.is_file() => SchedulerConfig::from_path(&path),
        _ => Ok(SchedulerConfig::default()),
    }
}

/// The distillation step through the trainer's `Distiller`, one optimizer step per timed step.
fn train(args: &BenchArgs, teacher_config: &UNetConfig, teacher_dir: Option<&Path>, device: Device, kind: Kind, ranks: Option<&Ranks>) -> Result<Measured> {
    if args.student == TEACHER_ITSELF {
        bail!("--student {TEACHER_ITSELF} is only for --mode infer: name a preset, spec or UNet config to distil into");
    }
    let (b, l) = (args.batch_size, args.latent_size);
    let plan = StudentPlan::resolve(&args.student, Some(teacher_config)).with_context(|| format!("--student {:?}", args.student))?;
    let teacher = teacher_unet(teacher_config, teacher_dir, device, kind)?;
    // As `sdkd train`: fp32 student weights, initialised from the teacher by the copy map.
    let student = UNet::build(&plan.config, device, Kind::Float, Init::Torch);
    copy_from_teacher(&plan, &teacher, &student)?;
    let schedule = Arc::new(NoiseSchedule::new(scheduler_config(teacher_dir)?)?);
    let (teacher_inner, _) = plan.inner_features();
    let teacher_size = TeacherSize { params: teacher.num_params() };
    let description = TimedUnet {
        name: plan.name.clone(),
        params: student.num_params(),
        config: plan.config.to_json(),
        feature_pairs: Some(plan.feature_pairs.iter().map(|p| [p.teacher.clone(), p.student.clone()]).collect()),
    };
    let teacher = Teacher::new(teacher, teacher_inner);
    // the student computes in --precision over its fp32 master weights, as `sdkd train` on a GPU
    let optim = AdamWConfig { state_kind: args.state_dtype.kind(), ..AdamWConfig::default() };
    let mut d = Distiller::new(student, plan, Some(teacher), schedule, optim, None, LossWeights::default())?
        .with_compute_kind(kind)?
        .with_checkpointing(args.gradient_checkpointing);
    // The data of each step is drawn before the clock starts: loading is not the step.
    let (in_ch, ctx_dim) = (teacher_config.in_channels, teacher_config.cross_attention_dim);
    let data: Vec<(Tensor, Tensor)> = (0..args.warmup + args.steps)
        .map(|_| (Tensor::randn([b, in_ch, l, l], (Kind::Float, device)), Tensor::randn([b, 77, ctx_dim], (Kind::Float, device))))
        .collect();
    let added = added_cond(teacher_config, b, l, device, Kind::Float);
    let lr = 5e-5;
    let params = d.optimizer().params();
    let gradient_bytes = params.iter().map(|p| p.numel() * 4).sum();
    let mut allreduce = vec![];
    let window = args.report_memory.then(|| crate::memory::PeakWindow::start(device)).transpose()?;
    let times = time_steps(device, args.warmup, args.steps, |i| {
        let (latents, context) = &data[i];
        let terms = d.micro_step_cond(latents, context, &added, 1);
        if let Some(ranks) = ranks {
            sync(device);
            let t0 = Instant::now();
            ranks.average_gradients(&params)?;
            sync(device);
            if i >= args.warmup {
                allreduce.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let _update = d.update(lr, Some(1.0))?;
        // read like the trainer's logging does (and a NaN would make the timing meaningless)
        if !terms.total.double_value(&[]).is_finite() {
            bail!("the loss is not finite");
        }
        Ok(())
    })?;
    let allreduce = ranks.map(|_| (StepTimes(allreduce), gradient_bytes));
    let memory = window.as_ref().map(|w| step_memory(w, d.optimizer().state_bytes())).transpose()?;
    Ok(Measured { times, memory, window, teacher: Some(teacher_size), timed: description, allreduce })
}

/// What `--report-memory` reports of the steps a window watched; `optimizer_bytes`: AdamW's moments.
fn step_memory(w: &crate::memory::PeakWindow, optimizer_bytes: i64) -> Result<StepMemory> {
    let mb = |bytes: i64| bytes as f64 / 1048576.0;
    let peak = w.peak()?;
    Ok(StepMemory {
        before_mb: mb(w.before),
        peak_mb: mb(peak),
        step_mb: mb(peak - w.before),
        optimizer_state_mb: mb(optimizer_bytes),
        step_tensors_mb: w.tensor_peak()?.map(mb),
        method: w.what(),
    })
}

/// The gradient averaging of a data-parallel step alone: gradients of the student's shapes
/// (ones, from a trivial backward), averaged across the ranks once per timed step.
fn allreduce(args: &BenchArgs, teacher_config: &UNetConfig, device: Device, ranks: &Ranks) -> Result<Measured> {
    let plan = StudentPlan::resolve(&args.student, Some(teacher_config)).with_context(|| format!("--student {:?}", args.student))?;
    let student = UNet::build(&plan.config, device, Kind::Float, Init::Torch);
    let params: Vec<Tensor> = crate::models::weights::named_tensors(&student.vs).into_iter().map(|(_, t)| t).collect();
    let mut loss = Tensor::zeros([], (Kind::Float, device));
    for p in &params {
        loss += p.sum(Kind::Float);
    }
    loss.backward();
    let gradient_bytes = params.iter().map(|p| p.numel() * 4).sum();
    let times = time_steps(device, args.warmup, args.steps, |_| ranks.average_gradients(&params))?;
    let description = TimedUnet { name: plan.name.clone(), params: student.num_params(), config: plan.config.to_json(), feature_pairs: None };
    Ok(Measured { allreduce: Some((times.0.clone(), gradient_bytes)), times, memory: None, window: None, teacher: None, timed: description })
}

/// Refuses a UNet step whose activations `device` cannot hold, before any is allocated (a failed
/// LibTorch allocation ends the process): a floor, the latents and three of the first block's
/// feature maps at `latent`² for `batch` samples (`sdkd plan` asks it before its probe steps).
pub fn check_step_memory(config: &UNetConfig, batch: i64, latent: i64, device: Device, kind: Kind) -> Result<()> {
    let c0 = config.block_out_channels.first().copied().unwrap_or(1) as f64;
    let map = batch as f64 * (latent as f64).powi(2) * kind.elt_size_in_bytes() as f64;
    let bytes = map * (config.in_channels as f64 + 3.0 * c0);
    ensure!(
        crate::memory::device_can_hold(device, bytes),
        "a UNet step on {batch} latent(s) of {latent}x{latent} needs at least {:.1} GiB, more than {device:?} can allocate; ask for a smaller size",
        bytes / (1u64 << 30) as f64
    );
    Ok(())
}

/// Runs the benchmark and returns its report.
pub fn measure(args: &BenchArgs) -> Result<BenchReport> {
    check_args(args)?;
    if let Some(t) = args.threads {
        tch::set_num_threads(t);
    }
    let device = args.device.resolve().context("--device")?;
    let kind = args.precision.kind();
    let launch = Launch::from_env(|k| std::env::var(k).ok())?;
    let (ranks, device) = match &launch {
        Some(l) => {
            let (ranks, device) = Ranks::join(l, device, std::time::Duration::from_secs(600))?;
            (Some(ranks), device)
        }
        None if args.mode == BenchMode::Allreduce => {
            bail!("--mode allreduce times the gradient all-reduce of a data-parallel step: run it under torchrun or srun (docs/distributed.md)")
        }
        None => (None, device),
    };
    tch::manual_seed(args.seed);
    let (teacher_config, teacher_dir) = teacher_source(&args.teacher)?;
    let b = args.batch_size;
    let infer_mode = args.mode == BenchMode::Infer;
    if args.mode != BenchMode::Allreduce {
        let unet_batch = if infer_mode { 2 * b } else { b };
        check_step_memory(&teacher_config, unet_batch, args.latent_size, device, kind)
            .with_context(|| format!("--batch-size {b}, --latent-size {}", args.latent_size))?;
    }
    let Measured { times: (times, cpu_times), memory, window, teacher, timed, allreduce: reduced } = match (args.mode, &ranks) {
        (BenchMode::Infer, _) => infer(args, &teacher_config, teacher_dir.as_deref(), device, kind)?,
        (BenchMode::Train, _) => train(args, &teacher_config, teacher_dir.as_deref(), device, kind, ranks.as_ref())?,
        (BenchMode::Allreduce, Some(r)) => allreduce(args, &teacher_config, device, r)?,
        (BenchMode::Allreduce, None) => unreachable!("refused above"),
    };
    let median = times.median();
    let (student, unet) = if infer_mode { (None, Some(timed)) } else { (Some(timed), None) };
    Ok(BenchReport {
        world_size: ranks.as_ref().map(Ranks::size),
        allreduce_ms_median: reduced.as_ref().map(|(t, _)| t.median()),
        allreduce_ms: reduced.as_ref().map(|(t, _)| t.0.clone()),
        gradient_bytes: reduced.as_ref().map(|(_, b)| *b),
        mode: match args.mode {
            BenchMode::Train => "train",
            BenchMode::Infer => "infer",
            BenchMode::Allreduce => "allreduce",
        },
        device: format!("{device:?}"),
        precision: args.precision.name(),
        threads: tch::get_num_threads() as i64,
        omp_wait_policy: std::env::var("OMP_WAIT_POLICY").ok(),
        gomp_spincount: std::env::var("GOMP_SPINCOUNT").ok(),
        batch_size: b,
        unet_batch: if infer_mode { 2 * b } else { b },
        latent_size: args.latent_size,
        steps: args.steps,
        warmup: args.warmup,
        steps_per_s: 1e3 / median,
        step_ms_median: median,
        step_ms_min: times.min(),
        step_cpu_ms_median: cpu_times.median(),
        step_ms: times.0,
        step_cpu_ms: cpu_times.0,
        peak_mem_mb: peak_rss_mb(window.as_ref()),
        peak_mem_kind: "peak RSS of this program (VmHWM)",
        gpu_mem_mb: device.is_cuda().then(gpu_mem_mb),
        gpu_mem_kind: device.is_cuda().then_some("GPU memory held at the end (nvidia-smi): the caching allocator's reservation"),
        // torch.cuda.max_memory_allocated(): the peak of live tensors, what the eager reference reports
        gpu_peak_allocated_mb: match device {
            Device::Cuda(i) => crate::aten_extra::cuda_memory_peaks(i).map(|(allocated, _)| allocated as f64 / 1048576.0).ok(),
            _ => None,
        },
        memory,
        gradient_checkpointing: (!infer_mode).then_some(args.gradient_checkpointing),
        state_dtype: (!infer_mode).then_some(args.state_dtype),
        teacher,
        student,
        unet,
    })
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let r = measure(args)?;
    if std::env::var("RANK").or_else(|_| std::env::var("SLURM_PROCID")).is_ok_and(|r| r.trim() != "0") {
        return Ok(()); // rank 0 reports for all
    }
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let what = match (&r.teacher, &r.student, &r.unet) {
        (Some(t), Some(s), _) => format!(
            "training step, {} -> {} ({} -> {} params), batch {}",
            args.teacher.display(),
            s.name,
            t.params,
            s.params,
            args.batch_size
        ),
        (_, _, Some(u)) => format!("denoising step, {} ({} params), CFG batch {}", u.name, u.params, 2 * args.batch_size),
        (None, Some(s), None) => format!("gradient all-reduce of {} ({} params)", s.name, s.params),
        _ => unreachable!("measure reports the student (train) or the UNet (infer)"),
    };
    println!("{what}, latent {0}x{0}, {1}, {2}, {3} thread(s)", args.latent_size, r.device, r.precision, r.threads);
    println!(
        "{:.1} ms/step median (min {:.1}, CPU time {:.1}) over {} steps after {} warm-up: {:.3} steps/s; peak RSS {:.0} MiB",
        r.step_ms_median, r.step_ms_min, r.step_cpu_ms_median, args.steps, args.warmup, r.steps_per_s, r.peak_mem_mb
    );
    if let Some(m) = &r.memory {
        println!(
            "memory: {:.0} MiB held before the steps ({:.0} MiB of it AdamW's moments), peak {:.0} MiB, so {:.0} MiB for a step; {}",
            m.before_mb, m.optimizer_state_mb, m.peak_mb, m.step_mb, m.method
        );
        if let Some(t) = m.step_tensors_mb {
            println!("tensors allocated during the steps: {t:.0} MiB live at the peak");
        }
    }
    if let (Some(w), Some(ms), Some(bytes)) = (r.world_size, r.allreduce_ms_median, r.gradient_bytes) {
        println!("gradients averaged over {w} process(es): {ms:.1} ms/step median ({:.1} MiB per rank)", bytes as f64 / 1048576.0);
    }
    if let Some(Some(g)) = r.gpu_mem_mb {
        println!("GPU memory held at the end: {g:.0} MiB");
    }
    Ok(())
}
