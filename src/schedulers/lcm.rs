//! The latent consistency model sampler (Luo et al. 2023, "Latent Consistency Models"), as
//! diffusers' `LCMScheduler`: a few-step sampler for UNets distilled by latent consistency
//! distillation (LCD) or carrying an LCM-LoRA.
//!
//! Timesteps come from the distillation's skipping-step grid: with `k = T / original_inference_steps`
//! (integer division; 20 for T = 1000 and the default 50) the grid is k-1, 2k-1, ..., T-1 (19,
//! 39, ..., 999), and n steps take the grid points at `floor(linspace(0, 50, n, endpoint=False))`
//! counted from the top: 4 steps give [999, 759, 499, 259]. A custom descending list
//! (diffusers' `timesteps=`) replaces them.
//!
//! Each step predicts x0 from the model output, applies the consistency model's boundary
//! condition `denoised = c_out·x0 + c_skip·x` with `c_skip = σd² / ((s·t)² + σd²)`,
//! `c_out = s·t / sqrt((s·t)² + σd²)` (σd = 0.5, s = `timestep_scaling`, 10 by default), and
//! re-noises `denoised` to the next timestep with fresh noise from the same generator as the
//! initial latents; the last step returns `denoised` itself.
//!
//! The float32 arithmetic is diffusers': `c_skip` and `c_out` are 0-dim float32 tensor results of
//! the integer timestep times the scaling (so LibTorch computes them here too), the rest is
//! `alphas_cumprod`'s float32 values. `LCMScheduler`'s constructor defaults to SD's
//! scaled_linear betas (0.00085 to 0.012) where the other classes default to linear (0.0001 to
//! 0.02): a config without beta keys gets LCM's own (diffusers' `from_config` fills missing keys
//! with the target class's defaults). `steps_offset`, `timestep_spacing` and `set_alpha_to_one`
//! are read by diffusers' class but change nothing for timesteps inside 0..T, which are the only
//! ones sdkd accepts. `strength` (image to image) is not implemented: sdkd has no image-to-image
//! pipeline.
use super::config::{BetaSchedule, PredictionType, SchedulerConfig};
use super::f32x;
use super::{div, randn, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::{bail, Result};
use std::sync::Arc;
use tch::{Kind, Tensor};

/// σ_data of the boundary condition (diffusers' `sigma_data`, the LCM paper's 0.5).
const SIGMA_DATA: f64 = 0.5;

/// (c_skip, c_out) at integer timesteps `t` (any shape; the training step's are one per sample),
/// as diffusers' `get_scalings_for_boundary_condition_discrete` and the LCD script's
/// `scalings_for_boundary_conditions` compute them from an int64 tensor: float32 results of
/// LibTorch's kernels (`0.25 / x` is Python's `x.reciprocal() * 0.25`, `x ** 0.5` its sqrt).
pub fn boundary_scalings(t: &Tensor, timestep_scaling: f64) -> (Tensor, Tensor) {
    let scaled = t * timestep_scaling; // int64 × float: float32
    let denom = scaled.pow_tensor_scalar(2) + SIGMA_DATA * SIGMA_DATA;
    let c_skip = denom.reciprocal() * (SIGMA_DATA * SIGMA_DATA);
    let c_out = &scaled / denom.pow_tensor_scalar(0.5);
    (c_skip, c_out)
}

pub struct Lcm {
    schedule: Arc<NoiseSchedule>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    clip: Option<f32>,
    timestep_scaling: f64,
    next_step: usize,
}

/// The skipping-step grid of the distillation, ascending: k-1, 2k-1, ..., original·k - 1.
fn origin_grid(num_train_timesteps: usize, original_inference_steps: usize) -> Vec<i64> {
    let k = (num_train_timesteps / original_inference_steps) as i64;
    (1..=original_inference_steps as i64).map(|i| i * k - 1).collect()
}

/// diffusers' `set_timesteps(n)` without `strength`: n grid points taken from the top.
pub fn lcm_timesteps(num_train_timesteps: usize, original_inference_steps: usize, n: usize) -> Result<Vec<i64>> {
    if original_inference_steps == 0 || original_inference_steps > num_train_timesteps {
        bail!(
            "key \"original_inference_steps\": {original_inference_steps} is out of range (1 to num_train_timesteps = {num_train_timesteps})"
        );
    }
    if n == 0 || n > original_inference_steps {
        bail!(
            "lcm: {n} inference steps is out of range (1 to the scheduler config's original_inference_steps = {original_inference_steps}: the steps are a subset of the distillation's {original_inference_steps}-point grid)"
        );
    }
    let mut grid = origin_grid(num_train_timesteps, original_inference_steps);
    grid.reverse();
    // np.floor(np.linspace(0, len, n, endpoint=False)): i · (len / n) in f64
    let step = grid.len() as f64 / n as f64;
    Ok((0..n).map(|i| grid[(i as f64 * step).floor() as usize]).collect())
}

/// The config with LCMScheduler's constructor defaults where the file names no betas.
fn with_lcm_betas(c: &SchedulerConfig) -> Option<SchedulerConfig> {
    let raw = c.raw();
    let absent = ["beta_start", "beta_end", "beta_schedule"].iter().any(|k| !raw.contains_key(*k));
    if c.trained_betas.is_some() || !absent {
        return None;
    }
    let mut lcm = c.clone();
    if !raw.contains_key("beta_start") {
        lcm.beta_start = 0.00085;
    }
    if !raw.contains_key("beta_end") {
        lcm.beta_end = 0.012;
    }
    if !raw.contains_key("beta_schedule") {
        lcm.beta_schedule = BetaSchedule::ScaledLinear;
    }
    Some(lcm)
}

impl Lcm {
    /// `num_inference_steps` steps on the config's `original_inference_steps` grid.
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        let ts = lcm_timesteps(schedule.num_train_timesteps(), c.original_inference_steps, num_inference_steps)?;
        Self::with_timesteps(schedule, &ts)
    }

    /// diffusers' `set_timesteps(timesteps=...)`: any strictly descending list inside 0..T. Points
    /// off the distillation grid, or more of them than `original_inference_steps`, are allowed
    /// (diffusers only warns).
    pub fn with_timesteps(schedule: Arc<NoiseSchedule>, timesteps: &[i64]) -> Result<Self> {
        let t_max = schedule.num_train_timesteps() as i64;
        if timesteps.is_empty() {
            bail!("lcm: timesteps: the list is empty");
        }
        if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
            bail!("lcm: timesteps {timesteps:?}: must be strictly descending ({} is followed by {})", w[0], w[1]);
        }
        if let Some(t) = timesteps.iter().find(|&&t| !(0..t_max).contains(&t)) {
            bail!("lcm: timesteps {timesteps:?}: {t} is outside 0 to num_train_timesteps - 1 = {}", t_max - 1);
        }
        let c = schedule.config();
        let schedule = match with_lcm_betas(c) {
            Some(lcm) => Arc::new(NoiseSchedule::new(lcm)?),
            None => schedule,
        };
        let c = schedule.config();
        Ok(Lcm {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            prediction_type: c.prediction_type,
            clip: c.clip_sample.unwrap_or(false).then_some(c.clip_sample_range as f32),
            timestep_scaling: c.timestep_scaling,
            schedule,
            next_step: 0,
        })
    }

    /// (c_skip, c_out) at integer timestep `t` (`boundary_scalings` of a 0-dim tensor).
    pub fn boundary_scalings(t: i64, timestep_scaling: f64) -> (f32, f32) {
        let (c_skip, c_out) = boundary_scalings(&Tensor::from(t), timestep_scaling);
        (c_skip.double_value(&[]) as f32, c_out.double_value(&[]) as f32)
    }
}

