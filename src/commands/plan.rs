//! `sdkd plan --config run.yaml [--gpu-mem 24GB,80GB]`: the memory a run's training step needs,
//! before the run starts. The student's weights, gradients, AdamW moments and EMA and the
//! teacher's weights are counted; activations are measured: one training step (`sdkd bench --mode
//! train --report-memory`, the trainer's own `Distiller` step on random weights and inputs, each
//! in a fresh process) at batch 1 and at batch 2, with the run's student, resolution, precision,
//! `gradient_checkpointing` and `state_dtype`. Their difference is one sample's activations; the
//! peak at batch B is extrapolated as `peak(1) + (B - 1) · (peak(2) - peak(1))`, plus the EMA
//! (which the probe step has not). On the CPU the peak is the process's peak RSS, on CUDA the
//! caching allocator's peak (the CUDA context, some hundreds of MiB, comes on top).
//!
//! `--probe-width-divisor K` plans a run too large to step on this machine (SDXL's students at
//! 1024², on a CPU): the probes run on the same block structure with every width divided by K
//! (`UNetConfig::narrowed`), in the run's precision, and their live tensor bytes are split into a
//! per-sample part (scaled by K and the pixel ratio: activations are sums of width × pixels
//! terms) and a batch-independent part (the gradients, the weights' compute-dtype copies, the
//! optimizer's temporaries: scaled by the student's parameter ratio); the weights, moments, EMA
//! and teacher are counted at full size. `--shard-ranks N` gives one rank's share under
//! `optim.shard_state` (ZeRO-1): 1/N of AdamW's moments. `--teacher-inference` also plans the
//! teacher's denoising step (CFG batch), measured the same way.
//! Not included: the text encoders and VAE that image runs and validation load, and the loader's
//! prefetched batches.
use crate::config::{RunConfig, StateDtype};
use crate::distill::student::StudentPlan;
use crate::models::{Checkpointing, Init, Part, PipelineDir, UNet, UNetConfig};
use crate::runtime::{DeviceChoice, Precision};
use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind};

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The run YAML.
    #[arg(long)]
    pub config: PathBuf,
    /// Memory of the GPU to plan for, e.g. 24GB, or several: 24GB,40GB,80GB (GB, GiB and G all
    /// mean 2^30 bytes, as cards are sold); prints whether the run fits each and the largest
    /// batch that does.
    #[arg(long)]
    pub gpu_mem: Option<String>,
    /// Measure on this device instead of `train.device` (e.g. `cpu` to plan on a machine without
    /// the GPU; activations then have the CPU's kernels and dtype: fp32).
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Measure the probe steps at this resolution (px) instead of `data.resolution`, and scale
    /// the per-sample activations by the pixel ratio (resolution / probe)²: for a run too large
    /// to probe at its own size on this machine. Activations grow with the pixel count
    /// (convolutions, norms, and attention with memory-efficient SDPA); docs/benchmarks.md,
    /// "Memory", has the check of that scaling.
    #[arg(long)]
    pub probe_resolution: Option<u32>,
    /// Measure the probe steps on the teacher and student with every width divided by this (the
    /// same blocks, layers and heads), in the run's precision, and scale: for a model too wide to
    /// step on this machine (docs/benchmarks.md, "SDXL").
    #[arg(long)]
    pub probe_width_divisor: Option<i64>,
    /// Plan one rank of a data-parallel run over this many ranks with `optim.shard_state`
    /// (ZeRO-1: each rank keeps 1/N of AdamW's moments).
    #[arg(long)]
    pub shard_ranks: Option<usize>,
    /// Also plan the teacher's inference: one denoising step with classifier-free guidance, the
    /// largest number of images per step on each --gpu-mem.
    #[arg(long)]
    pub teacher_inference: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Whether a run fits one GPU size, and the largest batch that does.
#[derive(Debug, Serialize, Clone, PartialEq)]
pub struct GpuFit {
    pub gpu_mem_mb: f64,
    /// At the run's `train.batch_size` (or, for inference, one image).
    pub fits: bool,
    /// 0: not even one sample.
    pub largest_batch: u64,
}

