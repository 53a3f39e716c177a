//! `sdkd train --config run.yaml [--resume latest|<checkpoint dir>]`.
//!
//! SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0 (preemptible jobs);
//! a second signal exits at once with code 130.
//!
//! `output_dir` must be new or empty, unless `--resume` continues the run it holds (same config)
//! or `--overwrite` replaces a run sdkd made there; a folder sdkd did not make is never used.
//!
//! Under torchrun or SLURM (their environment variables; docs/distributed.md) every process is
//! one rank of a data-parallel run: all check the config and output_dir, then join the process
//! group; rank 0 alone writes and reports.
use crate::config::{identity_diff, RunConfig};
use crate::distill::checkpoint;
use crate::fs_safe::{self, Existing, Marker, Purpose};
use crate::distill::progress::ProgressMode;
use crate::distill::trainer::{identity_config, teacher_family_defaults, Trainer};
use crate::distributed::{Launch, Ranks};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run YAML (docs/config.md).
    #[arg(long)]
    pub config: PathBuf,
    /// `latest` (the newest complete checkpoint of output_dir) or a checkpoint folder.
    #[arg(long)]
    pub resume: Option<String>,
    /// Delete the run that output_dir holds and start again (only a folder sdkd made for a run).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Only warnings and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

/// A flag raised by the first SIGINT/SIGTERM; the second one exits at once.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // order matters: the conditional exit checks the flag before the second handler sets it
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag))?;
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// Joins the process group of this rank (Gloo on the CPU, NCCL on `cuda:LOCAL_RANK`), with
/// `train.device` moved to this rank's GPU.
fn join_ranks(launch: &Launch, cfg: &mut RunConfig) -> Result<Ranks> {
    let timeout = std::time::Duration::from_secs_f64(cfg.train.dist_timeout_s);
    let (ranks, device) = Ranks::join(launch, cfg.train.device.resolve().context("train.device")?, timeout)
        .with_context(|| format!("{} launch, train.dist_timeout_s = {}", launch.launcher, cfg.train.dist_timeout_s))?;
    if let tch::Device::Cuda(i) = device {
        cfg.train.device = crate::runtime::DeviceChoice::Cuda(i);
    }
    Ok(ranks)
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let launch = Launch::from_env(|k| std::env::var(k).ok())?;
    let mut cfg = RunConfig::load(&args.config)?;
    cfg.pin_teacher(recorded_teacher_commit(&cfg, args.resume.is_some())?.as_deref())?;
    teacher_family_defaults(&mut cfg)?;
    let world = launch.as_ref().map_or(1, |l| l.world_size);
    let identity = identity_config(&cfg, world);
    let claim = check_output_dir(&identity, args.resume.is_some(), args.overwrite)?;
    let stop = stop_flag()?;
    let marker = run_marker(&identity);
    let output_dir = cfg.output_dir.clone();
    // every rank has checked output_dir before any joins, so none sees rank 0's writes
    let ranks = launch.as_ref().map(|l| join_ranks(l, &mut cfg)).transpose()?;
    let leader = ranks.as_ref().is_none_or(Ranks::is_leader);
    let mut trainer = Trainer::build(cfg, ranks)?;
    if let Some(arg) = args.resume.as_deref() {
        trainer.resume(arg)?;
    }
    trainer.sync_ranks()?;
    // only once the run is known to start: a bad config or teacher leaves output_dir as it was
    if leader {
        claim.apply(&output_dir, &marker)?;
    }
    let mode = if args.quiet || !leader { ProgressMode::Hidden } else { ProgressMode::detect() };
    let outcome = trainer.run(&stop, mode)?;
    if !leader {
        return Ok(());
    }
    let ckpt = outcome.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into());
    if outcome.interrupted {
        println!("interrupted at step {}: checkpoint {ckpt}; continue with --resume latest", outcome.step);
    } else {
        println!("finished at step {}: loss {:.5}, checkpoint {ckpt}", outcome.step, outcome.last_loss);
    }
    Ok(())
}

/// The hub commit of the teacher that the run in output_dir recorded, when resuming it with the
/// same teacher id (a resume loads the same weights even if the branch has moved since).
fn recorded_teacher_commit(cfg: &RunConfig, resume: bool) -> Result<Option<String>> {
    if !resume {
        return Ok(None);
    }
    let Existing::Made(marker) = fs_safe::existing(&cfg.output_dir)? else { return Ok(None) };
    let same_teacher = marker.config["teacher"].as_str() == cfg.teacher.as_deref().and_then(|t| t.to_str());
    Ok(marker.config["revision"].as_str().filter(|_| same_teacher).map(str::to_string))
}

