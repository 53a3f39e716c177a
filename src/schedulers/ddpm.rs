//! DDPM (Ho et al. 2020) ancestral sampling: the posterior mean of x_{t-1} given the predicted x0,
//! plus posterior-variance noise on every step whose timestep is above 0 (diffusers'
//! `DDPMScheduler`, default spacing `leading`, `clip_sample` on unless the config says otherwise).
use super::config::{PredictionType, VarianceType};
use super::f32x;
use super::timesteps::integer_timesteps;
use super::{div, randn, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct Ddpm {
    schedule: Arc<NoiseSchedule>,
    timesteps: Vec<f64>,
    prediction_type: PredictionType,
    clip: Option<f32>,
    variance_type: VarianceType,
    next_step: usize,
}

impl Ddpm {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        let timesteps = integer_timesteps(&schedule, num_inference_steps, SchedulerKind::Ddpm)?;
        Ok(Ddpm {
            timesteps,
            prediction_type: c.prediction_type,
            clip: c.clip_sample.unwrap_or(true).then_some(c.clip_sample_range as f32),
            variance_type: c.variance_type.unwrap_or(VarianceType::FixedSmall),
            schedule,
            next_step: 0,
        })
    }
}

impl Sampler for Ddpm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddpm
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, noise_kind: Kind) -> Tensor {
        let ac = self.schedule.alphas_cumprod();
        let t = self.timesteps[step_index] as usize;
        // the previous timestep is the next one in the list (-1 after the last)
        let a_t = ac[t] as f32;
        let a_prev = self.timesteps.get(step_index + 1).map_or(1.0, |&p| ac[p as usize] as f32);
        let beta_t = 1.0 - a_t;
        let beta_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;

        let mut x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(x - scale(mo, f32x::sqrt(beta_t))), f32x::sqrt(a_t)),
            PredictionType::Sample => mo.shallow_clone(),
            PredictionType::VPrediction => scale(x, f32x::sqrt(a_t)) - scale(mo, f32x::sqrt(beta_t)),
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-(r as f64), r as f64);
        }
        // posterior mean μ̃(x_t, x0)
        let c_x0 = (f32x::sqrt(a_prev) * cur_beta) / beta_t;
        let c_xt = f32x::sqrt(cur_alpha) * beta_prev / beta_t;
        let mut prev = scale(&x0, c_x0) + scale(x, c_xt);
        if t > 0 {
            // drawn in the model output's dtype, like diffusers
            let noise = randn(&mo.size(), noise_kind, mo.device()).to_kind(Kind::Float);
            let var = ((1.0 - a_prev) / (1.0 - a_t) * cur_beta).max(1e-20);
            let std = match self.variance_type {
                VarianceType::FixedSmall => f32x::sqrt(var),
                VarianceType::FixedSmallLog => f32x::exp(0.5 * f32x::ln(var)),
                VarianceType::FixedLarge => f32x::sqrt(cur_beta),
            };
            prev += scale(&noise, std);
        }
        prev
    }
}
