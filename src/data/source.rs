//! What every data source shares: the [`SampleSource`] trait the loader draws from (decoded
//! images in `image_source.rs`, latent rows in `cache.rs`), the [`ImageRows`] trait of the
//! image-caption formats (imagefolder, webdataset, parquet), and the bad-sample types a source
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
    /// Each sample's aspect-ratio bucket (`data.buckets`; None: a sample that cannot be placed),
    /// when a batch must hold one bucket only; None when any samples batch together.
    fn buckets(&self) -> Option<std::sync::Arc<[Option<u32>]>> {
        None
    }
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

/// An image-caption dataset in some on-disk format: random access to encoded rows by index, so
/// that [`SampleSource::load`] stays a pure function of (index, epoch) and resuming is exact.
pub trait ImageRows: Send + Sync + 'static {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads and decodes row `index` as 8-bit RGB with its caption.
    fn decode(&self, index: usize) -> std::result::Result<(image::RgbImage, String), BadSample>;
    /// Names row `index` within the dataset (a file name, `shard.tar/KEY`, `file.parquet#row`).
    fn key(&self, index: usize) -> String;
    /// A hash of every row's key and caption: tells a latent cache whether it was made from
    /// this dataset.
    fn fingerprint(&self) -> String;
    /// Where the dataset is ("imagefolder /data/x", "webdataset /data/{00000..00009}.tar").
    fn describe(&self) -> String;
    /// (width, height) of row `index` when its metadata says so without decoding.
    fn size_hint(&self, _index: usize) -> Option<(u32, u32)> {
        None
    }
    /// (width, height) of row `index` for its aspect-ratio bucket: [`ImageRows::size_hint`], else
    /// the decoded image's (formats that can read a header alone override this).
    fn dimensions(&self, index: usize) -> std::result::Result<(u32, u32), BadSample> {
        match self.size_hint(index) {
            Some(s) => Ok(s),
            None => self.decode(index).map(|(img, _)| img.dimensions()),
        }
    }
}

/// Decodes an encoded image by its content (not its name: scraped sets mislabel files) as 8-bit
/// RGB (alpha dropped, grey replicated, palettes expanded, as Pillow's `convert("RGB")`).
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<image::RgbImage, (BadKind, String)> {
    if bytes.is_empty() {
        return Err((BadKind::Empty, "image is empty (0 bytes)".into()));
    }
    let img = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| (BadKind::Corrupt, format!("cannot read the image: {e}")))?
        .decode()
        .map_err(|e| (BadKind::Corrupt, format!("not a decodable JPEG/PNG/WebP image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err((BadKind::Corrupt, "image has no pixels".into()));
    }
    Ok(img.to_rgb8())
}

/// A caption that can be trained on, or why not.
pub fn usable_caption(caption: Option<&str>, missing: &str) -> std::result::Result<String, (BadKind, String)> {
    match caption {
        None => Err((BadKind::EmptyCaption, missing.to_string())),
        Some(c) if c.trim().is_empty() => Err((BadKind::EmptyCaption, "empty caption".into())),
        Some(c) => Ok(c.to_string()),
    }
}

/// A fingerprint over a stream of strings (keys and captions), order-sensitive.
pub fn fingerprint_of<'a>(n: usize, parts: impl Iterator<Item = &'a [u8]>) -> String {
    let mut h = super::order::splitmix64(n as u64);
    for part in parts {
        for piece in [part, b"\0"] {
            for chunk in piece.chunks(8) {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                h = super::order::splitmix64(h ^ u64::from_le_bytes(b) ^ chunk.len() as u64);
            }
        }
    }
    format!("{h:016x}")
}
