//! Any [`ImageRows`] dataset (imagefolder, webdataset, parquet) as a [`SampleSource`]: each
//! sample decoded, resized, cropped and flipped by a [`Transform`], with the crops and flips
//! drawn from a seed.
use super::source::{BadSample, ImageRows, SampleSource};
use super::transform::{to_tensor, Transform};
use anyhow::Result;
use std::sync::Arc;
use tch::Tensor;

/// A batch of images and their captions.
#[derive(Debug)]
pub struct ImageBatch {
    /// (b, 3, res, res) f32 in [-1, 1].
    pub images: Tensor,
    pub captions: Vec<String>,
    /// (b, 6) i64: SDXL's time ids of each sample ([`Transform::time_ids`]).
    pub time_ids: Tensor,
}

/// A decoded, transformed sample: `res`² HWC bytes, the caption and SDXL's time ids.
pub struct ImageItem {
    pub pixels: Vec<u8>,
    pub caption: String,
    pub time_ids: [i64; 6],
}

/// An image-caption dataset seen through a [`Transform`], with crops and flips drawn from `seed`.
pub struct ImageSource {
    pub dataset: Arc<dyn ImageRows>,
    pub transform: Transform,
    pub seed: u64,
}

impl ImageSource {
    pub fn new(dataset: Arc<dyn ImageRows>, transform: Transform, seed: u64) -> Self {
        ImageSource { dataset, transform, seed }
    }

    /// Sample `index` as epoch `epoch` sees it: (3, res, res) in [-1, 1] and its caption.
    pub fn get(&self, index: usize, epoch: u64) -> Result<(Tensor, String), BadSample> {
        let item = self.load(index, epoch)?;
        let r = self.transform.resolution as usize;
        Ok((to_tensor(&item.pixels, 1, r).squeeze_dim(0), item.caption))
    }
}

impl SampleSource for ImageSource {
    type Item = ImageItem;
    type Batch = ImageBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn load(&self, index: usize, epoch: u64) -> Result<ImageItem, BadSample> {
        let (img, caption) = self.dataset.decode(index)?;
        let resized = self.transform.resized_size(img.width(), img.height());
        let aug = self.transform.augment(self.seed, epoch, index, resized);
        let time_ids = self.transform.time_ids(img.dimensions(), aug);
        Ok(ImageItem { pixels: self.transform.apply(&img, aug), caption, time_ids })
    }

    fn collate(&self, items: Vec<ImageItem>) -> Result<ImageBatch> {
        let r = self.transform.resolution as usize;
        let mut pixels = Vec::with_capacity(items.len() * r * r * 3);
        let mut captions = Vec::with_capacity(items.len());
        let mut time_ids = Vec::with_capacity(items.len() * 6);
        for it in items {
            pixels.extend_from_slice(&it.pixels);
            captions.push(it.caption);
            time_ids.extend_from_slice(&it.time_ids);
        }
        let n = captions.len() as i64;
        Ok(ImageBatch { images: to_tensor(&pixels, captions.len(), r), captions, time_ids: Tensor::from_slice(&time_ids).view([n, 6]) })
    }

    fn describe(&self) -> String {
        self.dataset.describe()
    }
}
