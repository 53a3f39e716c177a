//! `sdkd plan --config run.yaml [--gpu-mem 24GB]`: the memory a run's training step needs, before
//! the run starts. The student's weights, gradients, AdamW moments and EMA and the teacher's
//! weights are counted; activations are measured: one training step (`sdkd bench --mode train
//! --report-memory`, the trainer's own `Distiller` step on random weights and inputs, each in a
//! fresh process) at batch 1 and at batch 2, with the run's student, resolution, precision,
//! `gradient_checkpointing` and `state_dtype`. Their difference is one sample's activations; the
//! peak at batch B is extrapolated as `peak(1) + (B - 1) · (peak(2) - peak(1))`, plus the EMA
//! (which the probe step has not). On the CPU the peak is the process's peak RSS, on CUDA the
//! caching allocator's peak (the CUDA context, some hundreds of MiB, comes on top).
//! Not included: the text encoder and VAE that image runs and validation load, and the loader's
//! prefetched batches.
use crate::config::{RunConfig, StateDtype};
use crate::runtime::DeviceChoice;
use crate::distill::student::StudentPlan;
use crate::models::{Checkpointing, Init, Part, PipelineDir, UNet};
use anyhow::{anyhow, bail, Context, Result};
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
    /// Memory of the GPU to plan for, e.g. 24GB or 80GB (GB, GiB and G all mean 2^30 bytes, as
    /// cards are sold); prints whether the run fits and the largest batch that does.
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `sdkd plan --json` prints; sizes in MiB.
#[derive(Debug, Serialize)]
pub struct MemoryPlan {
    pub device: String,
    pub precision: &'static str,
    pub student: String,
    pub batch_size: usize,
    pub resolution: u32,
    pub gradient_checkpointing: Checkpointing,
    pub state_dtype: StateDtype,
    pub student_weights_mb: f64,
    pub gradients_mb: f64,
    pub optimizer_mb: f64,
    pub ema_mb: f64,
    pub teacher_weights_mb: f64,
    /// Measured: peak(2) - peak(1), times `activation_scale`.
    pub activations_per_sample_mb: f64,
    /// The resolution the probe steps ran at (`--probe-resolution`, else `resolution`).
    pub probe_resolution: u32,
    /// (resolution / probe_resolution)²: 1 unless `--probe-resolution` differs.
    pub activation_scale: f64,
    /// Measured peaks of the probe steps at batch 1 and 2 (without EMA).
    pub probe_peak_mb: [f64; 2],
    /// What the peak holds besides the counted parts and the activations: the runtime, the
    /// batch-independent part of a step, allocator slack.
    pub other_mb: f64,
    /// The peak at `batch_size`: the counted parts, `other_mb` and the activations.
    pub predicted_peak_mb: f64,
    /// `predicted_peak_mb` = `fixed_mb` + `batch_size` · `activations_per_sample_mb`.
    pub fixed_mb: f64,
    pub peak_kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem_mb: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fits: Option<bool>,
    /// The largest batch whose predicted peak fits `--gpu-mem` (0: not even one sample).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub largest_batch: Option<u64>,
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

/// The fields of `sdkd bench --json` a plan reads.
#[derive(Deserialize)]
struct Probe {
    /// Whole-process peak RSS.
    peak_mem_mb: f64,
    memory: ProbeMemory,
}

#[derive(Deserialize)]
struct ProbeMemory {
    /// CUDA: the allocator's peak of the steps.
    peak_mb: f64,
    optimizer_state_mb: f64,
}

/// One probe step in a fresh process: `sdkd bench --mode train --report-memory --json`.
fn probe(cfg: &RunConfig, teacher_config: &Path, device: Device, resolution: u32, batch: usize) -> Result<Probe> {
    let exe = std::env::current_exe().context("finding the sdkd executable for the probe steps")?;
    let device = match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    };
    let args: Vec<String> = [
        "bench", "--mode", "train", "--json", "--report-memory", "--steps", "1", "--warmup", "0", "--teacher",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        teacher_config.display().to_string(),
        "--student".into(),
        cfg.student.to_string(),
        "--batch-size".into(),
        batch.to_string(),
        "--latent-size".into(),
        (resolution / 8).max(1).to_string(),
        "--device".into(),
        device,
        "--precision".into(),
        cfg.train.precision.name().into(),
        "--gradient-checkpointing".into(),
        yaml_word(&cfg.train.gradient_checkpointing),
        "--state-dtype".into(),
        yaml_word(&cfg.optim.state_dtype),
    ])
    .collect();
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

