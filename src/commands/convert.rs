//! `sdkd convert --from <file or folder> --to <folder or file>`: a single-file checkpoint
//! (LDM layout, `.safetensors`) to a diffusers pipeline folder, or a pipeline folder to a single
//! file; the direction follows from what `--from` is. `--to` follows the overwrite rule of
//! `export --out` (a folder: new, empty or an earlier sdkd pipeline; a file: new or an earlier
//! sdkd single file), and is never the source.
use crate::runtime::Precision;
use crate::export::{self, ExportFormat};
use crate::fs_safe::{self, Purpose};
use crate::models::single_file::SingleFileOptions;
use crate::models::{weights, PipelineDir};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use tch::{Device, Kind};

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// A single-file checkpoint (.safetensors) or a diffusers pipeline folder.
    #[arg(long)]
    pub from: PathBuf,
    /// The pipeline folder (from a file) or the .safetensors file (from a folder) to write.
    #[arg(long)]
    pub to: PathBuf,
    /// Replace an earlier sdkd output at --to.
    #[arg(long)]
    pub overwrite: bool,
    /// Take the UNet from the file's EMA weights (`model_ema.*`).
    #[arg(long)]
    pub use_ema: bool,
    /// What the UNet predicts, for a file whose weights cannot say (SD-2.x without its .yaml).
    #[arg(long, value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: Option<String>,
    /// A diffusers pipeline folder whose configs describe a single-file --from (diffusers'
    /// `from_single_file(config=…)`), for models whose norm groups or heads are not the defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Storage dtype (default fp32 for a folder, fp16 for a single file).
    #[arg(long, value_enum)]
    pub dtype: Option<Precision>,
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let args = &ConvertArgs { from: crate::hub::local(&args.from, crate::hub::Want::Pipeline)?, ..args.clone() };
    fs_safe::check_apart(&args.to, &args.from, "--from", "--to")?;
    let to_file = args.from.is_dir();
    if to_file && (args.use_ema || args.prediction_type.is_some() || args.config.is_some()) {
        bail!("--use-ema, --prediction-type and --config describe a single-file --from; {} is a folder", args.from.display());
    }
    if let Some(dir) = &args.config {
        if !dir.join("model_index.json").is_file() {
            bail!("--config {}: not a diffusers pipeline folder (no model_index.json)", dir.display());
        }
    }
    let options = SingleFileOptions { use_ema: args.use_ema, prediction_type: args.prediction_type.clone(), config: args.config.clone() };
    let pipe = PipelineDir::open_with(&args.from, &options)?;
    let format = if to_file { ExportFormat::SingleFile } else { ExportFormat::Pipeline };
    if to_file {
        export::check_single_file_replaceable(&args.to, args.overwrite, "--to")?;
    } else {
        fs_safe::check_replaceable(&args.to, Purpose::Pipeline, args.overwrite, "--to")?;
    }
    let kind = Some(args.dtype.unwrap_or(export::default_dtype(format)).kind());
    let unet = pipe.load_unet(Device::Cpu, Kind::Float)?;
    let tensors = weights::named_tensors(&unet.vs);
    if to_file {
        let title = args.from.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        export::write_single_file(&args.to, &pipe, &unet.model.config, &tensors, kind, &title)?;
    } else {
        // an LCM pipeline keeps the grid its scheduler config names
        let lcm = pipe.scheduler_config()?.lcm_grid();
        export::write_pipeline_from(&args.to, &pipe, &unet.model.config, &tensors, kind, lcm)?;
    }
    println!("converted {} -> {}", args.from.display(), args.to.display());
    Ok(())
}