/// The teacher's inference step (`--teacher-inference`); sizes in MiB.
#[derive(Debug, Serialize)]
pub struct InferencePlan {
    /// The UNet's weights in the compute dtype.
    pub weights_mb: f64,
    /// One image's share of the step's peak: its conditional and unconditional rows.
    pub activations_per_image_mb: f64,
    /// What the step holds whatever the batch: the weights and the rest of the step.
    pub fixed_mb: f64,
    pub gpus: Vec<GpuFit>,
}

/// What `sdkd plan --json` prints; sizes in MiB.
#[derive(Debug, Serialize)]
pub struct MemoryPlan {
    pub device: String,
    pub precision: &'static str,
    pub student: String,
    pub student_params: u64,
    pub teacher_params: u64,
    pub batch_size: usize,
    pub resolution: u32,
    pub gradient_checkpointing: Checkpointing,
    pub state_dtype: StateDtype,
    pub student_weights_mb: f64,
    pub gradients_mb: f64,
    /// AdamW's moments this rank keeps (1/`shard_ranks` of them).
    pub optimizer_mb: f64,
    pub ema_mb: f64,
    pub teacher_weights_mb: f64,
    /// Measured: peak(2) - peak(1), times `activation_scale`.
    pub activations_per_sample_mb: f64,
    /// The resolution the probe steps ran at (`--probe-resolution`, else `resolution`).
    pub probe_resolution: u32,
    /// The probes' widths were the run's divided by this (1: the run's own UNets).
    pub probe_width_divisor: i64,
    /// (resolution / probe_resolution)² × probe_width_divisor.
    pub activation_scale: f64,
    /// The ranks of `optim.shard_state` (1: unsharded).
    pub shard_ranks: usize,
    /// The batches of the two probe steps the slope is taken from: 1 and 2, or with a width
    /// divisor the last two of the doublings (the first where the growth per sample is steady).
    pub probe_batches: [usize; 2],
    /// Measured peaks of the probe steps (without EMA): peak RSS or the allocator's peak, or
    /// with a width divisor the live tensor bytes of the step.
    pub probe_peak_mb: [f64; 2],
    /// What the peak holds besides the counted parts and the activations: the runtime, the
    /// batch-independent part of a step, allocator slack.
    pub other_mb: f64,
    /// The peak at `batch_size`: the counted parts, `other_mb` and the activations.
    pub predicted_peak_mb: f64,
    /// `predicted_peak_mb` = `fixed_mb` + `batch_size` · `activations_per_sample_mb`.
    pub fixed_mb: f64,
    pub peak_kind: &'static str,
    /// One per `--gpu-mem` size.
    pub gpus: Vec<GpuFit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_inference: Option<InferencePlan>,
}

/// `24GB`, `80GiB`, `16G`, `512MB`: bytes, binary units.
fn parse_mem(text: &str) -> Result<f64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.trim().parse().map_err(|_| anyhow!("--gpu-mem {text:?}: not a size like 24GB"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "g" | "gb" | "gib" => (1u64 << 30) as f64,
        "m" | "mb" | "mib" => (1u64 << 20) as f64,
        "t" | "tb" | "tib" => (1u64 << 40) as f64,
        _ => bail!("--gpu-mem {text:?}: the unit must be GB, GiB, MB or TB"),
    };
    if !(value > 0.0 && value.is_finite()) {
        bail!("--gpu-mem {text:?}: not a positive size");
    }
    Ok(value * scale)
}

const MB: f64 = 1048576.0;

/// The YAML spelling of a config value (`blocks`, `bf16`).
fn yaml_word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// Whether each size holds `fixed + n · per_item` MiB at `wanted` items, and the largest n that fits.
pub fn fits(gpu_mem_mb: &[f64], fixed: f64, per_item: f64, wanted: usize) -> Vec<GpuFit> {
    gpu_mem_mb
        .iter()
        .map(|&mem| GpuFit {
            gpu_mem_mb: mem,
            fits: fixed + wanted as f64 * per_item <= mem,
            largest_batch: if per_item > 0.0 { ((mem - fixed) / per_item).floor().max(0.0) as u64 } else { u64::MAX },
        })
        .collect()
}

