//! What every data source shares: the [`SampleSource`] trait the loader draws from (decoded
//! images in `image_source.rs`, latent rows in `cache.rs`), and the bad-sample types a source
//! reports and the loader skips or fails on.
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// Something a loader can draw samples from.
pub trait SampleSource: Send + Sync + 'static {
    /// One loaded sample.
    type Item: Send + 'static;
    /// A collated batch of items.
    type Batch: Send + 'static;
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Loads sample `index` as epoch `epoch` sees it (the epoch picks crops and flips). Must be a
    /// pure function of (index, epoch); an unusable sample is a [`BadSample`].
    fn load(&self, index: usize, epoch: u64) -> std::result::Result<Self::Item, BadSample>;
    /// Stacks items into a batch.
    fn collate(&self, items: Vec<Self::Item>) -> Result<Self::Batch>;
    /// Names the source in messages ("dataset /data/x").
    fn describe(&self) -> String;
}

/// What to do with a sample that cannot be used (`data.on_bad_sample`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnBadSample {
    /// Warn, count, and fill the batch from the next samples.
    #[default]
    Skip,
    /// Stop with an error naming the file.
    Fail,
}

/// Why a sample was unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadKind {
    /// The image file does not exist.
    Missing,
    /// The image file has zero bytes.
    Empty,
    /// The file could not be read or decoded as an image.
    Corrupt,
    /// The caption is empty, blank or absent.
    EmptyCaption,
}

/// One unusable sample: which, where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSample {
    pub index: usize,
    pub file: PathBuf,
    pub kind: BadKind,
    pub reason: String,
}

impl fmt::Display for BadSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.reason)
    }
}

impl std::error::Error for BadSample {}