/// What a run folder holds, in words: "config.yaml, checkpoints step-2, step-4, final/".
fn describe_run(dir: &Path) -> String {
    let mut parts = vec![];
    if dir.join("config.yaml").exists() {
        parts.push("config.yaml".to_string());
    }
    let steps: Vec<String> = checkpoint::list(dir).unwrap_or_default().iter().map(|(s, _)| format!("step-{s}")).collect();
    if !steps.is_empty() {
        parts.push(format!("checkpoints {}", fs_safe::list_some(&steps)));
    }
    for sub in ["final", "tb", "samples"] {
        if dir.join(sub).exists() {
            parts.push(format!("{sub}/"));
        }
    }
    parts.join(", ")
}

/// What `check_output_dir` found may be done with `output_dir`.
enum Claim {
    /// Nothing there: create it.
    Create,
    /// `--overwrite` of a run sdkd made: replace it with an empty folder.
    Replace,
    /// `--resume` of the same run: keep it.
    Continue,
}

impl Claim {
    fn apply(&self, dir: &Path, marker: &Marker) -> Result<()> {
        match self {
            Claim::Create => fs_safe::write_dir(dir, Some(marker), |_| Ok(())),
            Claim::Replace => {
                eprintln!("--overwrite: deleting the run in {} ({})", dir.display(), describe_run(dir));
                fs_safe::write_dir(dir, Some(marker), |_| Ok(()))
            }
            Claim::Continue => marker.write_into(dir),
        }
    }
}

/// The marker of a run folder: its purpose and this run's config.
fn run_marker(cfg: &RunConfig) -> Marker {
    let mut marker = Marker::new(Purpose::Run);
    marker.config_hash = Some(cfg.config_hash());
    marker.config = cfg.resume_identity();
    marker
}

/// The overwrite rule for a run's `output_dir` (nothing is written here).
fn check_output_dir(cfg: &RunConfig, resume: bool, overwrite: bool) -> Result<Claim> {
    let dir = &cfg.output_dir;
    let d = dir.display();
    // what the run reads is neither written into nor replaced (as export and prune refuse it)
    let read = [(cfg.teacher.as_deref(), "the teacher (teacher)"), (cfg.data.path.as_deref(), "the data (data.path)"), (cfg.data.cache.as_deref(), "the latent cache (data.cache)")];
    for (source, what) in read {
        if let Some(source) = source {
            fs_safe::check_apart(dir, source, what, "output_dir")?;
        }
    }
    let found = match fs_safe::existing(dir)? {
        // A run of an sdkd from before folder markers: its config.yaml and a checkpoint of its
        // own layout (a config.yaml and checkpoints/ alone are also Lightning's and Hydra's)
        Existing::Foreign(_) if dir.join("config.yaml").is_file() && !checkpoint::list(dir).unwrap_or_default().is_empty() => {
            Existing::Made(Marker::new(Purpose::Run))
        }
        found => found,
    };
    match found {
        Existing::Nothing => Ok(Claim::Create),
        Existing::Foreign(what) => bail!(
            "output_dir {d} {what}, which sdkd did not make: a run needs a new or empty output_dir"
        ),
        Existing::Made(m) if m.purpose != Purpose::Run => bail!(
            "output_dir {d} holds {}, not a training run: choose a new output_dir",
            m.purpose.describe()
        ),
        Existing::Made(m) if overwrite => {
            let others = fs_safe::foreign_files(dir, &m)?;
            if !others.is_empty() {
                bail!(
                    "--overwrite: output_dir {d} also holds {}, which sdkd did not write: move them out first",
                    fs_safe::list_some(&others)
                );
            }
            Ok(Claim::Replace)
        }
        Existing::Made(_) if !resume => bail!(
            "output_dir {d} already holds a run ({}): continue it with --resume latest, start it over with \
             --overwrite, or choose a new output_dir",
            describe_run(dir)
        ),
        Existing::Made(m) => {
            if let Some(hash) = m.config_hash.as_ref().filter(|h| **h != cfg.config_hash()) {
                let diff = identity_diff(&m.config, &cfg.resume_identity());
                // grad_accum is counted over all processes here: name the rule a world-size change must keep
                let note = if diff.iter().any(|k| k.starts_with("train.grad_accum:")) {
                    " (train.grad_accum counted over all processes: a run resumes only with the same global batch, batch_size × grad_accum × processes)"
                } else {
                    ""
                };
                let shown: Vec<String> = diff.into_iter().take(8).collect();
                bail!(
                    "output_dir {d} holds another run (config hash {hash} vs {}); differing keys (that run vs this config): {}{note}; \
                     choose a new output_dir to resume into",
                    cfg.config_hash(),
                    if shown.is_empty() { "unknown".to_string() } else { shown.join("; ") }
                );
            }
            Ok(Claim::Continue)
        }
    }
}
