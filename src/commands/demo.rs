//! `sdkd demo [--out <dir>] [--family sd|sdxl]`: the whole job on embedded data (see `demo::run`).
//! `--out` must be new or empty, or an earlier demo output with `--overwrite` (which starts it
//! afresh).
use crate::demo::lcm_stage::{finished_demo, run_lcm_stage, LcmOptions};
use crate::demo::run::{run_demo, DemoOptions};
use crate::demo::DemoFamily;
use crate::distill::progress::ProgressMode;
use crate::fs_safe::{self, Existing, Marker, Purpose};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Output folder: data, pipelines, runs, grid.png, report.md.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Replace an earlier demo output at --out (`make demo` does).
    #[arg(long)]
    pub overwrite: bool,
    /// The model family: `sd` (an SD-1.x pipeline, a `bk_small` student) or `sdxl` (an SDXL
    /// pipeline, a `vega` student). Parsed by sdkd, not clap: an unknown family is bad input
    /// (exit 1), as every other bad value of the demo's.
    #[arg(long, default_value = "sd")]
    pub family: String,
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
    /// The layout of the training pairs: imagefolder, webdataset (tar shards) or parquet; the VAE
    /// and the latent caches read them in it.
    #[arg(long, value_enum, default_value_t = crate::data::DataFormat::Imagefolder)]
    pub data_format: crate::data::DataFormat,
    /// Probability that a training sample's caption is replaced by the empty prompt
    /// (`data.caption_dropout` of the demo's runs; default 0.1, as Stable Diffusion).
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth): adds FID and IS of
    /// each model on the held-out set to the report.
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Add the LCM stage (README, "The LCM stage"): the KD student distilled into a latent
    /// consistency model and scored at 1, 2, 4 and 8 LCM steps against the teacher and the KD
    /// student. On a finished demo at --out (without --overwrite) only this stage runs;
    /// otherwise the whole demo, then this stage.
    #[arg(long)]
    pub lcm: bool,
    /// Optimizer steps of the LCM stage's run.
    #[arg(long)]
    pub lcm_steps: Option<u64>,
    /// A minute-long run with small step counts: the teacher reads the background colour from its
    /// captions and the KD student keeps it; object colour and position need the full run.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let sdkd = std::env::current_exe().context("finding the sdkd executable the training runs start")?;
    let family: DemoFamily = a.family.parse()?;
    if family == DemoFamily::Sdxl && a.lcm {
        bail!("--lcm with --family sdxl: the demo's LCM stage is built for the SD-1.x demo only (not yet for SDXL)");
    }
    let mut o = DemoOptions { family, seed: a.seed, data_format: a.data_format, sdkd, ..DemoOptions::default() };
    let mut l = LcmOptions::default();
    if a.quick {
        // the fewest LCD steps that still step the cosine schedule past its warmup step
        l.steps = 2;
        // the shortest teacher that reads the background from the caption (tests/demo.rs)
        o = DemoOptions {
            count: 128,
            held_out: 16,
            vae_steps: 200,
            teacher_steps: 150,
            teacher_lr: 3e-3,
            student_steps: 6,
            prompts: 4,
            sampling_steps: 10,
            progress: ProgressMode::Hidden,
            ..o
        };
        if family == DemoFamily::Sdxl {
            // CI's budget (tests/demo.rs): the SDXL teacher's 34 transformer layers cost about
            // twice the SD one's step, and its requests sample one at a time. 60 teacher steps
            // already leave KD well ahead of the control by the held-out loss (README).
            o = DemoOptions { teacher_steps: 60, vae_steps: 100, sampling_steps: 4, ..o };
        }
    }
    o.teacher_steps = a.teacher_steps.unwrap_or(o.teacher_steps);
    o.student_steps = a.student_steps.unwrap_or(o.student_steps);
    o.count = a.count.unwrap_or(o.count);
    o.vae_steps = a.vae_steps.unwrap_or(o.vae_steps);
    o.caption_dropout = a.caption_dropout.unwrap_or(o.caption_dropout);
    l.steps = a.lcm_steps.unwrap_or(l.steps);
    // The demo is a minutes-long tour: a count or step number past these is a typo, not a run.
    for (flag, value, max) in [
        ("--count", o.count as u64, 100_000),
        ("--vae-steps", o.vae_steps as u64, 1_000_000),
        ("--teacher-steps", o.teacher_steps, 1_000_000),
        ("--student-steps", o.student_steps, 1_000_000),
        ("--lcm-steps", l.steps, 1_000_000),
    ] {
        if !(1..=max).contains(&value) {
            bail!("{flag} {value}: must be 1 to {max}");
        }
    }
    if !(0.0..=1.0).contains(&o.caption_dropout) {
        bail!("--caption-dropout {}: must be a probability in [0, 1]", o.caption_dropout);
    }
    if let Some(p) = &a.inception {
        // before minutes of training, not after
        crate::eval::inception::InceptionV3::load(p, tch::Device::Cpu)?;
    }
    o.inception = a.inception.clone();
    // with --lcm on a finished demo, only the stage runs
    if !(a.lcm && !a.overwrite && finished_demo(&a.out)?) {
        prepare_out(&a.out, a.overwrite)?;
        let s = run_demo(&a.out, &o)?;
        // the finished demo lists its files, so a later --overwrite can tell the user's additions
        Marker::new(Purpose::Demo).listing(&a.out)?.write_into(&a.out)?;
        print_summary(&s);
    }
    if a.lcm {
        let s = run_lcm_stage(&a.out, &o, &l)?;
        println!("\nLCM stage: {} training steps in {:.0}s", l.steps, s.train_seconds);
        println!("{:<14} {:>8} {:>6}  {:<22} {:>9} {:>10}", "model", "sampler", "steps", "caption accuracy", "pixel RMSE", "images/s");
        for r in &s.rows {
            let acc = format!("{:.0}% {:.0}% {:.0}%", 100.0 * r.accuracy[0], 100.0 * r.accuracy[1], 100.0 * r.accuracy[2]);
            println!("{:<14} {:>8} {:>6}  {acc:<22} {:>9.1} {:>10.2}", r.name, r.sampler.name(), r.steps, r.pixel_rmse, r.images_per_second);
        }
        println!("grid: {}\nreport: {}\nLCM stage done in {:.0}s", s.grid.display(), s.report.display(), s.seconds);
    }
    Ok(())
}

