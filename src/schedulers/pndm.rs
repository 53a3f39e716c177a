//! PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), as
//! diffusers' `PNDMScheduler`: the Stable Diffusion 1.x default and the sampler of BK-SDM's
//! evaluation protocol (25 steps).
//!
//! With `skip_prk_steps` (every SD-1.x config) it is crowsonkb's PLMS: n + 1 UNet calls, the
//! second one re-evaluating the first step with the averaged noise, then linear multistep of
//! orders 2, 3 and 4 on the raw model outputs. Without it (diffusers' constructor default, which
//! a config that does not name the key gets), 12 pseudo-Runge-Kutta calls over the first three
//! steps come first, then 4th-order PLMS. Every step maps x_t to x_{t-δ} with formula (9) of the
//! paper. Default spacing `leading`, `set_alpha_to_one` false.
use super::config::PredictionType;
use super::timesteps::integer_timesteps;
use super::{div, f32x, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::{bail, Result};
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct Pndm {
    schedule: Arc<NoiseSchedule>,
    /// The PRK timesteps (empty with `skip_prk_steps`), then the PLMS ones.
    timesteps: Vec<f64>,
    prk_steps: usize,
    /// T / n: the PLMS step.
    step_ratio: i64,
    final_alpha_cumprod: f32,
    v_prediction: bool,
    /// The last (up to) four raw model outputs of the steps that keep one.
    ets: Vec<Tensor>,
    /// The sample a multi-call step started from (PLMS's second call, each PRK group).
    cur_sample: Option<Tensor>,
    /// The PRK group's weighted model-output sum.
    cur_model_output: Option<Tensor>,
    next_step: usize,
}

impl Pndm {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        let n_train = schedule.num_train_timesteps();
        let n = num_inference_steps;
        // diffusers' `_timesteps`, ascending
        let mut asc = integer_timesteps(&schedule, n, SchedulerKind::Pndm)?;
        asc.reverse();
        let step_ratio = (n_train / n) as i64;
        let (prk, plms): (Vec<f64>, Vec<f64>) = if c.skip_prk_steps {
            // _timesteps[:-1], _timesteps[-2:-1], _timesteps[-1:], reversed: the second-to-last
            // comes twice (the first step's corrector call)
            let mut plms = asc[..n - 1].to_vec();
            if n >= 2 {
                plms.push(asc[n - 2]);
            }
            plms.push(asc[n - 1]);
            plms.reverse();
            (vec![], plms)
        } else {
            if n < 4 {
                bail!("pndm: {n} steps with skip_prk_steps false: the Runge-Kutta warm-up needs at least 4 (diffusers fails too)");
            }
            let half = (n_train / n / 2) as f64;
            let last4 = &asc[n - 4..];
            let pairs: Vec<f64> = last4.iter().flat_map(|&t| [t, t + half]).collect();
            let mut prk: Vec<f64> = pairs[..pairs.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            prk = prk[1..prk.len() - 1].to_vec();
            prk.reverse();
            let plms: Vec<f64> = asc[..n - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let prk_steps = prk.len();
        let final_alpha_cumprod =
            if c.set_alpha_to_one.unwrap_or(false) { 1.0 } else { schedule.alphas_cumprod()[0] as f32 };
        Ok(Pndm {
            timesteps: prk.into_iter().chain(plms).collect(),
            prk_steps,
            step_ratio,
            final_alpha_cumprod,
            v_prediction: c.prediction_type == PredictionType::VPrediction,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
            schedule,
            next_step: 0,
        })
    }

    /// Formula (9): x_{t-δ} from x_t and the (combined) noise estimate, in diffusers' float32 order.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> Tensor {
        let ac = self.schedule.alphas_cumprod();
        let a_t = ac[t as usize] as f32;
        let a_prev = if prev_t >= 0 { ac[prev_t as usize] as f32 } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = if self.v_prediction {
            scale(model_output, f32x::sqrt(a_t)) + scale(sample, f32x::sqrt(b_t))
        } else {
            model_output.shallow_clone()
        };
        let sample_coeff = f32x::sqrt(a_prev / a_t);
        let denom = a_t * f32x::sqrt(b_prev) + f32x::sqrt(a_t * b_t * a_prev);
        scale(sample, sample_coeff) - div(&scale(&eps, a_prev - a_t), denom)
    }

    fn step_prk(&mut self, mo: &Tensor, step_index: usize, x: &Tensor) -> Tensor {
        let counter = step_index;
        let t = self.timesteps[counter] as i64;
        let diff_to_prev = if counter % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[counter / 4 * 4] as i64;
        let add = |acc: &Option<Tensor>, w: f64| -> Tensor {
            let term = mo * w;
            match acc {
                Some(a) => a + term,
                None => term, // diffusers starts from the integer 0: 0 + term is term
            }
        };
        let model_output = match counter % 4 {
            0 => {
                self.cur_model_output = Some(add(&self.cur_model_output, 1.0 / 6.0));
                self.ets.push(mo.shallow_clone());
                self.cur_sample = Some(x.shallow_clone());
                mo.shallow_clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(add(&self.cur_model_output, 1.0 / 3.0));
                mo.shallow_clone()
            }
            _ => {
                let combined = add(&self.cur_model_output, 1.0 / 6.0);
                self.cur_model_output = None;
                combined
            }
        };
        let start = self.cur_sample.as_ref().unwrap_or(x).shallow_clone();
        self.prev_sample(&start, t, prev_t, &model_output)
    }

    fn step_plms(&mut self, mo: &Tensor, step_index: usize, x: &Tensor) -> Tensor {
        let counter = step_index;
        let mut t = self.timesteps[counter] as i64;
        let mut prev_t = t - self.step_ratio;
        if counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(mo.shallow_clone());
        } else {
            // the second call redoes the first step from its start with the averaged noise
            prev_t = t;
            t += self.step_ratio;
        }
        let mut sample = x.shallow_clone();
        let e = &self.ets;
        let n = e.len();
        let model_output = if n == 1 && counter == 0 {
            self.cur_sample = Some(x.shallow_clone());
            mo.shallow_clone()
        } else if n == 1 && counter == 1 {
            sample = self.cur_sample.take().expect("PLMS step 0 kept its sample");
            (mo + &e[0]) / 2.0
        } else if n == 2 {
            (&e[1] * 3.0 - &e[0]) / 2.0
        } else if n == 3 {
            (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0
        } else {
            (&e[3] * 55.0 - &e[2] * 59.0 + &e[1] * 37.0 - &e[0] * 9.0) * (1.0 / 24.0)
        };
        self.prev_sample(&sample, t, prev_t, &model_output)
    }
}

impl Sampler for Pndm {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Pndm
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn steps_taken(&mut self) -> &mut usize {
        &mut self.next_step
    }

    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, _noise_kind: Kind) -> Tensor {
        if step_index < self.prk_steps {
            self.step_prk(mo, step_index, x)
        } else {
            self.step_plms(mo, step_index, x)
        }
    }
}
