//! The evaluation protocol: one scoring path and one report for `sdkd eval --images`,
//! `sdkd eval --model`, `validation.eval` and the demo's `--inception`.
//!
//! A `Scorer` holds what the metrics need, loaded before any image is generated (the Inception
//! network, the real images' FID statistics, the CLIP weights); `Scorer::score` computes the
//! asked metrics on a set of images into `Scores`, and a `Report` is what `report.json` holds.
//! FID is pytorch-fid's (its front end, `dims` pool features, the real statistics of a folder or
//! `.npz`), IS torch-fidelity's (its front end, `inception_score::SPLITS` splits), the CLIP score
//! BK-SDM's (mean raw cosine of open_clip's embeddings, images as generated: its preprocessing
//! resizes them). docs/eval.md gives the protocol and the measured agreement.
use super::clip_score::ClipScorer;
use super::generate::Generation;
use super::inception::InceptionV3;
use super::{fid, inception_score, FeatureCache, Metric};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use tch::Device;

/// FID over pool3 features, the standard (BK-SDM's, pytorch-fid's default).
pub const FID_DIMS: i64 = 2048;
/// Images per Inception (and CLIP) batch: pytorch-fid's default.
pub const INCEPTION_BATCH: usize = 50;
/// Prompts per UNet call when generating (the images do not depend on it).
pub const GENERATION_BATCH: usize = 8;

/// `--dims`: FID's Inception features, pool3 (2048, the standard) or an earlier block's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FidDims {
    #[value(name = "64")]
    D64,
    #[value(name = "192")]
    D192,
    #[value(name = "768")]
    D768,
    #[value(name = "2048")]
    D2048,
}

impl FidDims {
    /// How many features.
    pub fn features(self) -> i64 {
        match self {
            FidDims::D64 => 64,
            FidDims::D192 => 192,
            FidDims::D768 => 768,
            FidDims::D2048 => 2048,
        }
    }
}

/// The real images' FID statistics and where they came from.
pub struct RealStats {
    pub source: PathBuf,
    pub stats: fid::Stats,
}

impl RealStats {
    /// The statistics of a folder of images or a pytorch-fid `.npz`.
    pub fn read(source: &Path, net: &InceptionV3, dims: i64, batch: usize) -> Result<RealStats> {
        Ok(RealStats { source: source.to_path_buf(), stats: super::stats_of(source, net, dims, batch)? })
    }

    /// The few-images warning of `super::few_images_warning`, if it applies.
    pub fn warning(&self, dims: i64) -> Option<String> {
        self.stats.count.and_then(|n| super::few_images_warning(&self.source, n, dims))
    }
}

/// The CLIP model: kept loaded, or loaded for each scoring and dropped after it (during training:
/// ViT-g-14 would hold 5.5 GB of the training device between evaluations).
pub enum ClipWeights {
    Loaded(ClipScorer),
    EachTime { path: PathBuf, device: Device },
}

/// What the metrics are computed with.
pub struct Scorer {
    pub metrics: Vec<Metric>,
    /// The Inception network and its weights file (FID, IS).
    pub inception: Option<(InceptionV3, PathBuf)>,
    /// FID's reference.
    pub real: Option<RealStats>,
    pub clip: Option<ClipWeights>,
    /// FID's feature size (64, 192, 768 or 2048).
    pub dims: i64,
    /// Images per Inception and CLIP batch.
    pub batch: usize,
}

/// The images one scoring reads.
pub struct Images<'a> {
    /// The folder named in warnings.
    pub folder: &'a Path,
    /// What FID and IS read (with `sdkd eval --model`, the resized copies).
    pub scored: &'a [PathBuf],
    /// What the CLIP score reads: the images as generated, with their captions.
    pub captioned: Vec<(PathBuf, String)>,
    /// Per-image Inception outputs kept across runs (`sdkd eval --model`).
    pub cache: Option<&'a FeatureCache>,
}

/// One scoring's numbers, each present when its metric was asked for; serialised as the
/// `report.json` keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Scores {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fid: Option<f64>,
    /// FID's reference (a folder or `.npz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real: Option<String>,
    /// Inception Score mean and std over torch-fidelity's splits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_std: Option<f64>,
    /// Mean raw cosine (BK-SDM's CLIP score).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f64>,
    /// torchmetrics' CLIPScore: 100 · max(cosine, 0), averaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_score_torchmetrics: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_count: Option<usize>,
    /// The warnings of this scoring (few images for FID's covariance), printed by the caller.
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// The CLIP model's sizes, for `settings.clip`.
    #[serde(skip)]
    pub clip_settings: Option<ClipSettings>,
}

impl Scores {
    /// The TensorBoard scalars: `eval/fid`, `eval/is`, `eval/is_std`, `eval/clip_score`.
    pub fn scalars(&self) -> Vec<(&'static str, f32)> {
        let mut v = vec![];
        v.extend(self.fid.map(|f| ("eval/fid", f as f32)));
        if let (Some(m), Some(sd)) = (self.is_mean, self.is_std) {
            v.extend([("eval/is", m as f32), ("eval/is_std", sd as f32)]);
        }
        v.extend(self.clip_score.map(|c| ("eval/clip_score", c as f32)));
        v
    }

    /// One line for the progress output.
    pub fn summary(&self) -> String {
        let mut parts = vec![];
        parts.extend(self.fid.map(|f| format!("FID {f:.3}")));
        if let (Some(m), Some(sd)) = (self.is_mean, self.is_std) {
            parts.push(format!("IS {m:.3} ± {sd:.3}"));
        }
        parts.extend(self.clip_score.map(|c| format!("CLIP score {c:.4}")));
        parts.join(", ")
    }
}

