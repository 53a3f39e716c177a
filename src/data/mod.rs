//! Data for distillation. [`source`] holds what every source shares (the [`SampleSource`] trait,
//! the [`ImageRows`] trait of image-caption formats and the bad-sample types); the sources plug
//! into it: imagefolder datasets ([`dataset`]), webdataset tar shards ([`webdataset`]) and
//! Hugging Face parquet files ([`hf_parquet`]), chosen by [`formats`] and filtered by
//! [`filters`], decoded
//! through the training transforms of diffusers' `train_text_to_image.py` ([`transform`],
//! [`image_source`]) and the latent cache of `sdkd preprocess` ([`cache`]). [`order`] fixes the
//! order and resumable cursors, [`loader`] batches any source in parallel, and [`synthetic`] is
//! the built-in dataset of `sdkd synth`.
pub mod buckets;
pub mod cache;
pub mod config;
pub mod dataset;
pub mod filters;
pub mod formats;
pub mod hf_parquet;
pub mod image_source;
pub mod loader;
pub mod order;
pub mod source;
pub mod synthetic;
pub mod transform;
pub mod webdataset;

pub use buckets::{Buckets, BucketsConfig};
pub use config::DataConfig;
pub use cache::{build_cache, CacheIndex, CacheOptions, CacheReport, Encoded, LatentBatch, LatentCache, SampleEncoder};
pub use dataset::{ImageFolder, Sample};
pub use image_source::{ImageBatch, ImageItem, ImageSource};
pub use loader::{measure_throughput, Batch, BatchStream, Loader, LoaderOptions, LoaderStats, Throughput};
pub use filters::Filters;
pub use formats::{open_image_rows, DataFormat, DataOptions};
pub use hf_parquet::ParquetSet;
pub use source::{BadKind, BadSample, ImageRows, OnBadSample, SampleSource};
pub use webdataset::WebDataset;
pub use order::{Cursor, Order, Shard};
pub use transform::{Augment, Transform};