fn print_summary(s: &crate::demo::run::DemoSummary) {
    println!("{:<18} {:>12} {:>8} {:>10}  held-out loss  caption accuracy (background, object colour, position)", "model", "params", "steps", "time");
    for m in &s.models {
        let acc = m.caption_accuracy.map(|a| format!("{:.0}% {:.0}% {:.0}%", 100.0 * a[0], 100.0 * a[1], 100.0 * a[2])).unwrap_or_default();
        println!("{:<18} {:>12} {:>8} {:>9.0}s  {:<13.4}  {acc}", m.name, crate::formatting::group_digits(m.params), m.steps, m.seconds, m.held_out_loss);
    }
    println!("grid: {}\nreport: {}\ndone in {:.0}s", s.grid.display(), s.report.display(), s.seconds);
}

/// The overwrite rule for `--out`, then a fresh marked folder. A demo output from before the
/// markers is recognised by its report, runs and demo pipeline.
fn prepare_out(out: &Path, overwrite: bool) -> Result<()> {
    let unmarked_demo = matches!(fs_safe::existing(out)?, Existing::Foreign(_))
        && ["report.md", "runs", "pipeline-init"].iter().all(|p| out.join(p).exists());
    match (unmarked_demo, overwrite) {
        (true, true) => {
            let foreign = fs_safe::foreign_files(out, &Marker::new(Purpose::Demo))?;
            if !foreign.is_empty() {
                bail!(
                    "--overwrite: --out {} also holds {}, which sdkd did not write: move them out first, or choose another --out",
                    out.display(),
                    fs_safe::list_some(&foreign)
                );
            }
        }
        (true, false) => bail!("--out {} holds an earlier demo output: pass --overwrite to replace it, or choose another --out", out.display()),
        (false, _) => fs_safe::check_replaceable(out, Purpose::Demo, overwrite, "--out")?,
    }
    fs_safe::write_dir(out, Some(&Marker::new(Purpose::Demo)), |_| Ok(()))
}
