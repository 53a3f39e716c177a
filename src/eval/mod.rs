//! Image-quality metrics by the protocol distillation papers report (BK-SDM): FID (pytorch-fid),
//! Inception Score (torch-fidelity), both on the TF-ported Inception-v3 read from its published
//! `.pth` file, and the CLIP score (open_clip); `protocol` is the one scoring path and report
//! every evaluation goes through. docs/eval.md gives the protocol and the measured agreement.
pub mod clip_score;
pub mod config;
pub mod fid;
pub mod generate;
pub mod inception;
pub mod inception_score;
pub mod periodic;
pub mod prompts;
pub mod protocol;

use anyhow::{bail, Context, Result};
use inception::InceptionV3;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// pytorch-fid's `IMAGE_EXTENSIONS`, matched as it globs them (lower case).
const IMAGE_EXTENSIONS: [&str; 9] = ["bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"];

/// The images directly in `dir` (not in subfolders), sorted, as pytorch-fid lists them.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading the image folder {}", dir.display()))?;
    let mut files = vec![];
    for e in entries {
        let p = e?.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if p.is_file() && IMAGE_EXTENSIONS.contains(&ext) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("{} holds no images ({})", dir.display(), IMAGE_EXTENSIONS.join(", "));
    }
    Ok(files)
}

/// One image as PIL's `convert("RGB")` gives it, as a (3, H, W) byte tensor.
pub fn read_image(path: &Path) -> Result<Tensor> {
    let img = image::open(path).with_context(|| format!("decoding {}", path.display()))?.to_rgb8();
    let (w, h) = img.dimensions();
    Ok(Tensor::from_slice(img.as_raw()).view([h as i64, w as i64, 3]).permute([2, 0, 1]))
}

/// Which reference implementation's input pipeline feeds the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frontend {
    /// pytorch-fid: [0, 1], torch bilinear to 299², [-1, 1].
    PytorchFid,
    /// torch-fidelity: bytes, TensorFlow 1.x bilinear to 299², (x - 128) / 128.
    TorchFidelity,
}

/// Runs the network over `paths` in batches of up to `batch_size` images of equal size; returns
/// the (N, dims) features and, for dims 2048, the (N, 1008) unbiased logits.
pub fn features(net: &InceptionV3, paths: &[PathBuf], frontend: Frontend, dims: i64, batch_size: usize) -> Result<(Tensor, Option<Tensor>)> {
    let (mut pools, mut logits) = (vec![], vec![]);
    let mut i = 0;
    while i < paths.len() {
        let first = read_image(&paths[i])?;
        let mut batch = vec![first];
        while batch.len() < batch_size.max(1) && i + batch.len() < paths.len() {
            let next = read_image(&paths[i + batch.len()])?;
            if next.size() != batch[0].size() {
                break;
            }
            batch.push(next);
        }
        i += batch.len();
        let images = Tensor::stack(&batch, 0).to_device(net.device());
        let x = match frontend {
            Frontend::PytorchFid => inception::pytorch_fid_input(&images),
            Frontend::TorchFidelity => inception::torch_fidelity_input(&images),
        };
        let f = net.forward(&x, dims)?;
        pools.push(f.pool.to_kind(Kind::Float).to_device(tch::Device::Cpu));
        if let Some(l) = f.logits_unbiased {
            logits.push(l.to_device(tch::Device::Cpu));
        }
    }
    let logits = (!logits.is_empty()).then(|| Tensor::cat(&logits, 0));
    Ok((Tensor::cat(&pools, 0), logits))
}

/// FID of the images at `paths` against `real` (pytorch-fid's front end, `dims` features), and
/// the images' statistics.
pub fn fid_against(net: &InceptionV3, paths: &[PathBuf], dims: i64, batch_size: usize, cache: Option<&FeatureCache>, real: &fid::Stats) -> Result<(f64, fid::Stats)> {
    let (f, _) = features_cached(net, paths, Frontend::PytorchFid, dims, batch_size, cache)?;
    let stats = fid::Stats::from_features(&f)?;
    Ok((fid::frechet_distance(&stats, real)?, stats))
}

/// Inception Score of the images at `paths` (torch-fidelity's front end and 10 splits): (mean, std).
pub fn inception_score_of(net: &InceptionV3, paths: &[PathBuf], batch_size: usize, cache: Option<&FeatureCache>) -> Result<(f64, f64)> {
    let (_, logits) = features_cached(net, paths, Frontend::TorchFidelity, 2048, batch_size, cache)?;
    inception_score::inception_score(&logits.context("2048-d features come with logits")?, inception_score::SPLITS)
}

/// FID statistics of a folder of images or a pytorch-fid `.npz`.
pub fn stats_of(source: &Path, net: &InceptionV3, dims: i64, batch_size: usize) -> Result<fid::Stats> {
    if source.extension().is_some_and(|e| e == "npz") {
        let s = fid::Stats::read_npz(source)?;
        if s.dims() != dims {
            bail!("{} holds {}-d statistics, but --dims is {dims}", source.display(), s.dims());
        }
        return Ok(s);
    }
    if !source.is_dir() {
        bail!("{} is neither an image folder nor a .npz of FID statistics", source.display());
    }
    let paths = list_images(source)?;
    let (f, _) = features(net, &paths, Frontend::PytorchFid, dims, batch_size)?;
    fid::Stats::from_features(&f)
}