pub fn plan(args: &PlanArgs) -> Result<MemoryPlan> {
    let gpu_mem = args.gpu_mem.as_deref().map(parse_mem).transpose()?;
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
    // counted without touching memory: uninitialised parameters are never paged in
    let count = |c| UNet::build(c, Device::Cpu, Kind::Float, Init::Empty).num_params() as f64;
    let (student_params, teacher_params) = (count(&student.config), count(&teacher_config));
    // as the trainer: the CPU computes in fp32
    let compute = if device == Device::Cpu { Kind::Float } else { cfg.train.precision.kind() };
    let teacher_loaded = cfg.distill || cfg.student_init == crate::config::StudentInit::Teacher;
    let teacher_weights = if teacher_loaded { teacher_params * compute.elt_size_in_bytes() as f64 } else { 0.0 };
    let probe_resolution = args.probe_resolution.unwrap_or(cfg.data.resolution);
    if probe_resolution < 8 || !probe_resolution.is_multiple_of(8) {
        bail!("--probe-resolution {probe_resolution}: must be a positive multiple of 8 (the VAE's downscale)");
    }
    let scale = (cfg.data.resolution as f64 / probe_resolution as f64).powi(2);
    // the probe steps run in other processes: a size no machine holds is refused here, by name
    let what = if args.probe_resolution.is_some() { "--probe-resolution" } else { "data.resolution" };
    crate::commands::bench::check_step_memory(&student.config, 2, (probe_resolution / 8).max(1) as i64, device, compute)
        .with_context(|| format!("{what} = {probe_resolution}: the probe steps at batch 2 (give a smaller --probe-resolution to plan a large run)"))?;
    let probes = [probe(&cfg, &teacher_config_file, device, probe_resolution, 1)?, probe(&cfg, &teacher_config_file, device, probe_resolution, 2)?];
    let peak = |p: &Probe| if device.is_cuda() { p.memory.peak_mb } else { p.peak_mem_mb };
    let (p1, p2) = (peak(&probes[0]), peak(&probes[1]));
    let measured_per_sample = (p2 - p1).max(0.0);
    let per_sample = measured_per_sample * scale;
    let ema = if cfg.train.ema_decay.is_some() { student_params * 4.0 / MB } else { 0.0 };
    let (weights, grads) = (student_params * 4.0 / MB, student_params * 4.0 / MB);
    let optimizer = probes[0].memory.optimizer_state_mb;
    let counted = weights + grads + optimizer + teacher_weights / MB;
    // batch 1's peak less one sample at the probe's size: the batch-independent part
    let fixed = p1 - measured_per_sample + ema;
    let batch = cfg.train.batch_size;
    let predicted = fixed + batch as f64 * per_sample;
    let (fits, largest_batch) = match gpu_mem {
        Some(mem) => {
            let mem = mem / MB;
            let largest = if per_sample > 0.0 { ((mem - fixed) / per_sample).floor().max(0.0) as u64 } else { u64::MAX };
            (Some(predicted <= mem), Some(largest))
        }
        None => (None, None),
    };
    Ok(MemoryPlan {
        device: format!("{device:?}"),
        precision: if compute == Kind::Float { "fp32" } else { cfg.train.precision.name() },
        student: student.name.clone(),
        batch_size: batch,
        resolution: cfg.data.resolution,
        gradient_checkpointing: cfg.train.gradient_checkpointing,
        state_dtype: cfg.optim.state_dtype,
        student_weights_mb: weights,
        gradients_mb: grads,
        optimizer_mb: optimizer,
        ema_mb: ema,
        teacher_weights_mb: teacher_weights / MB,
        activations_per_sample_mb: per_sample,
        probe_resolution,
        activation_scale: scale,
        probe_peak_mb: [p1, p2],
        other_mb: p1 - measured_per_sample - counted,
        predicted_peak_mb: predicted,
        fixed_mb: fixed,
        peak_kind: if device.is_cuda() { "CUDA caching allocator peak (the CUDA context comes on top)" } else { "peak RSS of the process" },
        gpu_mem_mb: gpu_mem.map(|m| m / MB),
        fits,
        largest_batch,
    })
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
    if p.probe_resolution != p.resolution {
        println!("  (activations measured at {} px and scaled by the pixel ratio {:.2})", p.probe_resolution, p.activation_scale);
    }
    for (what, mb) in rows {
        println!("  {what:<38} {:>9.2} GiB", gib(mb));
    }
    println!("  {:<38} {:>9.2} GiB  ({})", format!("peak at batch {}", p.batch_size), gib(p.predicted_peak_mb), p.peak_kind);
    if let (Some(mem), Some(fits), Some(largest)) = (p.gpu_mem_mb, p.fits, p.largest_batch) {
        println!("{} {:.0} GiB; the largest batch that fits: {largest}", if fits { "fits in" } else { "does not fit in" }, gib(mem));
    }
    Ok(())
}
