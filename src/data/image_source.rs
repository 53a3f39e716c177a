//! Any [`ImageRows`] dataset (imagefolder, webdataset, parquet) as a [`SampleSource`]: each
//! sample decoded, resized, cropped and flipped by a [`Transform`], with the crops and flips
//! drawn from a seed; with aspect-ratio buckets ([`ImageSource::with_buckets`]) each to the
//! size of its bucket.
use super::buckets::Buckets;
use super::source::{BadKind, BadSample, ImageRows, OnBadSample, SampleSource};
use super::transform::{cover, to_tensor_sized, Transform};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::sync::Arc;
use tch::Tensor;

/// A batch of images and their captions.
#[derive(Debug)]
pub struct ImageBatch {
    /// (b, 3, h, w) f32 in [-1, 1]: `resolution`², or the batch's bucket.
    pub images: Tensor,
    pub captions: Vec<String>,
    /// (b, 6) i64: SDXL's time ids of each sample ([`Transform::time_ids`]).
    pub time_ids: Tensor,
}

/// A decoded, transformed sample: `size` (width, height) HWC bytes, the caption and SDXL's time ids.
pub struct ImageItem {
    pub pixels: Vec<u8>,
    pub size: (u32, u32),
    pub caption: String,
    pub time_ids: [i64; 6],
}

/// An image-caption dataset seen through a [`Transform`], with crops and flips drawn from `seed`.
pub struct ImageSource {
    pub dataset: Arc<dyn ImageRows>,
    pub transform: Transform,
    pub seed: u64,
    /// `data.buckets`: the list, and each sample's bucket (None: its size could not be read).
    buckets: Option<(Buckets, Arc<[Option<u32>]>)>,
}

impl ImageSource {
    pub fn new(dataset: Arc<dyn ImageRows>, transform: Transform, seed: u64) -> Self {
        ImageSource { dataset, transform, seed, buckets: None }
    }

    /// Each sample cropped to its nearest bucket ([`Buckets::nearest`] of its size, read once
    /// here on all cores: the metadata's size where the format has one, else the image's header
    /// or the decoded image). A sample whose size cannot be read is skipped, or fails under
    /// [`OnBadSample::Fail`]; those skipped are returned.
    pub fn with_buckets(mut self, buckets: Buckets, on_bad_sample: OnBadSample) -> Result<(Self, Vec<BadSample>)> {
        let dataset = &self.dataset;
        let sizes: Vec<Result<(u32, u32), BadSample>> = (0..dataset.len()).into_par_iter().map(|i| dataset.dimensions(i)).collect();
        let mut bad = vec![];
        let mut of = Vec::with_capacity(sizes.len());
        for s in sizes {
            match s {
                Ok((w, h)) => of.push(Some(buckets.nearest(w, h) as u32)),
                Err(e) if on_bad_sample == OnBadSample::Fail => {
                    bail!("bad sample {e} (on_bad_sample is fail; set it to skip to skip such samples)")
                }
                Err(e) => {
                    bad.push(e);
                    of.push(None);
                }
            }
        }
        self.buckets = Some((buckets, of.into()));
        Ok((self, bad))
    }

    /// The bucket of each sample, when buckets are on.
    pub fn bucket_of(&self) -> Option<&[Option<u32>]> {
        self.buckets.as_ref().map(|(_, of)| &of[..])
    }

    /// The (width, height) sample `index` is cropped to.
    pub fn target(&self, index: usize) -> Result<(u32, u32), BadSample> {
        match &self.buckets {
            None => Ok((self.transform.resolution, self.transform.resolution)),
            Some((b, of)) => match of[index] {
                Some(k) => Ok(b.size(k as usize)),
                None => Err(self.dataset.dimensions(index).err().unwrap_or_else(|| BadSample {
                    index,
                    file: self.dataset.key(index).into(),
                    kind: BadKind::Corrupt,
                    reason: "its size could not be read when the buckets were assigned".into(),
                })),
            },
        }
    }

    /// Sample `index` as epoch `epoch` sees it: (3, h, w) in [-1, 1] and its caption.
    pub fn get(&self, index: usize, epoch: u64) -> Result<(Tensor, String), BadSample> {
        let item = self.load(index, epoch)?;
        let (w, h) = item.size;
        Ok((to_tensor_sized(&item.pixels, 1, (w as usize, h as usize)).squeeze_dim(0), item.caption))
    }
}

impl SampleSource for ImageSource {
    type Item = ImageItem;
    type Batch = ImageBatch;

    fn len(&self) -> usize {
        self.dataset.len()
    }

    fn load(&self, index: usize, epoch: u64) -> Result<ImageItem, BadSample> {
        let target = self.target(index)?;
        let (img, caption) = self.dataset.decode(index)?;
        let resized = cover(img.width(), img.height(), target);
        let aug = self.transform.augment_to(self.seed, epoch, index, resized, target);
        let time_ids = self.transform.time_ids(img.dimensions(), aug);
        Ok(ImageItem { pixels: self.transform.apply(&img, aug), size: target, caption, time_ids })
    }

    fn collate(&self, items: Vec<ImageItem>) -> Result<ImageBatch> {
        let size = items.first().map_or((0, 0), |it| it.size);
        let mut pixels = Vec::with_capacity(items.len() * size.0 as usize * size.1 as usize * 3);
        let mut captions = Vec::with_capacity(items.len());
        let mut time_ids = Vec::with_capacity(items.len() * 6);
        for it in items {
            if it.size != size {
                bail!("a batch of {} mixes images of {:?} and {:?} (the loader keeps a batch to one bucket)", self.describe(), size, it.size);
            }
            pixels.extend_from_slice(&it.pixels);
            captions.push(it.caption);
            time_ids.extend_from_slice(&it.time_ids);
        }
        let n = captions.len() as i64;
        let images = to_tensor_sized(&pixels, captions.len(), (size.0 as usize, size.1 as usize));
        Ok(ImageBatch { images, captions, time_ids: Tensor::from_slice(&time_ids).view([n, 6]) })
    }

    fn describe(&self) -> String {
        self.dataset.describe()
    }

    fn buckets(&self) -> Option<Arc<[Option<u32>]>> {
        self.buckets.as_ref().map(|(_, of)| of.clone())
    }
}
