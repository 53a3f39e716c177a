//! Data for distillation: imagefolder datasets with the anchors' transforms ([`dataset`],
//! [`transform`]), deterministic ordering and resumable cursors ([`order`]), parallel prefetching
//! loaders ([`loader`]), the latent cache of `sdkd preprocess` ([`cache`]) and the built-in
//! synthetic dataset of `sdkd synth` ([`synthetic`]).
pub mod cache;
pub mod dataset;
pub mod loader;
pub mod order;
pub mod synthetic;
pub mod transform;

pub use cache::{build_cache, CacheIndex, CacheOptions, CacheReport, Encoded, LatentBatch, LatentCache, SampleEncoder};
pub use dataset::{BadKind, BadSample, ImageBatch, ImageFolder, ImageSource, OnBadSample, Sample};
pub use loader::{measure_throughput, Batch, BatchStream, Loader, LoaderOptions, LoaderStats, SampleSource, Throughput};
pub use order::{Cursor, Order};
pub use transform::{Augment, Transform};
