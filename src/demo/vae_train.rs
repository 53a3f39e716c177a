//! Trains the demo's small VAE on the synthetic images: reconstruction MSE of a posterior sample,
//! with the shapes' pixels weighted up, plus a tiny KL term (which keeps the posterior a
//! distribution, so the decoder tolerates the noise that sampled latents carry), AdamW with a
//! short warmup and a cosine decay. Flat-colour shapes are easy to reconstruct, so a minute or
//! two on two cores is enough.
//!
//! Everything is a function of the seed: the init (`tch::manual_seed`), the batch order
//! (`data::order::permutation`) and the posterior noise.
use crate::data::{open_image_rows, DataOptions};
use crate::data::order::permutation;
use crate::data::transform::to_tensor;
use crate::distill::optim::{AdamW, AdamWConfig};
use crate::distill::progress::{Progress, ProgressMode};
use crate::models::weights::named_tensors;
use crate::models::Vae;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How the VAE is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainOptions {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine to `lr / 20`.
    pub lr: f64,
    pub warmup_steps: usize,
    /// Weight of the KL term, which is averaged over latent elements like the MSE over pixels.
    pub kl_weight: f64,
    /// Extra weight of foreground pixels (those unlike the image's median colour) in the
    /// reconstruction term: the shapes cover a few percent of each image, and without it the
    /// VAE spends most of its steps on a background-perfect, shape-blurred stage.
    pub fg_weight: f64,
    pub seed: u64,
    pub progress: ProgressMode,
}

impl Default for VaeTrainOptions {
    fn default() -> Self {
        VaeTrainOptions {
            steps: 1500,
            batch_size: 16,
            lr: 1e-2,
            warmup_steps: 50,
            kl_weight: 1e-6,
            fg_weight: 10.0,
            seed: 0,
            progress: ProgressMode::Hidden,
        }
    }
}

/// What training gave.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainStats {
    pub steps: usize,
    pub seconds: f64,
    /// Mean reconstruction MSE (on [-1, 1] pixels) over the last 10% of steps.
    pub final_mse: f64,
    /// Mean KL per latent element over the last 10% of steps.
    pub final_kl: f64,
}

/// The learning rate of step `step`.
fn lr_at(step: usize, o: &VaeTrainOptions) -> f64 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
    }
    let span = (o.steps - o.warmup_steps).max(1) as f64;
    let progress = (step - o.warmup_steps) as f64 / span;
    let floor = o.lr / 20.0;
    floor + (o.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Reads every image of the dataset at `dir` (an imagefolder or shards; all of one square size)
/// as a (n, 3, r, r) f32 tensor in [-1, 1], with the captions.
pub fn load_images(dir: &Path) -> Result<(Tensor, Vec<String>)> {
    let folder = open_image_rows(&dir.to_string_lossy(), "demo data", &DataOptions::default())?;
    let decoded: Vec<(RgbImage, String)> =
        (0..folder.len()).into_par_iter().map(|i| folder.decode(i).map_err(anyhow::Error::from)).collect::<Result<_>>()?;
    let (w, h) = decoded[0].0.dimensions();
    if w != h {
        bail!("{}: image {} is {w}x{h}, the demo needs square images", dir.display(), folder.key(0));
    }
    let mut pixels = Vec::with_capacity(decoded.len() * (w * h * 3) as usize);
    for (i, (img, _)) in decoded.iter().enumerate() {
        if img.dimensions() != (w, h) {
            let (iw, ih) = img.dimensions();
            bail!("{}: image {} is {iw}x{ih}, the first one is {w}x{h}: the demo needs one size", dir.display(), folder.key(i));
        }
        pixels.extend_from_slice(img.as_raw());
    }
    let captions = decoded.into_iter().map(|(_, c)| c).collect();
    Ok((to_tensor(&pixels, folder.len(), w as usize), captions))
}

/// Trains `vae` in place on `images` ((n, 3, r, r) in [-1, 1]).
pub fn train_vae(vae: &Vae, images: &Tensor, o: &VaeTrainOptions) -> Result<VaeTrainStats> {
    let n = images.size()[0] as usize;
    if n == 0 || o.steps == 0 || o.batch_size == 0 {
        bail!("VAE training needs images, steps and a batch size (got {n} images, {} steps, batch {})", o.steps, o.batch_size);
    }
    let device = vae.vs.device();
    let mut opt = AdamW::new(named_tensors(&vae.vs), AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() })?;
    let mut progress = Progress::new(o.progress, 0, o.steps as u64, 100);
    let started = Instant::now();
    tch::manual_seed(o.seed as i64 ^ 0x5ae);
    let (mut epoch, mut order, mut pos) = (0u64, permutation(o.seed, 0, n), 0usize);
    let tail = (o.steps / 10).max(1);
    let (mut mse_sum, mut kl_sum) = (0.0, 0.0);
    for step in 0..o.steps {
        let mut idx = Vec::with_capacity(o.batch_size);
        while idx.len() < o.batch_size {
            if pos == n {
                epoch += 1;
                order = permutation(o.seed, epoch, n);
                pos = 0;
            }
            idx.push(order[pos] as i64);
            pos += 1;
        }
        let x = images.index_select(0, &Tensor::from_slice(&idx)).to_device(device);
        let post = vae.model.encode(&x);
        let noise = Tensor::randn(post.mean.size(), (Kind::Float, Device::Cpu)).to_device(device);
        let rec = vae.model.decode(&post.sample(&noise));
        let mse = rec.mse_loss(&x, tch::Reduction::Mean);
        let latent_elems = post.mean.numel() as f64;
        let kl = post.kl().sum(Kind::Float) / latent_elems;
        let err = (&rec - &x).square();
        let rec_loss = if o.fg_weight > 0.0 {
            let w = foreground(&x) * o.fg_weight + 1.0; // (b, 1, h, w)
            (err * &w).mean(Kind::Float) / w.mean(Kind::Float)
        } else {
            err.mean(Kind::Float)
        };
        let loss = rec_loss + &kl * o.kl_weight;
        opt.zero_grad();
        loss.backward();
        let lr = lr_at(step, o);
        opt.step(lr).context("VAE training")?;
        let (m, k) = (mse.double_value(&[]), kl.double_value(&[]));
        if !m.is_finite() {
            bail!("VAE training diverged at step {step} (loss {m})");
        }
        if step + tail >= o.steps {
            mse_sum += m;
            kl_sum += k;
        }
        progress.update(step as u64 + 1, m, lr);
    }
    progress.finish();
    Ok(VaeTrainStats { steps: o.steps, seconds: started.elapsed().as_secs_f64(), final_mse: mse_sum / tail as f64, final_kl: kl_sum / tail as f64 })
}