/// The training state counted from parameter counts, in bytes: what a rank holds before a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CountedState {
    pub student_weights: f64,
    pub gradients: f64,
    pub optimizer: f64,
    pub ema: f64,
    pub teacher: f64,
}

impl CountedState {
    /// fp32 student weights, gradients and EMA; two AdamW moments of `state_bytes` each, 1/`ranks`
    /// of them on this rank (`optim.shard_state`); the teacher in its compute dtype.
    pub fn new(student_params: f64, teacher_params: f64, state_bytes: f64, teacher_bytes: f64, ema: bool, ranks: usize) -> Self {
        CountedState {
            student_weights: 4.0 * student_params,
            gradients: 4.0 * student_params,
            optimizer: 2.0 * state_bytes * student_params / ranks.max(1) as f64,
            ema: if ema { 4.0 * student_params } else { 0.0 },
            teacher: teacher_bytes * teacher_params,
        }
    }

    /// Held before the step (the gradients come during it).
    pub fn held(&self) -> f64 {
        self.student_weights + self.optimizer + self.ema + self.teacher
    }
}

/// The fields of `sdkd bench --json` a plan reads.
#[derive(Deserialize)]
struct Probe {
    /// Whole-process peak RSS.
    peak_mem_mb: f64,
    memory: ProbeMemory,
}

#[derive(Deserialize)]
struct ProbeMemory {
    before_mb: f64,
    /// CUDA: the allocator's peak of the steps.
    peak_mb: f64,
    optimizer_state_mb: f64,
    /// CPU: the live tensor bytes of the steps.
    step_tensors_mb: Option<f64>,
}

impl Probe {
    /// The tensors a step adds to what was held: CPU the live tensor bytes, CUDA the allocator's
    /// peak less what was allocated before.
    fn step_tensors(&self) -> f64 {
        self.memory.step_tensors_mb.unwrap_or(self.memory.peak_mb - self.memory.before_mb)
    }
}

/// How a probe step runs: the UNets, device, dtype and mode.
struct ProbeSetup<'a> {
    cfg: &'a RunConfig,
    teacher_config: &'a Path,
    device: Device,
    precision: &'static str,
    resolution: u32,
}

