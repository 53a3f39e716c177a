//! `sdkd train --config run.yaml [--resume latest|<checkpoint dir>]`.
//!
//! SIGINT/SIGTERM finish the current step, write a checkpoint and exit 0 (preemptible jobs);
//! a second signal exits at once with code 130.
use crate::config::RunConfig;
use crate::distill::progress::ProgressMode;
use crate::distill::trainer::Trainer;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
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

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.config)?;
    let stop = stop_flag()?;
    let mut trainer = Trainer::new(cfg, args.resume.as_deref())?;
    let mode = if args.quiet { ProgressMode::Hidden } else { ProgressMode::detect() };
    let outcome = trainer.run(&stop, mode)?;
    let ckpt = outcome.last_checkpoint.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into());
    if outcome.interrupted {
        println!("interrupted at step {}: checkpoint {ckpt}; continue with --resume latest", outcome.step);
    } else {
        println!("finished at step {}: loss {:.5}, checkpoint {ckpt}", outcome.step, outcome.last_loss);
    }
    Ok(())
}
