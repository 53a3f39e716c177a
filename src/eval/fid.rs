//! Fréchet Inception Distance as pytorch-fid computes it: the mean and covariance of the
//! Inception features of two image sets (or pytorch-fid `.npz` files holding `mu` and `sigma`),
//! then ‖μ₁ - μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr √(Σ₁Σ₂).
//!
//! Statistics are float64, as pytorch-fid's (it stores the float32 features in a float64 array). The trace of the matrix square root is computed without scipy's
//! `sqrtm` (a Schur method on the non-symmetric product): Σ₁Σ₂ is similar to the symmetric
//! positive semi-definite √Σ₁ Σ₂ √Σ₁, so tr √(Σ₁Σ₂) is the sum of the square roots of that
//! matrix's eigenvalues, found with LibTorch's `eigh` in float64 (negative round-off eigenvalues
//! clamped to 0). docs/eval.md gives the measured agreement with scipy.
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// The mean (dims) and covariance (dims × dims) of a set of features, float64.
pub struct Stats {
    pub mu: Tensor,
    pub sigma: Tensor,
    /// How many images the statistics came from (None when read from an `.npz`).
    pub count: Option<usize>,
}

impl Stats {
    /// `np.mean(act, axis=0)` and `np.cov(act, rowvar=False)` (N - 1 normalisation) of (N, dims).
    pub fn from_features(features: &Tensor) -> Result<Stats> {
        let n = features.size()[0];
        if n < 2 {
            bail!("FID statistics need at least 2 images, got {n}");
        }
        let x = features.to_kind(Kind::Double);
        let mu = x.mean_dim(0, false, Kind::Double);
        let centred = &x - mu.unsqueeze(0);
        let sigma = centred.tr().mm(&centred) / (n - 1) as f64;
        Ok(Stats { mu, sigma, count: Some(n as usize) })
    }

    pub fn dims(&self) -> i64 {
        self.mu.size()[0]
    }

    /// Reads pytorch-fid's `.npz` (`mu`, `sigma`; compressed or not).
    pub fn read_npz(path: &Path) -> Result<Stats> {
        let arrays = Tensor::read_npz(path).with_context(|| format!("reading FID statistics {}", path.display()))?;
        let get = |name: &str| {
            arrays
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.to_kind(Kind::Double))
                .with_context(|| format!("{} has no {name:?} array (pytorch-fid's .npz holds mu and sigma)", path.display()))
        };
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        let d = mu.size();
        if d.len() != 1 || sigma.size() != [d[0], d[0]] {
            bail!("{}: mu has shape {:?} and sigma {:?}; expected (d,) and (d, d)", path.display(), mu.size(), sigma.size());
        }
        Ok(Stats { mu, sigma, count: None })
    }

    /// Writes them as pytorch-fid's `--save-stats` does (float64 `mu` and `sigma`), to a temp
    /// file renamed into place: complete or absent.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        crate::fs_safe::write_file_with(path, |tmp| Ok(Tensor::write_npz(&[("mu", &self.mu), ("sigma", &self.sigma)], tmp)?))
            .with_context(|| format!("writing FID statistics {}", path.display()))
    }
}

/// tr √(Σ₁Σ₂) through the symmetric form √Σ₁ Σ₂ √Σ₁ (see the module comment).
pub fn trace_sqrt_product(sigma1: &Tensor, sigma2: &Tensor) -> f64 {
    let (l1, v1) = sigma1.linalg_eigh("L");
    let root1 = (&v1 * l1.clamp_min(0.0).sqrt().unsqueeze(0)).mm(&v1.tr());
    let m = root1.mm(sigma2).mm(&root1);
    let m = (&m + m.tr()) / 2.0;
    m.linalg_eigvalsh("L").clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[])
}

/// The Fréchet distance of two Gaussians.
pub fn frechet_distance(a: &Stats, b: &Stats) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("the two statistics have {} and {} dimensions (different --dims?)", a.dims(), b.dims());
    }
    let diff = &a.mu - &b.mu;
    let d2 = diff.dot(&diff).double_value(&[]);
    let tr = a.sigma.trace().double_value(&[]) + b.sigma.trace().double_value(&[]);
    Ok(d2 + tr - 2.0 * trace_sqrt_product(&a.sigma, &b.sigma))
}
