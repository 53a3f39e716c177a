//! Image-quality metrics by the protocol distillation papers report (BK-SDM): FID (pytorch-fid),
//! Inception Score (torch-fidelity), both on the TF-ported Inception-v3 read from its published
//! `.pth` file. docs/eval.md gives the protocol and the measured agreement.
pub mod clip_score;
pub mod fid;
pub mod inception;
pub mod inception_score;

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
