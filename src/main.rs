//! The `sdkd` command line: parse, call the library, report. Exit codes: 0 success, 1 failure
//! (one message naming the file, key or value), 2 usage.
use clap::{Parser, Subcommand};
use sdkd::commands;

#[derive(Parser)]
#[command(name = "sdkd", version, about = "Distil Stable Diffusion UNets (BK-SDM / SD-Small / SD-Tiny)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Architecture tables and parameter counts of a UNet (and its students) or a pipeline.
    Inspect(commands::inspect::InspectArgs),
    /// Build a student from a teacher UNet, copy the teacher's weights, write a diffusers folder.
    Prune(commands::prune::PruneArgs),
    /// Distil (or train from scratch) a student from a run YAML; resumable.
    Train(commands::train::TrainArgs),
    /// Write a checkpoint as a diffusers UNet folder, a whole pipeline folder or a single file.
    Export(commands::export::ExportArgs),
    /// A single-file checkpoint (LDM layout) to a diffusers pipeline folder, or the other way round.
    Convert(commands::convert::ConvertArgs),
    /// The whole job on embedded data: synthetic set, teacher, distillation, control, images, report.
    Demo(commands::demo::DemoArgs),
    /// Text to image with a pipeline folder (and optionally a student UNet); writes PNGs.
    Generate(commands::generate::GenerateArgs),
    /// The HTTP text-to-image API with API keys and credits.
    Serve(commands::serve::ServeArgs),
    /// API keys and credits of `sdkd serve`: add, credit, list, revoke, usage.
    Keys(commands::keys::KeysArgs),
    /// FID and Inception Score of image folders, as pytorch-fid and torch-fidelity compute them.
    Eval(commands::eval::EvalArgs),
    /// Write the built-in synthetic image-caption dataset (imagefolder layout).
    Synth(commands::synth::SynthArgs),
    /// Encode a dataset once (VAE latents, text embeddings) into a cache `train` can read.
    Preprocess(commands::preprocess::PreprocessArgs),
    /// Time the distillation training step or a denoising step on random inputs.
    Bench(commands::bench::BenchArgs),
    /// The memory a run's training step needs (measured at batch 1 and 2), and whether it fits a GPU.
    Plan(commands::plan::PlanArgs),
}

/// How LibTorch's OpenMP workers wait between kernels. libgomp's default spins 300000 times
/// before sleeping, which burns the cores the data loader and other processes need: training
/// steps measured 3-5x slower on a busy 2-core machine. Sleeping at once (PASSIVE) pays a wake-up
/// per parallel region instead, which made the same step 1.45x slower on the idle machine. A
/// short spin (10000) is as fast as the default when the machine is idle, so: a short spin when
/// the cores are free at start (1-minute load average below the core count), PASSIVE when they
/// are not. See docs/benchmarks.md, "OpenMP wait policy".
fn openmp_wait_setting() -> (&'static str, &'static str) {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse::<f64>().ok()));
    match load {
        Some(load) if load < cores => ("GOMP_SPINCOUNT", "10000"),
        _ => ("OMP_WAIT_POLICY", "PASSIVE"),
    }
}

/// libgomp reads its settings when it is loaded, before `main`, so set them and start again
/// (once; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins).
fn ensure_openmp_wait_setting() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() || std::env::var_os("GOMP_SPINCOUNT").is_some() {
        return;
    }
    let (key, value) = openmp_wait_setting();
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env(key, value).exec();
        eprintln!("warning: could not restart with {key}={value} ({err}); continuing");
    }
}

/// LibTorch takes tensor memory from glibc's malloc, which serves every block over 32 MiB (SD-1.5
/// activations at 512 px reach 170 MiB) with a fresh mmap and gives it back on free: each step
/// then page-faults and zeroes its largest activations again (1.5M page faults per SD-1.5 step,
/// ~7% of its CPU time). Keeping freed memory in the heap lets the next step reuse it; peak RSS is
/// unchanged, but memory is returned to the system only at exit.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes malloc's parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0); // large blocks from the heap, not per-block mmaps
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1); // never shrink the heap
    }
}

fn main() {
    ensure_openmp_wait_setting();
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Prune(a) => commands::prune::run(a),
        Command::Train(a) => commands::train::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Demo(a) => commands::demo::run(a),
        Command::Synth(a) => commands::synth::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Preprocess(a) => commands::preprocess::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Keys(a) => commands::keys::run(a),
        Command::Eval(a) => commands::eval::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