impl Sampler for Lcm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Lcm
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, noise_kind: Kind) -> Tensor {
        let ac = self.schedule.alphas_cumprod();
        let t = self.timesteps[step_index] as i64;
        let last = step_index + 1 == self.timesteps.len();
        let a_t = ac[t as usize] as f32;
        let beta_t = 1.0 - a_t;
        let (c_skip, c_out) = Lcm::boundary_scalings(t, self.timestep_scaling);

        let mut x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(x - scale(mo, f32x::sqrt(beta_t))), f32x::sqrt(a_t)),
            PredictionType::Sample => mo.shallow_clone(),
            PredictionType::VPrediction => scale(x, f32x::sqrt(a_t)) - scale(mo, f32x::sqrt(beta_t)),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-(r as f64), r as f64);
        }
        let denoised = scale(&x0, c_out) + scale(x, c_skip);
        if last {
            return denoised;
        }
        // re-noised to the next timestep with a fresh draw (in the model output's dtype, as
        // diffusers draws it in `denoised`'s)
        let a_prev = ac[self.timesteps[step_index + 1] as usize] as f32;
        let noise = randn(&mo.size(), noise_kind, mo.device()).to_kind(Kind::Float);
        scale(&denoised, f32x::sqrt(a_prev)) + scale(&noise, f32x::sqrt(1.0 - a_prev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_on_the_skipping_grid() {
        let ts = |n| lcm_timesteps(1000, 50, n).unwrap();
        assert_eq!(ts(1), [999]);
        assert_eq!(ts(2), [999, 499]);
        assert_eq!(ts(4), [999, 759, 499, 259]);
        assert_eq!(ts(8), [999, 879, 759, 639, 499, 379, 259, 139]);
        assert_eq!(ts(50).last(), Some(&19));
        let e = lcm_timesteps(1000, 50, 51).unwrap_err().to_string();
        assert!(e.contains("51") && e.contains("original_inference_steps"), "{e}");
        let e = lcm_timesteps(1000, 0, 4).unwrap_err().to_string();
        assert!(e.contains("original_inference_steps"), "{e}");
    }

    #[test]
    fn boundary_scalings_at_the_ends() {
        assert_eq!(Lcm::boundary_scalings(0, 10.0), (1.0, 0.0));
        let (skip, out) = Lcm::boundary_scalings(19, 10.0);
        assert!((skip - 6.9e-6).abs() < 1e-7 && (out - 0.9999965).abs() < 1e-6, "{skip} {out}");
    }
}