/// `settings.clip`: the weights file and the sizes read from it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClipSettings {
    pub weights: String,
    pub image_size: i64,
    pub patch_size: i64,
    pub vision_width: i64,
    pub vision_layers: i64,
    pub text_width: i64,
    pub text_layers: i64,
    pub embed_dim: i64,
}

impl ClipSettings {
    fn of(scorer: &ClipScorer) -> ClipSettings {
        let cfg = &scorer.model.config;
        ClipSettings {
            weights: scorer.model.path.display().to_string(),
            image_size: cfg.vision.image_size as i64,
            patch_size: cfg.vision.patch_size as i64,
            vision_width: cfg.vision.width as i64,
            vision_layers: cfg.vision.layers as i64,
            text_width: cfg.text.width as i64,
            text_layers: cfg.text.layers as i64,
            embed_dim: cfg.embed_dim as i64,
        }
    }
}

impl Scorer {
    fn net(&self) -> Result<&InceptionV3> {
        self.inception.as_ref().map(|(n, _)| n).context("the Inception network is loaded for fid and is")
    }

    /// The asked metrics on `images`, in the order asked, with their warnings.
    pub fn score(&self, images: &Images<'_>) -> Result<Scores> {
        let mut s = Scores::default();
        for &metric in &self.metrics {
            match metric {
                Metric::Fid => {
                    let real = self.real.as_ref().context("the real statistics are read for fid")?;
                    let (fid, gen) = super::fid_against(self.net()?, images.scored, self.dims, self.batch, images.cache, &real.stats)?;
                    s.warnings.extend(gen.count.and_then(|n| super::few_images_warning(images.folder, n, self.dims)));
                    s.warnings.extend(real.warning(self.dims));
                    s.fid = Some(fid);
                    s.real = Some(real.source.display().to_string());
                }
                Metric::Is => {
                    let (m, sd) = super::inception_score_of(self.net()?, images.scored, self.batch, images.cache)?;
                    (s.is_mean, s.is_std) = (Some(m), Some(sd));
                }
                Metric::Clip => {
                    let loaded;
                    let scorer = match self.clip.as_ref().context("the CLIP weights are given for clip")? {
                        ClipWeights::Loaded(scorer) => scorer,
                        ClipWeights::EachTime { path, device } => {
                            loaded = ClipScorer::load(path, *device).context("validation.eval.clip")?;
                            &loaded
                        }
                    };
                    let c = scorer.score_files(&images.captioned, self.batch)?;
                    s.clip_score = Some(c.mean_cosine);
                    s.clip_score_torchmetrics = Some(c.torchmetrics);
                    s.clip_count = Some(c.count);
                    s.clip_settings = Some(ClipSettings::of(scorer));
                }
            }
        }
        Ok(s)
    }

    /// The scoring settings every report records.
    pub fn settings(&self, clip: Option<ClipSettings>) -> ScoringSettings {
        ScoringSettings {
            inception: self.inception.as_ref().map(|(_, p)| p.display().to_string()),
            fid_dims: self.dims,
            is_splits: inception_score::SPLITS,
            is_shuffle_seed: inception_score::SHUFFLE_SEED,
            metrics: self.metrics.clone(),
            inception_batch_size: self.batch,
            clip,
        }
    }
}

/// `settings`' scoring part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoringSettings {
    /// The Inception weights file.
    pub inception: Option<String>,
    pub fid_dims: i64,
    pub is_splits: usize,
    pub is_shuffle_seed: u32,
    pub metrics: Vec<Metric>,
    pub inception_batch_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip: Option<ClipSettings>,
}

/// `settings`' part that says how generated images were made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerationSettings {
    #[serde(flatten)]
    pub generation: Generation,
    /// Prompts per UNet call.
    pub batch_size: usize,
    /// FID and IS read copies resized to this square size (0: the images as generated).
    pub score_size: u32,
    /// The captions file.
    pub prompts: String,
    pub sample_seed: Option<u32>,
    /// The pipeline and UNet (`sdkd eval --model`; a training run evaluates its student).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSettings>,
}

/// Which pipeline and UNet generated, in what dtype and on what device: a `sdkd eval --model`
/// output folder is marked with these and the generation, so a rerun never mixes settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSettings {
    pub model: String,
    pub unet: Option<String>,
    pub ema: bool,
    /// The LoRAs fused in (`file:scale`, in order); absent when none, so earlier reports match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lora: Vec<String>,
    pub dtype: &'static str,
    pub device: &'static str,
}

/// `settings` of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Settings {
    #[serde(flatten)]
    pub scoring: ScoringSettings,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationSettings>,
}

/// What `report.json` holds (keys absent where they do not apply).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The model (the --unet, else the --model; a training run's "student" or "student EMA"), or
    /// the scored folder.
    pub model: String,
    /// The training step of a `validation.eval` report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    pub count: usize,
    /// The images folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images: Option<String>,
    /// What FID and IS read (`sdkd eval --model`: the resized copies' folder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scored: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unet_params: Option<i64>,
    /// Images kept from an earlier run and generated by this one (`sdkd eval --model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generated: Option<usize>,
    /// Generation seconds per image; null when every image was kept and no earlier report said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_per_image: Option<Option<f64>>,
    /// Wall seconds of a `validation.eval` evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    #[serde(flatten)]
    pub scores: Scores,
    pub settings: Settings,
    pub warnings: Vec<String>,
}

impl Report {
    /// `report.json`'s text: pretty JSON with sorted keys.
    pub fn to_json(&self) -> Result<String> {
        // through a Value, whose maps sort their keys, as every report.json has been written
        Ok(serde_json::to_string_pretty(&serde_json::to_value(self)?)? + "\n")
    }
}
