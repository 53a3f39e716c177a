//! `sdkd preprocess`: encodes a dataset once into a latent cache that `train` reads through
//! `data.cache` (see `data::cache` for the format). Everything but building the teacher's
//! encoder is here: [`run_with`] takes any [`SampleEncoder`].
use crate::data::{build_cache, open_image_rows, CacheOptions, DataFormat, DataOptions, Filters, OnBadSample, SampleEncoder, Transform};
use anyhow::Result;
use clap::{ArgAction, Args};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct PreprocessArgs {
    /// The teacher pipeline folder (diffusers layout: vae/, text_encoder/, tokenizer/).
    #[arg(long)]
    pub teacher: PathBuf,
    /// The dataset to encode: an imagefolder (metadata.jsonl or metadata.csv, or .txt sidecars),
    /// or webdataset/parquet shards (a folder, a brace pattern such as `laion/{00000..00099}.tar`,
    /// or a file listing one shard per line).
    #[arg(long)]
    pub data: String,
    /// imagefolder, webdataset or parquet (detected from --data when absent).
    #[arg(long, value_enum)]
    pub format: Option<DataFormat>,
    /// The caption: webdataset `txt` or a json key; parquet a column (default `text`).
    #[arg(long)]
    pub caption: Option<String>,
    /// parquet: the image column, a {bytes, path} struct (default `image`).
    #[arg(long)]
    pub image_column: Option<String>,
    /// Leave out rows whose image's short side (metadata width/height) is smaller (data.min_size).
    #[arg(long)]
    pub min_size: Option<u32>,
    /// Leave out rows whose long side / short side is larger (data.max_aspect).
    #[arg(long)]
    pub max_aspect: Option<f64>,
    /// A condition on a json key or column, `KEY=OP VALUE` such as `aesthetic_score=>= 6.5`
    /// (data.filter); repeatable.
    #[arg(long = "filter")]
    pub filters: Vec<String>,
    /// Side of the square crops fed to the VAE, in pixels.
    #[arg(long)]
    pub resolution: u32,
    /// Aspect-ratio buckets instead of square crops (data.buckets): `ssd_1b` or a list of
    /// [width, height], such as '[[1024, 1024], [1152, 896], [896, 1152]]'; a run reads the
    /// cache with the same data.buckets.
    #[arg(long)]
    pub buckets: Option<String>,
    /// The cache folder (created; an unfinished cache there is resumed).
    #[arg(long)]
    pub out: PathBuf,
    /// Centre crop (true) or a random crop fixed at preprocess time (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub center_crop: bool,
    /// Mirror half of the samples, fixed at preprocess time.
    #[arg(long, default_value_t = false, action = ArgAction::Set)]
    pub random_flip: bool,
    /// Seed of the random crops and flips.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Dataset samples per shard (the unit of resuming).
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    /// Samples per encoder call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// skip (warn and count) or fail on a corrupt, missing or empty image or an empty caption.
    #[arg(long, value_enum, default_value_t = OnBadSample::Skip)]
    pub on_bad_sample: OnBadSample,
    /// Decode threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

impl PreprocessArgs {
    pub fn transform(&self) -> Transform {
        Transform { resolution: self.resolution, center_crop: self.center_crop, random_flip: self.random_flip }
    }
}

/// Builds (or finishes) the cache with `encoder` and reports what it did.
pub fn run_with(a: &PreprocessArgs, encoder: &dyn SampleEncoder) -> Result<()> {
    if a.resolution == 0 || !a.resolution.is_multiple_of(8) {
        anyhow::bail!("--resolution {} must be a positive multiple of 8 (the VAE downsamples by 8)", a.resolution);
    }
    let buckets = match &a.buckets {
        None => None,
        Some(text) => {
            let config: crate::data::BucketsConfig = serde_yaml::from_str(text).map_err(|e| anyhow::anyhow!("--buckets {text:?}: {e}"))?;
            Some(config.buckets().map_err(|m| anyhow::anyhow!("--buckets {text:?}: {}", m.replace("data.buckets", "--buckets")))?)
        }
    };
    // The loader builds each batch's pixels in host memory (f32): refuse a batch that cannot be
    // held before decoding, where a failed allocation would abort the process.
    let pixels = buckets.as_ref().map_or((a.resolution as f64).powi(2), |b| b.max_pixels() as f64);
    let batch_bytes = a.batch_size.min(a.shard_size) as f64 * 3.0 * pixels * 4.0;
    if !crate::memory::device_can_hold(tch::Device::Cpu, batch_bytes) {
        anyhow::bail!(
            "--batch-size {}, --resolution {}: one batch of pixels needs {:.1} GiB of host memory, more than this machine has available; lower one of them",
            a.batch_size,
            a.resolution,
            batch_bytes / (1u64 << 30) as f64
        );
    }
    let t0 = std::time::Instant::now();
    let mut conditions = std::collections::BTreeMap::new();
    for f in &a.filters {
        let (k, c) = f.split_once('=').ok_or_else(|| anyhow::anyhow!("--filter {f:?}: expected KEY=CONDITION, such as aesthetic_score=\">= 6.5\""))?;
        conditions.insert(k.trim().to_string(), c.to_string());
    }
    let filters = Filters::from_config(a.min_size, a.max_aspect, &conditions)
        .map_err(|(key, message)| {
            let flag = match key.as_str() {
                "data.max_aspect" => "--max-aspect".to_string(),
                "data.min_size" => "--min-size".to_string(),
                k => format!("--filter {}", k.trim_start_matches("data.filter.")),
            };
            anyhow::anyhow!("{}", message.replace(&key, &flag))
        })?;
    let options = DataOptions { format: a.format, caption: a.caption.clone(), image_column: a.image_column.clone(), filters };
    let dataset = open_image_rows(&a.data, "--data", &options)?;
    if let Some(w) = crate::data::formats::small_images_warning(dataset.as_ref(), a.resolution) {
        eprintln!("{}", w.replace("data.resolution", "--resolution"));
    }
    let opts = CacheOptions {
        transform: a.transform(),
        buckets,
        seed: a.seed,
        shard_size: a.shard_size,
        batch_size: a.batch_size,
        on_bad_sample: a.on_bad_sample,
        threads: a.threads,
    };
    let r = build_cache(dataset.clone(), encoder, &a.out, &opts)?;
    println!(
        "cached {} of {} samples in {} shards ({} kept from an earlier run, {} written) to {} in {:.1}s; {} bad samples skipped",
        r.rows,
        dataset.len(),
        r.shards,
        r.shards_kept,
        r.shards_written,
        a.out.display(),
        t0.elapsed().as_secs_f64(),
        r.skipped
    );
    Ok(())
}

/// Encodes with the teacher pipeline's own VAE and text encoder (fp32; on CUDA when present).
pub fn run(a: &PreprocessArgs) -> Result<()> {
    let pipeline = crate::models::PipelineDir::open(&crate::hub::local(&a.teacher, crate::hub::Want::Pipeline)?)?;
    let encoder = crate::distill::encoder::TeacherEncoder::load(&pipeline, tch::Device::cuda_if_available(), tch::Kind::Float)?;
    run_with(a, &encoder)
}