/// 1 where a pixel differs from its image's per-channel median colour (the background of the
/// synthetic scenes) by more than 0.1 in some channel, else 0: (b, 1, h, w).
pub fn foreground(x: &Tensor) -> Tensor {
    let (b, c, _, _) = x.size4().expect("images must be (b, c, h, w)");
    let (median, _) = x.reshape([b, c, -1]).median_dim(2, true); // (b, c, 1)
    (x - median.unsqueeze(-1)).abs().amax([1i64].as_slice(), true).gt(0.1).to_kind(x.kind())
}

/// Applies `f` to `images` in chunks of 64 without gradients, concatenating the results on the CPU.
fn chunked(images: &Tensor, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
    let n = images.size()[0];
    let parts: Vec<Tensor> = (0..n).step_by(64).map(|s| tch::no_grad(|| f(&images.narrow(0, s, (n - s).min(64))).to_device(Device::Cpu))).collect();
    Tensor::cat(&parts, 0)
}

/// decode(encode(x).mode()) of `images`, clamped to [-1, 1].
pub fn reconstruct(vae: &Vae, images: &Tensor) -> Tensor {
    let device = vae.vs.device();
    chunked(images, |x| vae.model.forward(&x.to_device(device)).clamp(-1.0, 1.0))
}

/// PSNR in dB of `rec` against `images` (both in [-1, 1]) on the [0, 1] pixel scale.
pub fn psnr(rec: &Tensor, images: &Tensor) -> f64 {
    let mse01 = (rec - images).square().mean(Kind::Double).double_value(&[]) / 4.0;
    10.0 * (1.0 / mse01.max(1e-12)).log10()
}

/// The standard deviation of posterior samples over `images` (drawn with `seed`): SD sets
/// `scaling_factor` to its inverse so the UNet sees unit-variance latents.
pub fn latent_std(vae: &Vae, images: &Tensor, seed: u64) -> f64 {
    let device = vae.vs.device();
    tch::manual_seed(seed as i64);
    let z = chunked(images, |x| {
        let post = vae.model.encode(&x.to_device(device));
        let noise = Tensor::randn(post.mean.size(), (Kind::Float, Device::Cpu));
        post.sample(&noise)
    });
    z.to_kind(Kind::Double).std(true).double_value(&[])
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_is_what_differs_from_the_median() {
        let x = Tensor::zeros([1, 3, 4, 4], (Kind::Float, Device::Cpu)) - 0.5;
        let _ = x.get(0).get(2).get(1).get(3).fill_(0.9); // one blue-ish pixel
        let fg = foreground(&x);
        assert_eq!(fg.size(), vec![1, 1, 4, 4]);
        assert_eq!(fg.sum(Kind::Float).double_value(&[]), 1.0);
        assert_eq!(fg.double_value(&[0, 0, 1, 3]), 1.0);
    }

    #[test]
    fn lr_warms_up_then_decays() {
        let o = VaeTrainOptions { steps: 100, warmup_steps: 10, lr: 1.0, ..Default::default() };
        assert!((lr_at(0, &o) - 0.1).abs() < 1e-12);
        assert!((lr_at(10, &o) - 1.0).abs() < 1e-12);
        assert!(lr_at(99, &o) < 0.06 && lr_at(99, &o) >= 0.05);
    }

    #[test]
    fn psnr_and_images() {
        let a = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
        let b = a.ones_like() * 0.2; // 0.1 on the [0, 1] scale: 20 dB
        assert!((psnr(&b, &a) - 20.0).abs() < 1e-6);
        // every channel plane is [[-1, 1], [0, -1]]
        let ims = crate::pipeline::to_rgb_images(&Tensor::from_slice(&[-1f32, 1.0, 0.0, -1.0]).view([1, 1, 2, 2]).repeat([1, 3, 1, 1]));
        assert_eq!(ims[0].get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(ims[0].get_pixel(1, 0).0, [255, 255, 255]);
        assert_eq!(ims[0].get_pixel(0, 1).0, [128, 128, 128]);
    }
}
