//! `sdkd serve`: the HTTP text-to-image API (docs/serve.md) over a pipeline folder, optionally
//! with a student UNet, with API keys and credits in a SQLite file (`sdkd keys`).
use crate::runtime::DeviceChoice;
use super::generate::PipelineArgs;
use crate::serve::{keys::KeyStore, pricing::Pricing, serve, App, Limits};
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Requests that may wait for the model; the next one is answered 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Cancel (504, credits given back) a request not answered this many seconds after it came.
    #[arg(long, allow_negative_numbers = true)]
    pub max_request_seconds: Option<f64>,
    /// Seconds requests in flight may still run after SIGTERM/SIGINT (a second signal: none).
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    pub shutdown_grace: f64,
    /// Requests generated together: up to N waiting requests of one shape (size, steps,
    /// scheduler, samples, guidance on/off) share each batched UNet call (docs/serve.md).
    #[arg(long, default_value_t = 1)]
    pub max_batch: usize,
    /// Price table (YAML: credits, steps, width, height); default 1 credit per sample at 20
    /// steps, 512x512 (docs/serve.md).
    #[arg(long)]
    pub pricing: Option<PathBuf>,
}

fn seconds(flag: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v).map_err(|_| anyhow::anyhow!("{flag} {v}: must be a number of seconds, 0 or more"))
}

pub fn run(args: &ServeArgs) -> Result<()> {
    // a request counts as waiting from its arrival until it runs, so 0 would refuse them all
    anyhow::ensure!(args.max_queue >= 1, "--max-queue 0: must be 1 or more");
    anyhow::ensure!(args.max_batch >= 1, "--max-batch 0: must be 1 or more");
    let limits = Limits {
        max_queue: args.max_queue,
        max_request: args
            .max_request_seconds
            .map(|v| seconds("--max-request-seconds", v).and_then(|d| {
                anyhow::ensure!(!d.is_zero(), "--max-request-seconds {v}: must be more than 0 (leave it out for no limit)");
                Ok(d)
            }))
            .transpose()?,
        shutdown_grace: seconds("--shutdown-grace", args.shutdown_grace)?,
        max_batch: args.max_batch,
    };
    let pricing = args.pricing.as_deref().map(Pricing::load).transpose()?.unwrap_or_default();
    let device = args.device.resolve().context("--device")?;
    let (t2i, unet) = args.pipeline.load(device)?;
    let keys = KeyStore::open(&args.db)?;
    let mut model = args.pipeline.model.display().to_string();
    if let Some(u) = &unet {
        model = format!("{model} with UNet {}", u.describe());
    }
    if let Some(l) = args.pipeline.lora_text()? {
        model = format!("{model} with LoRA {l}");
    }
    eprintln!("loaded {model} on {device:?}");
    serve(App::new(t2i, keys, model, pricing, limits)?, &args.listen)
}
