//! `sdkd export --checkpoint <dir> --out <dir> [--ema] [--format unet|pipeline|single-file] [--dtype]`:
//! a training checkpoint as a diffusers UNet folder, as a whole pipeline beside the teacher's
//! other parts, or as one LDM-layout `.safetensors` file with the teacher's VAE and text encoder.
//! `--out` must be new or empty, or an earlier sdkd export of the same format with
//! `--overwrite`; never the checkpoint (or inside it), its run or the teacher (or inside it).
use crate::distill::checkpoint::Checkpoint;
use crate::runtime::Precision;
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
    /// Storage dtype of the written weights (default fp32; fp16 for `--format single-file`).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
    /// The teacher pipeline (folder or single file) whose other parts go beside the UNet
    /// (`--format pipeline`/`single-file`); by default the run's own teacher, recorded in the
    /// checkpoint.
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
        (_, Some(t)) => Some(t.clone()),
        (_, None) => Some(ckpt.meta.config["teacher"].as_str().map(PathBuf::from).ok_or_else(|| {
            anyhow!("checkpoint {} records no teacher pipeline: pass --teacher <pipeline dir>", ckpt.dir.display())
        })?),
    };
    if let Some(teacher) = &teacher {
        fs_safe::check_apart(&args.out, teacher, "the teacher pipeline", "--out")?;
    }
    if args.format == ExportFormat::SingleFile {
        export::check_single_file_replaceable(&args.out, args.overwrite, "--out")?;
    } else {
        fs_safe::check_replaceable(&args.out, args.format.purpose(), args.overwrite, "--out")?;
    }
    let tensors = weights::read_all(&file)?;
    let kind = Some(args.dtype.unwrap_or(export::default_dtype(args.format)).kind());
    match &teacher {
        None => export::write_unet_dir(&args.out, &config, &tensors, kind)?,
        Some(teacher) => {
            let title = format!("{} step {}", ckpt.meta.config["student"].as_str().unwrap_or("student"), ckpt.meta.step);
            export::write_student(&args.out, args.format, teacher, &config, &tensors, kind, &title)?
        }
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
