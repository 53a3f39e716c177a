//! `sdkd synth`: writes the built-in synthetic image-caption dataset as an imagefolder, webdataset
//! shards or a parquet dataset, as one crash-safe folder. `--out` must be new or empty, or an earlier `sdkd synth` folder with
//! `--overwrite`.
use crate::data::synthetic::{write_dataset, write_parquet, write_webdataset};
use crate::data::DataFormat;
use crate::fs_safe::{self, Marker, Purpose};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Output folder (created).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an earlier `sdkd synth` dataset at --out.
    #[arg(long)]
    pub overwrite: bool,
    /// Number of image-caption pairs.
    #[arg(long)]
    pub count: usize,
    /// Seed of the scenes; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the square images, in pixels.
    #[arg(long, default_value_t = 64)]
    pub resolution: u32,
    /// imagefolder (PNGs + metadata.jsonl), webdataset (00000.tar ... of 250 samples) or parquet
    /// (data/train-*.parquet): the same images and captions in each.
    #[arg(long, value_enum, default_value_t = DataFormat::Imagefolder)]
    pub format: DataFormat,
}

/// The most pairs one `sdkd synth` writes.
const MAX_COUNT: usize = 10_000_000;

pub fn run(a: &SynthArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    // before --out: a bad count is the error to report; past the bound it is a typo (a count
    // near u64::MAX would write until the disk is full)
    if !(1..=MAX_COUNT).contains(&a.count) {
        bail!("--count {}: must be 1 to {MAX_COUNT}", a.count);
    }
    fs_safe::check_replaceable(&a.out, Purpose::Dataset, a.overwrite, "--out")?;
    fs_safe::write_dir(&a.out, Some(&Marker::new(Purpose::Dataset)), |tmp| match a.format {
        DataFormat::Imagefolder => write_dataset(tmp, a.count, a.seed, a.resolution),
        DataFormat::Webdataset => write_webdataset(tmp, a.count, a.seed, a.resolution),
        DataFormat::Parquet => write_parquet(tmp, a.count, a.seed, a.resolution),
    })?;
    println!(
        "wrote {} images of {res}x{res} with captions ({:?}) to {} in {:.1}s",
        a.count,
        a.format,
        a.out.display(),
        t0.elapsed().as_secs_f64(),
        res = a.resolution
    );
    Ok(())
}