/// One probe step in a fresh process: `sdkd bench --mode train|infer --report-memory --json`.
fn probe(p: &ProbeSetup, infer: bool, batch: usize) -> Result<Probe> {
    let exe = std::env::current_exe().context("finding the sdkd executable for the probe steps")?;
    let device = match p.device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let mut args: Vec<String> = ["bench", "--json", "--report-memory", "--steps", "1", "--warmup", "0"].iter().map(|s| s.to_string()).collect();
    args.extend(["--teacher".into(), p.teacher_config.display().to_string(), "--batch-size".into(), batch.to_string()]);
    args.extend(["--latent-size".into(), (p.resolution / 8).max(1).to_string(), "--device".into(), device, "--precision".into(), p.precision.into()]);
    if infer {
        args.extend(["--mode", "infer", "--student", crate::commands::bench::TEACHER_ITSELF].map(String::from));
    } else {
        args.extend(["--mode".into(), "train".into(), "--student".into(), p.cfg.student.to_string()]);
        args.extend(["--gradient-checkpointing".into(), yaml_word(&p.cfg.train.gradient_checkpointing)]);
        args.extend(["--state-dtype".into(), yaml_word(&p.cfg.optim.state_dtype)]);
    }
    let out = Command::new(exe).args(&args).output().context("running the probe step")?;
    if !out.status.success() {
        use std::os::unix::process::ExitStatusExt;
        let killed = match out.status.signal() {
            Some(9) => " (killed by SIGKILL: most likely the kernel's out-of-memory killer; plan with a smaller --probe-resolution)",
            _ => "",
        };
        bail!("the probe step at batch {batch} failed ({}){killed}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("reading the probe step's report")
}

/// A temporary folder for the narrowed teacher's config, made and removed by plan.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Result<ScratchDir> {
        let dir = std::env::temp_dir().join(format!("sdkd-plan-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("making {}", dir.display()))?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join("config.json"));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Parameters of a UNet counted without touching memory: uninitialised tensors are never paged in.
fn count(config: &UNetConfig) -> f64 {
    UNet::build(config, Device::Cpu, Kind::Float, Init::Empty).num_params() as f64
}

/// What every plan reads: the run, its UNets' configs, the device and the compute dtype.
struct Setup {
    cfg: RunConfig,
    device: Device,
    teacher_config: UNetConfig,
    teacher_config_file: PathBuf,
    student: StudentPlan,
    compute: Precision,
    gpu_mem: Vec<f64>,
    probe_resolution: u32,
    pixel_scale: f64,
}

fn setup(args: &PlanArgs) -> Result<Setup> {
    let gpu_mem = match &args.gpu_mem {
        Some(list) => list.split(',').map(|m| parse_mem(m).map(|b| b / MB)).collect::<Result<Vec<_>>>()?,
        None => vec![],
    };
    let cfg = RunConfig::load(&args.config)?;
    let device = match args.device {
        Some(d) => d.resolve().context("--device")?,
        None => cfg.train.device.resolve().context("train.device")?,
    };
    let teacher = cfg.teacher_local(crate::hub::Want::Unet)?.ok_or_else(|| anyhow!("{}: plan needs `teacher` (the student's shapes come from its UNet)", args.config.display()))?;
    let pipeline = PipelineDir::open(&teacher.path)?;
    let teacher_config = pipeline.unet_config()?;
    let teacher_config_file = pipeline.part_dir(Part::Unet)?.join("config.json");
    let student = StudentPlan::of(&cfg.student, Some(&teacher_config)).with_context(|| format!("student {:?}", cfg.student.to_string()))?;
    // As the trainer: the CPU computes in fp32. A narrowed probe models the run on its own
    // device, so it computes in the run's precision unless the run is for the CPU.
    let compute = match (args.probe_width_divisor, cfg.train.device) {
        (Some(_), DeviceChoice::Cpu) => Precision::Fp32,
        (Some(_), _) => cfg.train.precision,
        (None, _) if device == Device::Cpu => Precision::Fp32,
        (None, _) => cfg.train.precision,
    };
    let probe_resolution = args.probe_resolution.unwrap_or(cfg.data.resolution);
    if probe_resolution < 8 || !probe_resolution.is_multiple_of(8) {
        bail!("--probe-resolution {probe_resolution}: must be a positive multiple of 8 (the VAE's downscale)");
    }
    let pixel_scale = (cfg.data.resolution as f64 / probe_resolution as f64).powi(2);
    Ok(Setup { cfg, device, teacher_config, teacher_config_file, student, compute, gpu_mem, probe_resolution, pixel_scale })
}

pub fn plan(args: &PlanArgs) -> Result<MemoryPlan> {
    let s = setup(args)?;
    let ranks = args.shard_ranks.unwrap_or(1);
    ensure!(ranks >= 1, "--shard-ranks {ranks}: at least 1");
    let divisor = args.probe_width_divisor.unwrap_or(1);
    ensure!(divisor >= 1, "--probe-width-divisor {divisor}: at least 1");
    let (student_params, teacher_params) = (count(&s.student.config), count(&s.teacher_config));
    let teacher_loaded = s.cfg.distill || s.cfg.student_init == crate::config::StudentInit::Teacher;
    let teacher_bytes = if teacher_loaded { s.compute.kind().elt_size_in_bytes() as f64 } else { 0.0 };
    let state = CountedState::new(student_params, teacher_params, s.cfg.optim.state_dtype.kind().elt_size_in_bytes() as f64, teacher_bytes, s.cfg.train.ema_decay.is_some(), ranks);
    // the probes run in other processes: a size no machine holds is refused here, by name
    let what = if args.probe_resolution.is_some() { "--probe-resolution" } else { "data.resolution" };
    let scratch = args.probe_width_divisor.map(|_| ScratchDir::new()).transpose()?;
    let probe_config = match &scratch {
        Some(dir) => {
            let narrow = s.teacher_config.narrowed(divisor).with_context(|| format!("--probe-width-divisor {divisor}: the teacher's UNet"))?;
            let file = dir.0.join("config.json");
            std::fs::write(&file, serde_json::to_string_pretty(&narrow.to_json())?).with_context(|| format!("writing {}", file.display()))?;
            file
        }
        None => s.teacher_config_file.clone(),
    };
    let probed = UNetConfig::from_path(&probe_config)?;
    let probed_student = StudentPlan::of(&s.cfg.student, Some(&probed)).with_context(|| format!("student {:?} on the narrowed teacher", s.cfg.student.to_string()))?;
    crate::commands::bench::check_step_memory(&probed_student.config, 2, (s.probe_resolution / 8).max(1) as i64, s.device, s.compute.kind())
        .with_context(|| format!("{what} = {}: the probe steps at batch 2 (give a smaller --probe-resolution to plan a large run)", s.probe_resolution))?;
    let setup = ProbeSetup { cfg: &s.cfg, teacher_config: &probe_config, device: s.device, precision: s.compute.name(), resolution: s.probe_resolution };
    let scale = s.pixel_scale * divisor as f64;
    let m = if args.probe_width_divisor.is_some() {
        narrow_step(&setup, &state, student_params / count(&probed_student.config), scale)?
    } else {
        own_step(&setup, &state, ranks, scale)?
    };
    let optimizer_mb = m.optimizer_mb.unwrap_or(state.optimizer / MB);
    let batch = s.cfg.train.batch_size;
    let teacher_inference = if args.teacher_inference { Some(inference(&setup, &s, teacher_params, scale)?) } else { None };
    Ok(MemoryPlan {
        device: format!("{:?}", s.device),
        precision: s.compute.name(),
        student: s.student.name.clone(),
        student_params: student_params as u64,
        teacher_params: teacher_params as u64,
        batch_size: batch,
        resolution: s.cfg.data.resolution,
        gradient_checkpointing: s.cfg.train.gradient_checkpointing,
        state_dtype: s.cfg.optim.state_dtype,
        student_weights_mb: state.student_weights / MB,
        gradients_mb: state.gradients / MB,
        optimizer_mb,
        ema_mb: state.ema / MB,
        teacher_weights_mb: state.teacher / MB,
        activations_per_sample_mb: m.per_sample,
        probe_resolution: s.probe_resolution,
        probe_width_divisor: divisor,
        activation_scale: scale,
        shard_ranks: ranks,
        probe_batches: m.batches,
        probe_peak_mb: m.peaks,
        other_mb: m.other,
        predicted_peak_mb: m.fixed + batch as f64 * m.per_sample,
        fixed_mb: m.fixed,
        peak_kind: m.kind,
        gpus: fits(&s.gpu_mem, m.fixed, m.per_sample, batch),
        teacher_inference,
    })
}

/// What the probe steps say of a step, in MiB: `fixed + B · per_sample` at batch B.
struct StepModel {
    fixed: f64,
    per_sample: f64,
    batches: [usize; 2],
    peaks: [f64; 2],
    other: f64,
    kind: &'static str,
    /// The moments as measured (the run's own UNets), else counted.
    optimizer_mb: Option<f64>,
}

/// The run's own UNets: the peak at batch 1 and 2 (peak RSS on the CPU, the allocator's on CUDA).
fn own_step(setup: &ProbeSetup, state: &CountedState, ranks: usize, scale: f64) -> Result<StepModel> {
    let probes = [probe(setup, false, 1)?, probe(setup, false, 2)?];
    let peak = |p: &Probe| if setup.device.is_cuda() { p.memory.peak_mb } else { p.peak_mem_mb };
    let (p1, p2) = (peak(&probes[0]), peak(&probes[1]));
    let measured = (p2 - p1).max(0.0);
    // batch 1's peak less one sample at the probe's size: the batch-independent part, with the
    // EMA the probe has not and without the moments other ranks keep
    let moments = probes[0].memory.optimizer_state_mb;
    let fixed = p1 - measured + state.ema / MB - moments * (1.0 - 1.0 / ranks as f64);
    let counted = (state.student_weights + state.gradients + state.teacher) / MB + moments;
    let kind = if setup.device.is_cuda() { "CUDA caching allocator peak (the CUDA context comes on top)" } else { "peak RSS of the process" };
    Ok(StepModel { fixed, per_sample: measured * scale, batches: [1, 2], peaks: [p1, p2], other: p1 - measured - counted, kind, optimizer_mb: Some(moments / ranks as f64) })
}

/// The most samples a narrowed probe step takes while looking for a steady growth.
const MAX_PROBE_BATCH: usize = 64;

/// Narrowed UNets: the live tensor bytes of the step. Its peak is the larger of a
/// batch-independent one (the gradients at the end of backward, the optimizer's temporaries) and
/// the activations with the weights' compute copies as backward starts; only the second grows
/// with the batch. So the batch doubles until the growth per sample is steady (two doublings
/// within 25% of each other) from a peak at least twice batch 1's (below that the slowly
/// growing batch-independent peak can look steady too: checkpointed students), and the slope
/// and intercept are taken from the last two. At full size every gradient is counted live
/// beside the activations (an upper bound).
fn narrow_step(setup: &ProbeSetup, state: &CountedState, param_ratio: f64, scale: f64) -> Result<StepModel> {
    let mut points = vec![(1usize, probe(setup, false, 1)?.step_tensors()), (2, probe(setup, false, 2)?.step_tensors())];
    let slope = |p: &[(usize, f64)], i: usize| (p[i].1 - p[i - 1].1) / (p[i].0 - p[i - 1].0) as f64;
    loop {
        let n = points.len();
        if n >= 3 {
            let (a, b) = (slope(&points, n - 2), slope(&points, n - 1));
            if b > 0.0 && (0.8 * a..=1.25 * a).contains(&b) && points[n - 2].1 >= 2.0 * points[0].1 {
                break;
            }
        }
        let b = 2 * points[n - 1].0;
        ensure!(
            b <= MAX_PROBE_BATCH,
            "the narrowed probe steps' memory did not grow steadily with the batch up to {MAX_PROBE_BATCH} (live MiB per batch: {points:?}); give a larger --probe-resolution"
        );
        points.push((b, probe(setup, false, b)?.step_tensors()));
    }
    let n = points.len();
    let per_sample = slope(&points, n - 1);
    let (b, first) = points[n - 2];
    // the batch-independent part of the forward's peak (the weights' compute copies,
    // temporaries), of the narrow student's size
    let independent = (first - b as f64 * per_sample).max(0.0) * param_ratio;
    let fixed = (state.held() + state.gradients) / MB + independent;
    Ok(StepModel {
        fixed,
        per_sample: per_sample * scale,
        batches: [b, points[n - 1].0],
        peaks: [first, points[n - 1].1],
        other: independent,
        kind: "live tensor bytes: the counted state, every gradient, the narrowed probes' step scaled (CUDA's context and allocator slack come on top)",
        optimizer_mb: None,
    })
}

/// The teacher's CFG denoising step at batch 1 and 2, scaled as the training probes.
fn inference(setup: &ProbeSetup, s: &Setup, teacher_params: f64, scale: f64) -> Result<InferencePlan> {
    let (t1, t2) = (probe(setup, true, 1)?.step_tensors(), probe(setup, true, 2)?.step_tensors());
    let per_image = (t2 - t1).max(0.0) * scale;
    // what batch 1 holds beyond one image is activations too (the guidance, the time
    // embedding): scaled like them, a little more than it is
    let rest = (t1 - (t2 - t1)).max(0.0) * scale;
    let weights = teacher_params * s.compute.kind().elt_size_in_bytes() as f64 / MB;
    let fixed = weights + rest;
    Ok(InferencePlan { weights_mb: weights, activations_per_image_mb: per_image, fixed_mb: fixed, gpus: fits(&s.gpu_mem, fixed, per_image, 1) })
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let p = plan(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    let gib = |mb: f64| mb / 1024.0;
    println!(
        "{} at {} px, batch {}, on {} in {}; gradient_checkpointing {}, state_dtype {}",
        p.student,
        p.resolution,
        p.batch_size,
        p.device,
        p.precision,
        yaml_word(&p.gradient_checkpointing),
        yaml_word(&p.state_dtype)
    );
    let rows = [
        ("student weights (fp32)", p.student_weights_mb),
        ("gradients (fp32)", p.gradients_mb),
        ("AdamW moments", p.optimizer_mb),
        ("EMA", p.ema_mb),
        ("teacher weights", p.teacher_weights_mb),
        ("runtime and the rest of a step", p.other_mb),
        ("activations, per sample (measured)", p.activations_per_sample_mb),
    ];
    if p.probe_resolution != p.resolution || p.probe_width_divisor != 1 {
        println!(
            "  (activations measured at {} px on widths / {} and scaled by {:.2})",
            p.probe_resolution, p.probe_width_divisor, p.activation_scale
        );
    }
    if p.shard_ranks > 1 {
        println!("  (one rank of {} with optim.shard_state: 1/{} of AdamW's moments)", p.shard_ranks, p.shard_ranks);
    }
    for (what, mb) in rows {
        println!("  {what:<38} {:>9.2} GiB", gib(mb));
    }
    println!("  {:<38} {:>9.2} GiB  ({})", format!("peak at batch {}", p.batch_size), gib(p.predicted_peak_mb), p.peak_kind);
    for g in &p.gpus {
        println!("{} {:.0} GiB; the largest batch that fits: {}", if g.fits { "fits in" } else { "does not fit in" }, gib(g.gpu_mem_mb), g.largest_batch);
    }
    if let Some(t) = &p.teacher_inference {
        println!(
            "teacher inference (one CFG denoising step, {} px, {}): weights {:.2} GiB, {:.2} GiB per image",
            p.resolution,
            p.precision,
            gib(t.weights_mb),
            gib(t.activations_per_image_mb)
        );
        for g in &t.gpus {
            println!("  {:.0} GiB: up to {} images per step", gib(g.gpu_mem_mb), g.largest_batch);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_state_is_bytes_per_parameter_and_sharding_divides_the_moments() {
        // counted by shape as plan counts, against ssd_1b's and SDXL-base's published counts
        let config: serde_json::Value = serde_json::from_str(include_str!("../../configs/reference/sdxl_unet_config.json")).unwrap();
        let sdxl = UNetConfig::from_json(&config).unwrap();
        let ssd = StudentPlan::of(&crate::distill::student::StudentChoice::parse("ssd_1b").unwrap(), Some(&sdxl)).unwrap();
        let (student, teacher) = (count(&ssd.config), count(&sdxl));
        assert_eq!((student, teacher), (1_331_334_404.0, 2_567_463_684.0));
        let one = CountedState::new(student, teacher, 2.0, 2.0, true, 1);
        assert_eq!(one.student_weights, 4.0 * student);
        assert_eq!(one.optimizer, 4.0 * student);
        assert_eq!(one.teacher, 5_134_927_368.0);
        assert_eq!(one.held(), 12.0 * student + 2.0 * teacher); // weights, moments, EMA; gradients come in the step
        let eight = CountedState::new(student, teacher, 2.0, 2.0, true, 8);
        assert_eq!(eight.optimizer, one.optimizer / 8.0);
        assert_eq!(one.held() - eight.held(), 3.5 * student);
    }

    #[test]
    fn the_largest_batch_is_the_last_that_fits_and_grows_with_memory() {
        let gb = |g: f64| g * 1024.0;
        let f = fits(&[gb(24.0), gb(40.0), gb(80.0), 100.0], 20_000.0, 1_000.0, 4);
        assert_eq!(f.iter().map(|g| g.largest_batch).collect::<Vec<_>>(), [4, 20, 61, 0]);
        assert_eq!(f.iter().map(|g| g.fits).collect::<Vec<_>>(), [true, true, true, false]);
        for g in &f[..3] {
            let n = g.largest_batch as f64;
            assert!(20_000.0 + n * 1_000.0 <= g.gpu_mem_mb && 20_000.0 + (n + 1.0) * 1_000.0 > g.gpu_mem_mb);
        }
    }
}
