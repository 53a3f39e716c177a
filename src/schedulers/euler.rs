//! Euler's method on the probability-flow ODE in σ (Karras et al. 2022, algorithm 2 without
//! churn), as diffusers' `EulerDiscreteScheduler`: float32 timesteps (fractional with the default
//! linspace spacing), σ interpolated linearly in t, optional Karras σs, last σ zero or σ_min.
//!
//! Euler ancestral (k-diffusion's `sample_euler_ancestral`, η = 1), as diffusers'
//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down, then fresh noise of std σ_up,
//! drawn on every step (also the last, where σ_up = 0) so the generator advances as diffusers'.
use super::config::{FinalSigmas, PredictionType, TimestepSpacing};
use super::timesteps::{interp, karras_sigmas, log_sigmas, sigma_to_t, spaced_timesteps, Recipe};
use super::f32x;
use super::{div, randn, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// σ per step plus the final one, and the timesteps, shared with Euler ancestral.
struct SigmaSteps {
    pub timesteps: Vec<f64>,
    /// n + 1 float32 values.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

/// diffusers' `EulerDiscreteScheduler.set_timesteps` (and, with `karras = false` and a zero final
/// σ, `EulerAncestralDiscreteScheduler`'s).
fn euler_sigmas(schedule: &NoiseSchedule, n: usize, karras: bool, final_sigmas: FinalSigmas) -> SigmaSteps {
    let c = schedule.config();
    let spacing = c.spacing_or(TimestepSpacing::Linspace);
    let table = schedule.sigmas();
    let mut timesteps = spaced_timesteps(Recipe::Float32, spacing, schedule.num_train_timesteps(), n, c.steps_offset);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, table)).collect();
    if karras {
        let logs = log_sigmas(table);
        let sigma_min = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = c.sigma_max.unwrap_or(sigmas[0]);
        sigmas = karras_sigmas(sigma_min, sigma_max, n);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &logs) as f32 as f64).collect();
    }
    let last = match final_sigmas {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => table[0],
    };
    sigmas.push(last);
    let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => f32x::sqrt(max * max + 1.0),
    };
    SigmaSteps { timesteps, sigmas, init_noise_sigma }
}

/// x / sqrt(σ² + 1): the UNet sees unit-variance input.
fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Tensor {
    div(sample, f32x::sqrt(sigma * sigma + 1.0))
}

/// x0 from the model output at σ (float32 tensors).
fn predict_x0(prediction_type: PredictionType, mo: &Tensor, x: &Tensor, sigma: f32) -> Tensor {
    match prediction_type {
        PredictionType::Epsilon => x - scale(mo, sigma),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            scale(mo, -sigma / f32x::sqrt(s2)) + div(x, s2)
        }
        PredictionType::Sample => mo.shallow_clone(),
    }
}

pub struct Euler {
    steps: SigmaSteps,
    prediction_type: PredictionType,
    /// Euler ancestral: noise after each step.
    ancestral: bool,
    next_step: usize,
}

impl Euler {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        let steps = euler_sigmas(&schedule, num_inference_steps, c.use_karras_sigmas, c.final_sigmas_type);
        Ok(Euler { steps, prediction_type: c.prediction_type, ancestral: false, next_step: 0 })
    }

    pub fn ancestral(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        // no Karras option and always a zero final σ in diffusers' class
        let steps = euler_sigmas(&schedule, num_inference_steps, false, FinalSigmas::Zero);
        Ok(Euler { steps, prediction_type: schedule.config().prediction_type, ancestral: true, next_step: 0 })
    }
}

impl Sampler for Euler {
    fn kind(&self) -> SchedulerKind {
        if self.ancestral {
            SchedulerKind::EulerAncestral
        } else {
            SchedulerKind::Euler
        }
    }

    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        self.steps.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Tensor {
        scale_by_sigma(sample, self.steps.sigmas[step_index])
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, noise_kind: Kind) -> Tensor {
        // no churn (γ = 0): σ̂ = σ
        let (from, to) = (self.steps.sigmas[step_index], self.steps.sigmas[step_index + 1]);
        let x0 = predict_x0(self.prediction_type, mo, x, from);
        let derivative = div(&(x - x0), from);
        if !self.ancestral {
            return x + scale(&derivative, to - from);
        }
        let sigma_up = f32x::sqrt(to * to * (from * from - to * to) / (from * from));
        let sigma_down = f32x::sqrt(to * to - sigma_up * sigma_up);
        let prev = x + scale(&derivative, sigma_down - from);
        let noise = randn(&mo.size(), noise_kind, mo.device()).to_kind(Kind::Float);
        prev + scale(&noise, sigma_up)
    }
}
