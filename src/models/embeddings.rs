//! Sinusoidal timestep features and the time-embedding MLP (diffusers' `Timesteps` and
//! `TimestepEmbedding`).
use super::layers::{Builder, Linear};
use tch::{Kind, Tensor};

/// diffusers' `get_timestep_embedding`: `timesteps` (b,) of any numeric kind -> (b, dim) fp32.
pub fn timestep_embedding(timesteps: &Tensor, dim: i64, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64).ln());
    let freqs = (exponent / (half as f64 - freq_shift)).exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0); // (b, half)
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[args.cos(), args.sin()], -1)
    } else {
        Tensor::cat(&[args.sin(), args.cos()], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// diffusers' `get_guidance_scale_embedding` (Latent Consistency Models' w embedding, after VDM):
/// `w` (b,) -> (b, dim) fp32, sin | cos of `1000·w` over `dim / 2` log-spaced frequencies, in
/// diffusers' float32 order of operations. A `time_cond_proj_dim` UNet adds its projection to
/// the timestep features.
pub fn guidance_scale_embedding(w: &Tensor, dim: i64) -> Tensor {
    let w = w.to_kind(Kind::Float) * 1000.0;
    let half = dim / 2;
    let step = Tensor::from(10000f32).log() / (half - 1) as f64;
    let freqs = (Tensor::arange(half, (Kind::Float, w.device())) * -step.to_device(w.device())).exp();
    let args = w.view([-1, 1]) * freqs.unsqueeze(0); // (b, half)
    let emb = Tensor::cat(&[args.sin(), args.cos()], 1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    /// `time_cond_proj_dim` UNets (LCM's guidance embedding): a bias-free projection of the
    /// condition added to the input.
    cond_proj: Option<Linear>,
}

impl TimestepEmbedding {
    pub fn new(b: Builder, in_dim: i64, time_embed_dim: i64, cond_proj_dim: Option<i64>) -> Self {
        TimestepEmbedding {
            linear_1: Linear::new(b.pp("linear_1"), in_dim, time_embed_dim, true),
            linear_2: Linear::new(b.pp("linear_2"), time_embed_dim, time_embed_dim, true),
            cond_proj: cond_proj_dim.map(|d| Linear::new(b.pp("cond_proj"), d, in_dim, false)),
        }
    }

    /// `condition` is ignored without a `cond_proj`, as in diffusers.
    pub fn forward(&self, x: &Tensor, condition: Option<&Tensor>) -> Tensor {
        let x = match (&self.cond_proj, condition) {
            (Some(proj), Some(c)) => x + proj.forward(c),
            _ => x.shallow_clone(),
        };
        self.linear_2.forward(&self.linear_1.forward(&x).silu())
    }
}
