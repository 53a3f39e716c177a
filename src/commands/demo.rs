//! `sdkd demo [--out <dir>]`: the whole job on embedded data (see `demo::run`).
use crate::demo::run::{run_demo, DemoOptions};
use crate::distill::progress::ProgressMode;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder: data, pipelines, runs, grid.png, report.md.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Seed of the dataset and of every random weight.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimizer steps of the teacher (trained from scratch).
    #[arg(long)]
    pub teacher_steps: Option<u64>,
    /// Optimizer steps of the distilled student and of the control.
    #[arg(long)]
    pub student_steps: Option<u64>,
    /// Synthetic training pairs.
    #[arg(long)]
    pub count: Option<usize>,
    /// VAE training steps.
    #[arg(long)]
    pub vae_steps: Option<usize>,
    /// A minute-long smoke run with tiny step counts (the results mean little).
    #[arg(long)]
    pub quick: bool,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let mut o = DemoOptions { seed: a.seed, ..DemoOptions::default() };
    if a.quick {
        o = DemoOptions { count: 128, held_out: 16, vae_steps: 30, teacher_steps: 10, student_steps: 6, prompts: 2, sampling_steps: 4, progress: ProgressMode::Hidden, ..o };
    }
    o.teacher_steps = a.teacher_steps.unwrap_or(o.teacher_steps);
    o.student_steps = a.student_steps.unwrap_or(o.student_steps);
    o.count = a.count.unwrap_or(o.count);
    o.vae_steps = a.vae_steps.unwrap_or(o.vae_steps);
    let s = run_demo(&a.out, &o)?;
    println!("{:<18} {:>12} {:>8} {:>10}  held-out loss", "model", "params", "steps", "time");
    for m in &s.models {
        println!("{:<18} {:>12} {:>8} {:>9.0}s  {:.4}", m.name, crate::commands::inspect::group_digits(m.params), m.steps, m.seconds, m.held_out_loss);
    }
    println!("grid: {}\nreport: {}\ndone in {:.0}s", s.grid.display(), s.report.display(), s.seconds);
    Ok(())
}
