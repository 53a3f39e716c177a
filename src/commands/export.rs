//! `sdkd export --checkpoint <dir> --out <dir> [--ema] [--format unet|pipeline] [--dtype]`: a
//! training checkpoint as a diffusers UNet folder, or as a whole pipeline beside the teacher's
//! other parts.
use crate::distill::checkpoint::Checkpoint;
use crate::config::Precision;
use crate::export::{self, ExportFormat};
use crate::models::{weights, UNetConfig};
use anyhow::{anyhow, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint folder (`<output_dir>/checkpoints/step-N`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
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

pub fn run(args: &ExportArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.checkpoint)?;
    let config = UNetConfig::from_json(&ckpt.unet_config).with_context(|| format!("{}: unet/config.json", ckpt.dir.display()))?;
    let file = if args.ema {
        ckpt.ema_file().ok_or_else(|| anyhow!("--ema: checkpoint {} has no EMA weights (the run had no train.ema_decay)", ckpt.dir.display()))?
    } else {
        ckpt.student_file()
    };
    let tensors = weights::read_all(&file)?;
    let kind = Some(args.dtype.kind());
    match args.format {
        ExportFormat::Unet => export::write_unet_dir(&args.out, &config, &tensors, kind)?,
        ExportFormat::Pipeline => {
            let teacher = match &args.teacher {
                Some(t) => t.clone(),
                None => ckpt.meta.config["teacher"].as_str().map(PathBuf::from).ok_or_else(|| {
                    anyhow!("checkpoint {} records no teacher pipeline: pass --teacher <pipeline dir>", ckpt.dir.display())
                })?,
            };
            export::write_pipeline_dir(&args.out, &teacher, &config, &tensors, kind)?
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
