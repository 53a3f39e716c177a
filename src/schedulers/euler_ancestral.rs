//! Euler ancestral (k-diffusion's `sample_euler_ancestral`, η = 1), as diffusers'
//! `EulerAncestralDiscreteScheduler`: an Euler step down to σ_down, then fresh noise of std σ_up,
//! drawn on every step (also the last, where σ_up = 0) so the generator advances as diffusers'.
use super::config::{FinalSigmas, PredictionType};
use super::euler::{euler_sigmas, predict_x0, scale_by_sigma, SigmaSteps};
use super::f32x;
use super::{check_step_order, div, randn, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct EulerAncestral {
    steps: SigmaSteps,
    prediction_type: PredictionType,
    next_step: usize,
}

impl EulerAncestral {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        // no Karras option and always a zero final σ in diffusers' class
        let steps = euler_sigmas(&schedule, num_inference_steps, false, FinalSigmas::Zero);
        Ok(EulerAncestral { steps, prediction_type: schedule.config().prediction_type, next_step: 0 })
    }
}

impl Sampler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
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

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        check_step_order(SchedulerKind::EulerAncestral, self.next_step, step_index, self.steps.timesteps.len());
        self.next_step += 1;
        let kind = sample.kind();
        let mo = model_output.to_kind(Kind::Float);
        let x = sample.to_kind(Kind::Float);
        let sigma = self.steps.sigmas[step_index];
        let x0 = predict_x0(self.prediction_type, &mo, &x, sigma);
        let (from, to) = (sigma, self.steps.sigmas[step_index + 1]);
        let sigma_up = f32x::sqrt(to * to * (from * from - to * to) / (from * from));
        let sigma_down = f32x::sqrt(to * to - sigma_up * sigma_up);
        let derivative = div(&(&x - x0), sigma);
        let prev = &x + scale(&derivative, sigma_down - sigma);
        let noise = randn(&model_output.size(), model_output.kind(), model_output.device()).to_kind(Kind::Float);
        (prev + scale(&noise, sigma_up)).to_kind(kind)
    }
}
