//! `sdkd export --checkpoint <dir> --out <dir> [--ema] [--format unet|pipeline] [--dtype]`: a
//! training checkpoint as a diffusers UNet folder, or as a whole pipeline beside the teacher's
//! other parts. `--out` must be new or empty, or an earlier sdkd export of the same format with
//! `--overwrite`; never the checkpoint (or inside it), its run or the teacher (or inside it).
use crate::distill::checkpoint::Checkpoint;
use crate::config::Precision;
use crate::export::{self, ExportFormat};
use crate::fs_safe;
use crate::models::{weights, UNetConfig};
use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint folder (`<output_dir>/checkpoints/step-N`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier sdkd export of the same format at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Export the EMA weights instead of the raw student.
    #[arg(long)]
    pub ema: bool,
    #[arg(long, value_enum, default_value = "unet")]
    pub format: ExportFormat,
    /// Storage dtype of the written weights.
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: Precision,
    /// The teacher pipeline whose other parts go beside the UNet (`--format pipeline`); by
    /// default the run's own teacher, recorded in the checkpoint.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
}

/// The run folder of a checkpoint at `<run>/checkpoints/step-N`.
fn run_of(checkpoint: &Path) -> Option<&Path> {
    let parent = checkpoint.parent()?;
    (parent.file_name()? == "checkpoints").then(|| parent.parent()).flatten()
}

pub fn run(args: &ExportArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    fs_safe::check_apart(&args.out, &ckpt.dir, "the checkpoint", "--out")?;
    let ckpt_dir = ckpt.dir.canonicalize().unwrap_or_else(|_| ckpt.dir.clone());
    if let Some(run) = run_of(&ckpt_dir) {
        fs_safe::check_not_over(&args.out, run, "the checkpoint's run", "--out")?;
    }
    let config = UNetConfig::from_json(&ckpt.unet_config).with_context(|| format!("{}: unet/config.json", ckpt.dir.display()))?;
    let file = if args.ema {
        ckpt.ema_file().ok_or_else(|| anyhow!("--ema: checkpoint {} has no EMA weights (the run had no train.ema_decay)", ckpt.dir.display()))?
    } else {
        ckpt.student_file()
    };
    let teacher = match (args.format, &args.teacher) {
        (ExportFormat::Unet, _) => None,
        (ExportFormat::Pipeline, Some(t)) => Some(t.clone()),
        (ExportFormat::Pipeline, None) => Some(ckpt.meta.config["teacher"].as_str().map(PathBuf::from).ok_or_else(|| {
            anyhow!("checkpoint {} records no teacher pipeline: pass --teacher <pipeline dir>", ckpt.dir.display())
        })?),
    };
    if let Some(teacher) = &teacher {
        fs_safe::check_apart(&args.out, teacher, "the teacher pipeline", "--out")?;
    }
    fs_safe::check_replaceable(&args.out, args.format.purpose(), args.overwrite, "--out")?;
    let tensors = weights::read_all(&file)?;
    let kind = Some(args.dtype.kind());
    match &teacher {
        None => export::write_unet_dir(&args.out, &config, &tensors, kind)?,
        Some(teacher) => export::write_pipeline_dir(&args.out, teacher, &config, &tensors, kind)?,
    }
    println!(
        "exported step {} ({}) of {} to {}",
        ckpt.meta.step,
        if args.ema { "EMA" } else { "student" },
        ckpt.dir.display(),
        args.out.display()
    );
    Ok(())
}
