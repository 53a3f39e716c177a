//! `sdkd serve`: the HTTP text-to-image API (docs/serve.md) over a pipeline folder, optionally
//! with a student UNet, with API keys and credits in a SQLite file (`sdkd keys`).
use crate::config::DeviceChoice;
use super::generate::PipelineArgs;
use crate::serve::{keys::KeyStore, serve, App};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The SQLite file of API keys and credits (made by `sdkd keys add`; must exist).
    #[arg(long)]
    pub db: PathBuf,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

pub fn run(args: &ServeArgs) -> Result<()> {
    let device = args.device.resolve().context("--device")?;
    let (t2i, unet) = args.pipeline.load(device)?;
    let keys = KeyStore::open(&args.db)?;
    let mut model = args.pipeline.model.display().to_string();
    if let Some(u) = &unet {
        model = format!("{model} with UNet {}", u.describe());
    }
    eprintln!("loaded {model} on {device:?}");
    serve(App::new(t2i, keys, model), &args.listen)
}