/// The warning for statistics from fewer images than the covariance has dimensions (rank
/// deficient: FID is then biased and unstable), or None.
pub fn few_images_warning(what: &Path, count: usize, dims: i64) -> Option<String> {
    (count < 2 * dims as usize).then(|| {
        format!(
            "warning: {} has {count} images, fewer than 2 x {dims} (--dims); FID from so few samples is unreliable (biased upward, its covariance rank-deficient): reported anyway",
            what.display()
        )
    })
}

/// The metrics `sdkd eval --metrics` and `validation.eval.metrics` compute; each is one arm of
/// `protocol::Scorer::score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    Fid,
    Is,
    Clip,
}

impl Metric {
    /// Whether it runs the Inception network.
    pub fn needs_inception(self) -> bool {
        matches!(self, Metric::Fid | Metric::Is)
    }
}

/// Per-image Inception outputs of a generation run, so a resumed or re-scored run computes only
/// the new images': `<root>/<weights stem>-<sha256 prefix>/<image folder>/<frontend>-<dims>/<image stem>.safetensors`
/// (float32 `pool` and, with dims 2048, `logits`). Keyed by the weights file's content, so another
/// Inception file never mixes in.
pub struct FeatureCache {
    dir: PathBuf,
}

impl FeatureCache {
    pub fn new(root: &Path, weights: &Path) -> Result<Self> {
        use sha2::{Digest, Sha256};
        use std::io::Read;
        let mut file = std::fs::File::open(weights).with_context(|| format!("reading {}", weights.display()))?;
        let (mut hasher, mut buf) = (Sha256::new(), vec![0u8; 1 << 20]);
        loop {
            let n = file.read(&mut buf).with_context(|| format!("reading {}", weights.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hex: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let stem = weights.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(FeatureCache { dir: root.join(format!("{stem}-{hex}")) })
    }

    fn file(&self, frontend: Frontend, dims: i64, image: &Path) -> PathBuf {
        let front = match frontend {
            Frontend::PytorchFid => "pytorch-fid",
            Frontend::TorchFidelity => "torch-fidelity",
        };
        let name = |p: Option<&std::ffi::OsStr>| p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let (folder, stem) = (name(image.parent().and_then(Path::file_name)), name(image.file_stem()));
        self.dir.join(folder).join(format!("{front}-{dims}")).join(format!("{stem}.safetensors"))
    }
}

/// `features`, reading the images `cache` holds and adding the others to it.
pub fn features_cached(
    net: &InceptionV3,
    paths: &[PathBuf],
    frontend: Frontend,
    dims: i64,
    batch_size: usize,
    cache: Option<&FeatureCache>,
) -> Result<(Tensor, Option<Tensor>)> {
    let Some(cache) = cache else { return features(net, paths, frontend, dims, batch_size) };
    let mut rows: Vec<Option<(Tensor, Option<Tensor>)>> = vec![];
    for p in paths {
        let file = cache.file(frontend, dims, p);
        rows.push(match file.is_file() {
            true => {
                let t: std::collections::HashMap<String, Tensor> = crate::models::weights::read_all(&file)
                    .with_context(|| format!("reading the cached features {} (delete it to recompute)", file.display()))?
                    .into_iter()
                    .collect();
                let pool = t.get("pool").with_context(|| format!("{}: no `pool` tensor (delete it to recompute)", file.display()))?;
                Some((pool.shallow_clone(), t.get("logits").map(Tensor::shallow_clone)))
            }
            false => None,
        });
    }
    let missing: Vec<usize> = (0..paths.len()).filter(|&i| rows[i].is_none()).collect();
    if !missing.is_empty() {
        let todo: Vec<PathBuf> = missing.iter().map(|&i| paths[i].clone()).collect();
        let (pool, logits) = features(net, &todo, frontend, dims, batch_size)?;
        for (j, &i) in missing.iter().enumerate() {
            let row = (pool.get(j as i64), logits.as_ref().map(|l| l.get(j as i64).to_kind(Kind::Float)));
            let mut named = vec![("pool".to_string(), row.0.shallow_clone())];
            named.extend(row.1.as_ref().map(|l| ("logits".to_string(), l.shallow_clone())));
            let file = cache.file(frontend, dims, &paths[i]);
            std::fs::create_dir_all(file.parent().expect("cache files are in folders"))?;
            crate::fs_safe::write_file_with(&file, |tmp| crate::models::weights::save(tmp, &named, Some(Kind::Float)))?;
            rows[i] = Some(row);
        }
    }
    let rows: Vec<(Tensor, Option<Tensor>)> = rows.into_iter().map(|r| r.expect("every row read or computed")).collect();
    let pool = Tensor::stack(&rows.iter().map(|r| &r.0).collect::<Vec<_>>(), 0);
    let logits = rows.iter().map(|r| r.1.as_ref()).collect::<Option<Vec<_>>>().map(|l| Tensor::stack(&l, 0));
    Ok((pool, logits))
}
