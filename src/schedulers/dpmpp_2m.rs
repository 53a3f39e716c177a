//! DPM-Solver++ multistep (Lu et al. 2022), data prediction, as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = dpmsolver++`: order 2 with the midpoint
//! rule by default (heun and orders 1 and 3 too), a lower-order start, a first-order final step
//! when the final σ is zero or `lower_order_final` with fewer than 15 steps, optional Karras σs.
use super::config::{BetaSchedule, FinalSigmas, PredictionType, SolverType};
use super::f32x;
use super::timesteps::{multistep_sigmas, MultistepSigmas};
use super::{div, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct DpmSolverPP {
    steps: MultistepSigmas,
    prediction_type: PredictionType,
    solver_order: usize,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    state: History,
}

/// What a multistep run remembers between steps.
#[derive(Default)]
struct History {
    /// Converted (x0) model outputs of the latest steps, oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    next_step: usize,
}

impl DpmSolverPP {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        // with Karras σs, rounded but for the cosine schedule, where diffusers only truncates to int64
        let round = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let steps = multistep_sigmas(&schedule, num_inference_steps, round, false);
        let solver_type = c.solver_type.unwrap_or(SolverType::Midpoint);
        Ok(DpmSolverPP {
            steps,
            prediction_type: c.prediction_type,
            solver_order: c.solver_order,
            heun: solver_type == SolverType::Heun,
            lower_order_final: c.lower_order_final,
            euler_at_final: c.euler_at_final,
            final_sigma_zero: c.final_sigmas_type == FinalSigmas::Zero,
            state: History::default(),
        })
    }

    /// (α, σ_t, λ) at σ index i.
    fn at(&self, i: usize) -> (f32, f32, f32) {
        let (a, s) = f32x::alpha_sigma(self.steps.sigmas[i]);
        (a, s, f32x::lambda(a, s))
    }

    fn first_order(&self, i: usize, x: &Tensor, m0: &Tensor) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.at(i + 1);
        let (_, sigma_s, lambda_s) = self.at(i);
        let h = lambda_t - lambda_s;
        scale(x, sigma_t / sigma_s) - scale(m0, alpha_t * (f32x::exp(-h) - 1.0))
    }

    fn second_order(&self, i: usize, x: &Tensor) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.at(i + 1);
        let (_, sigma_s0, lambda_s0) = self.at(i);
        let (_, _, lambda_s1) = self.at(i - 1);
        let m = &self.state.model_outputs;
        let (m0, m1) = (&m[m.len() - 1], &m[m.len() - 2]);
        let (h, h0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h0 / h;
        let d1 = scale(&(m0 - m1), 1.0 / r0);
        let e = f32x::exp(-h) - 1.0;
        let base = scale(x, sigma_t / sigma_s0) - scale(m0, alpha_t * e);
        if self.heun {
            base + scale(&d1, alpha_t * (e / h + 1.0))
        } else {
            base - scale(&d1, 0.5 * (alpha_t * e))
        }
    }

    fn third_order(&self, i: usize, x: &Tensor) -> Tensor {
        let (alpha_t, sigma_t, lambda_t) = self.at(i + 1);
        let (_, sigma_s0, lambda_s0) = self.at(i);
        let (_, _, lambda_s1) = self.at(i - 1);
        let (_, _, lambda_s2) = self.at(i - 2);
        let m = &self.state.model_outputs;
        let (m0, m1, m2) = (&m[m.len() - 1], &m[m.len() - 2], &m[m.len() - 3]);
        let (h, h0, h1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = scale(&(m0 - m1), 1.0 / r0);
        let d1_1 = scale(&(m1 - m2), 1.0 / r1);
        let d1 = &d1_0 + scale(&(&d1_0 - &d1_1), r0 / (r0 + r1));
        let d2 = scale(&(&d1_0 - &d1_1), 1.0 / (r0 + r1));
        let e = f32x::exp(-h) - 1.0;
        scale(x, sigma_t / sigma_s0) - scale(m0, alpha_t * e) + scale(&d1, alpha_t * (e / h + 1.0))
            - scale(&d2, alpha_t * ((e + h) / (h * h) - 0.5))
    }
}

impl Sampler for DpmSolverPP {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Dpmpp2m
    }

    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.state.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, _noise_kind: Kind) -> Tensor {
        let n = self.steps.timesteps.len();
        let i = step_index;
        let lower_order_final =
            i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;

        // data prediction x0 at σ_i
        let (alpha_t, sigma_t) = f32x::alpha_sigma(self.steps.sigmas[i]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(x - scale(mo, sigma_t)), alpha_t),
            PredictionType::Sample => mo.shallow_clone(),
            PredictionType::VPrediction => scale(x, alpha_t) - scale(mo, sigma_t),
        };
        let history = &mut self.state.model_outputs;
        if history.len() == self.solver_order {
            drop(history.remove(0));
        }
        history.push(x0.shallow_clone());

        let nums = self.state.lower_order_nums;
        let prev = if self.solver_order == 1 || nums < 1 || lower_order_final {
            self.first_order(i, x, &x0)
        } else if self.solver_order == 2 || nums < 2 || lower_order_second {
            self.second_order(i, x)
        } else {
            self.third_order(i, x)
        };
        if self.state.lower_order_nums < self.solver_order {
            self.state.lower_order_nums += 1;
        }
        prev
    }
}
