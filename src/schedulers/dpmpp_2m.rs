//! DPM-Solver++ multistep (Lu et al. 2022), data prediction, as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type = dpmsolver++`: order 2 with the midpoint
//! rule by default (heun and orders 1 and 3 too), a lower-order start, a first-order final step
//! when the final σ is zero or `lower_order_final` with fewer than 15 steps, optional Karras σs.
use super::config::{BetaSchedule, FinalSigmas, PredictionType, SolverType, TimestepSpacing};
use super::f32x;
use super::timesteps::{interp, karras_sigmas, log_sigmas, sigma_to_t, spaced_timesteps, Recipe};
use super::{check_step_order, div, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Timesteps and n + 1 float32 σs of a multistep solver (shared with UniPC, whose rules differ
/// only in the Karras case).
pub(crate) struct MultistepSigmas {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
}

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
        let n = num_inference_steps;
        let table = schedule.sigmas();
        let spacing = c.spacing_or(TimestepSpacing::Linspace);
        let mut timesteps =
            spaced_timesteps(Recipe::Multistep, spacing, schedule.num_train_timesteps(), n, c.steps_offset);
        let mut sigmas: Vec<f64>;
        if c.use_karras_sigmas {
            let logs = log_sigmas(table);
            let sigma_min = c.sigma_min.unwrap_or(table[0]);
            let sigma_max = c.sigma_max.unwrap_or(table[table.len() - 1]);
            sigmas = karras_sigmas(sigma_min, sigma_max, n);
            // rounded, except for the cosine schedule where diffusers only truncates to int64
            let round = c.beta_schedule != BetaSchedule::SquaredcosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &logs);
                    (if round { t.round_ties_even() } else { t }).trunc()
                })
                .collect();
        } else {
            sigmas = timesteps.iter().map(|&t| interp(t, table)).collect();
        }
        sigmas.push(match c.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => table[0],
        });
        let solver_type = c.solver_type.unwrap_or(SolverType::Midpoint);
        Ok(DpmSolverPP {
            steps: MultistepSigmas { timesteps, sigmas: sigmas.iter().map(|&s| s as f32).collect() },
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

    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        let n = self.steps.timesteps.len();
        check_step_order(SchedulerKind::Dpmpp2m, self.state.next_step, step_index, n);
        self.state.next_step += 1;
        let i = step_index;
        let lower_order_final =
            i == n - 1 && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let lower_order_second = i + 2 == n && self.lower_order_final && n < 15;
        let kind = sample.kind();
        let mo = model_output.to_kind(Kind::Float);
        let x = sample.to_kind(Kind::Float);

        // data prediction x0 at σ_i
        let (alpha_t, sigma_t) = f32x::alpha_sigma(self.steps.sigmas[i]);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => div(&(&x - scale(&mo, sigma_t)), alpha_t),
            PredictionType::Sample => mo.shallow_clone(),
            PredictionType::VPrediction => scale(&x, alpha_t) - scale(&mo, sigma_t),
        };
        let history = &mut self.state.model_outputs;
        if history.len() == self.solver_order {
            drop(history.remove(0));
        }
        history.push(x0.shallow_clone());

        let nums = self.state.lower_order_nums;
        let prev = if self.solver_order == 1 || nums < 1 || lower_order_final {
            self.first_order(i, &x, &x0)
        } else if self.solver_order == 2 || nums < 2 || lower_order_second {
            self.second_order(i, &x)
        } else {
            self.third_order(i, &x)
        };
        if self.state.lower_order_nums < self.solver_order {
            self.state.lower_order_nums += 1;
        }
        prev.to_kind(kind)
    }
}
