//! The run YAML's `data:` section: where the training pairs are (an imagefolder, webdataset or
//! parquet shards, or a latent cache), how they are cropped and filtered, and the caption
//! dropout. docs/config.md documents every key.
use super::buckets::{Buckets, BucketsConfig};
use super::filters::Filters;
use super::formats::{DataFormat, DataOptions};
use super::source::OnBadSample;
use crate::config_error::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Image folder with metadata.jsonl / metadata.csv (`file_name`, `text`).
    pub path: Option<PathBuf>,
    /// A `sdkd preprocess` output folder, read instead of images.
    pub cache: Option<PathBuf>,
    pub resolution: u32,
    pub center_crop: bool,
    pub random_flip: bool,
    pub on_bad_sample: OnBadSample,
    // The shard keys are left out of the serialised config at their defaults, so that configs
    // without them hash (`config_hash`) as before and earlier checkpoints still resume.
    /// webdataset or parquet shards: a folder, a brace pattern (`laion/{00000..01023}.tar`) or a
    /// file listing one shard per line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<String>,
    /// imagefolder, webdataset or parquet; detected from data.path / data.shards when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<DataFormat>,
    /// The caption: webdataset `txt` or a json key; parquet a column (default `text`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// parquet: the image column, a {bytes, path} struct (default `image`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_column: Option<String>,
    /// Rows whose image's short side (from the metadata) is smaller are left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_size: Option<u32>,
    /// Rows whose long side / short side is larger are left out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_aspect: Option<f64>,
    /// Conditions on json keys / parquet columns, e.g. `aesthetic_score: ">= 6.5"`.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub filter: std::collections::BTreeMap<String, String>,
    /// Probability that a training sample's caption is replaced by the empty prompt (diffusers'
    /// `proportion_empty_prompts`; SD trained with 0.1), which teaches the unconditional
    /// prediction classifier-free guidance samples with.
    #[serde(skip_serializing_if = "is_zero")]
    pub caption_dropout: f64,
    /// What a dropped caption becomes; absent: the teacher family's own (`zeros` for SDXL,
    /// `empty_prompt` for SD-1.x/2.x).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_caption: Option<DroppedCaption>,
    /// Aspect-ratio buckets instead of `resolution`² crops: `ssd_1b` (SSD-1B's nine resolutions)
    /// or a list of [width, height]; each image is cropped to its nearest, a micro-batch holds
    /// one bucket (`data::buckets`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<BucketsConfig>,
}

/// What `data.caption_dropout` replaces a caption's embeddings by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DroppedCaption {
    /// Zeros for the text embeddings and the pooled embedding: how SDXL was trained (SGM's
    /// `GeneralConditioner` zeroes dropped conditioning), hence its pipeline's
    /// `force_zeros_for_empty_prompt`.
    Zeros,
    /// The encoded empty prompt "": SD-1.x/2.x's training, and diffusers' example scripts
    /// (`train_text_to_image_sdxl.py`'s `--proportion_empty_prompts`) for SDXL too.
    EmptyPrompt,
}

impl DroppedCaption {
    /// The mode `data.dropped_caption` picks, or the family's own: SDXL's is zeros.
    pub fn resolve(choice: Option<DroppedCaption>, sdxl: bool) -> DroppedCaption {
        choice.unwrap_or(if sdxl { DroppedCaption::Zeros } else { DroppedCaption::EmptyPrompt })
    }
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: None,
            cache: None,
            resolution: 512,
            center_crop: true,
            random_flip: true,
            on_bad_sample: OnBadSample::Skip,
            shards: None,
            format: None,
            caption: None,
            image_column: None,
            min_size: None,
            max_aspect: None,
            filter: Default::default(),
            caption_dropout: 0.0,
            dropped_caption: None,
            buckets: None,
        }
    }
}

impl DataConfig {
    /// Where the images are (`data.shards` or `data.path`) and the key that says so.
    pub fn location(&self) -> Option<(String, &'static str)> {
        match (&self.shards, &self.path) {
            (Some(s), _) => Some((s.clone(), "data.shards")),
            (None, Some(p)) => Some((p.to_string_lossy().into_owned(), "data.path")),
            (None, None) => None,
        }
    }

    /// How to read the images (validated by `validate`).
    pub fn options(&self) -> Result<DataOptions, ConfigError> {
        let filters = Filters::from_config(self.min_size, self.max_aspect, &self.filter).map_err(|(k, m)| invalid(&k, m))?;
        Ok(DataOptions { format: self.format, caption: self.caption.clone(), image_column: self.image_column.clone(), filters })
    }
    /// The `data.*` checks that need no other section; each message names the key and value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = self;
        if d.path.is_none() && d.cache.is_none() && d.shards.is_none() {
            return Err(invalid(
                "data.path",
                "data: set data.path (an image folder), data.shards (webdataset or parquet shards) or data.cache (a `sdkd preprocess` output)".to_string(),
            ));
        }
        if d.path.is_some() && d.shards.is_some() {
            return Err(invalid("data.shards", "data: set data.path (an image folder) or data.shards (webdataset or parquet shards), not both".to_string()));
        }
        if d.format == Some(DataFormat::Imagefolder) && d.shards.is_some() {
            return Err(invalid("data.format", "data.format = imagefolder but data.shards is set: an imagefolder is given by data.path".to_string()));
        }
        if d.shards.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(invalid("data.shards", "data.shards is empty".to_string()));
        }
        if d.min_size == Some(0) {
            return Err(invalid("data.min_size", "data.min_size = 0: must be at least 1 (or leave it out)".to_string()));
        }
        for (key, v) in [("data.caption", &d.caption), ("data.image_column", &d.image_column)] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(invalid(key, format!("{key} is empty: name a field or column (or leave it out)")));
            }
        }
        d.options()?;
        d.buckets()?;
        if !(0.0..=1.0).contains(&d.caption_dropout) {
            return Err(invalid(
                "data.caption_dropout",
                format!("data.caption_dropout = {}: must be a probability in [0, 1]", d.caption_dropout),
            ));
        }
        if d.resolution == 0 || !d.resolution.is_multiple_of(8) {
            return Err(invalid(
                "data.resolution",
                format!(
                    "data.resolution = {}: must be a positive multiple of 8 (the VAE downsamples by 8)",
                    d.resolution
                ),
            ));
        }
        Ok(())
    }

    /// The checked `data.buckets`, when set.
    pub fn buckets(&self) -> Result<Option<Buckets>, ConfigError> {
        self.buckets.as_ref().map(|b| b.buckets().map_err(|m| invalid("data.buckets", m))).transpose()
    }

    /// Makes the relative paths (`path`, `cache`, `shards`) absolute against `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.path, &mut self.cache].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(s) = self.shards.as_mut() {
            if Path::new(s.as_str()).is_relative() {
                *s = base.join(s.as_str()).to_string_lossy().into_owned();
            }
        }
    }
}
