//! DDIM (Song et al. 2020), deterministic (η = 0, the Stable Diffusion pipelines' default).
//!
//! As diffusers' `DDIMScheduler`: the "previous" timestep is always t - T/n (integer division),
//! even when the spacing (linspace, trailing) puts the next listed timestep elsewhere, and the
//! last step goes to ᾱ = 1 when `set_alpha_to_one` (default) or to ᾱ_0 otherwise. Default spacing
//! `leading`, `clip_sample` on unless the config says otherwise.
use super::config::PredictionType;
use super::timesteps::integer_timesteps;
use super::{div, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use super::f32x;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct Ddim {
    schedule: Arc<NoiseSchedule>,
    timesteps: Vec<f64>,
    /// T / n: how far back each step jumps.
    step_ratio: i64,
    final_alpha_cumprod: f32,
    prediction_type: PredictionType,
    clip: Option<f32>,
    next_step: usize,
}

impl Ddim {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        let n_train = schedule.num_train_timesteps();
        let timesteps = integer_timesteps(&schedule, num_inference_steps, SchedulerKind::Ddim)?;
        let final_alpha_cumprod =
            if c.set_alpha_to_one.unwrap_or(true) { 1.0 } else { schedule.alphas_cumprod()[0] as f32 };
        Ok(Ddim {
            timesteps,
            step_ratio: (n_train / num_inference_steps) as i64,
            final_alpha_cumprod,
            prediction_type: c.prediction_type,
            clip: c.clip_sample.unwrap_or(true).then_some(c.clip_sample_range as f32),
            schedule,
            next_step: 0,
        })
    }
}

impl Sampler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, _noise_kind: Kind) -> Tensor {
        let ac = self.schedule.alphas_cumprod();
        let t = self.timesteps[step_index] as i64;
        let prev_t = t - self.step_ratio;
        let a_t = ac[t as usize] as f32;
        let a_prev = if prev_t >= 0 { ac[prev_t as usize] as f32 } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - a_t;

        let (mut x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (div(&(x - scale(mo, f32x::sqrt(beta_t))), f32x::sqrt(a_t)), mo.shallow_clone()),
            PredictionType::Sample => {
                let eps = div(&(x - scale(mo, f32x::sqrt(a_t))), f32x::sqrt(beta_t));
                (mo.shallow_clone(), eps)
            }
            PredictionType::VPrediction => {
                (scale(x, f32x::sqrt(a_t)) - scale(mo, f32x::sqrt(beta_t)), scale(mo, f32x::sqrt(a_t)) + scale(x, f32x::sqrt(beta_t)))
            }
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-(r as f64), r as f64);
        }
        // η = 0: σ_t = 0, so the direction term is sqrt(1 - ᾱ_prev)·ε
        let dir = scale(&eps, f32x::sqrt(1.0 - a_prev - 0.0f32));
        scale(&x0, f32x::sqrt(a_prev)) + dir
    }
}
