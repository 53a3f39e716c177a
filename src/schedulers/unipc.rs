//! UniPC (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler` with its defaults: B(h) =
//! expm1(h) ("bh2"), data prediction (`predict_x0`), order 2 with a lower-order start and a
//! first-order last step, and the UniC corrector applied at every step after the first (it
//! refines the current sample with the new model output before the next predictor step).
use super::config::{PredictionType, SolverType};
use super::f32x;
use super::timesteps::{multistep_sigmas, MultistepSigmas};
use super::{div, scale, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::Result;
use std::sync::Arc;
use tch::{Kind, Tensor};

pub struct UniPc {
    steps: MultistepSigmas,
    prediction_type: PredictionType,
    solver_order: usize,
    /// B(h) = h ("bh1") instead of expm1(h).
    bh1: bool,
    predict_x0: bool,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    state: History,
}

#[derive(Default)]
struct History {
    /// Converted model outputs of the latest steps, oldest first.
    model_outputs: Vec<Tensor>,
    /// The sample the last predictor started from (the corrector's x_{s0}).
    last_sample: Option<Tensor>,
    /// The order the last predictor used; the corrector reuses it.
    this_order: usize,
    lower_order_nums: usize,
    next_step: usize,
}

/// Solves the small system R·x = b in float32 by Gaussian elimination with partial pivoting (what
/// LAPACK's sgesv does for UniPC's 2x2 and 3x3 systems).
fn solve_f32(mut r: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let p = (col..n).fold(col, |best, row| if r[row][col].abs() > r[best][col].abs() { row } else { best });
        r.swap(col, p);
        b.swap(col, p);
        for row in col + 1..n {
            let l = r[row][col] / r[col][col];
            let pivot_row = r[col].clone();
            for (x, p) in r[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= l * p;
            }
            b[row] -= l * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let s = (row + 1..n).fold(b[row], |acc, k| acc - r[row][k] * x[k]);
        x[row] = s / r[row][row];
    }
    x
}

/// The h-dependent coefficients shared by predictor and corrector.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    /// R (order x order) and b of the linear system for the ρs.
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl UniPc {
    pub fn new(schedule: Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Self> {
        let c = schedule.config();
        // with Karras σs, "sigma_min" means the last Karras σ, not the schedule's
        let steps = multistep_sigmas(&schedule, num_inference_steps, true, true);
        Ok(UniPc {
            steps,
            prediction_type: c.prediction_type,
            solver_order: c.solver_order,
            bh1: c.solver_type == Some(SolverType::Bh1),
            predict_x0: c.predict_x0,
            lower_order_final: c.lower_order_final,
            disable_corrector: c.disable_corrector.clone(),
            state: History::default(),
        })
    }

    fn lambda_at(&self, i: usize) -> (f32, f32, f32) {
        let (a, s) = f32x::alpha_sigma(self.steps.sigmas[i]);
        (a, s, f32x::lambda(a, s))
    }

    /// Coefficients for a step from σ index `s0` to `t` of the given order; `history_at(k)` is the
    /// σ index of the k-th older model output (k = 1..order).
    fn coefficients(
        &self,
        h: f32,
        lambda_s0: f32,
        order: usize,
        history_at: impl Fn(usize) -> usize,
    ) -> (Coefficients, Vec<f32>) {
        let mut rks: Vec<f32> = (1..order)
            .map(|k| {
                let (_, _, lambda_si) = self.lambda_at(history_at(k));
                (lambda_si - lambda_s0) / h
            })
            .collect();
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = f32x::expm1(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: u64 = 1;
        let b_h = if self.bh1 { hh } else { f32x::expm1(hh) };
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for k in 1..=order {
            // rks^(k-1), elementwise (x·x for the square, as torch.pow does)
            r.push(rks.iter().map(|&x| (0..k - 1).fold(1.0f32, |acc, _| acc * x)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= k as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        (Coefficients { h_phi_1, b_h, r, b }, rks)
    }

    /// The model output in the form the solver integrates: x0 (predict_x0) or ε.
    fn convert(&self, mo: &Tensor, x: &Tensor, i: usize) -> Tensor {
        let (alpha_t, sigma_t) = f32x::alpha_sigma(self.steps.sigmas[i]);
        match (self.predict_x0, self.prediction_type) {
            (true, PredictionType::Epsilon) => div(&(x - scale(mo, sigma_t)), alpha_t),
            (true, PredictionType::Sample) => mo.shallow_clone(),
            (true, PredictionType::VPrediction) => scale(x, alpha_t) - scale(mo, sigma_t),
            (false, PredictionType::Epsilon) => mo.shallow_clone(),
            (false, PredictionType::Sample) => div(&(x - scale(mo, alpha_t)), sigma_t),
            (false, PredictionType::VPrediction) => scale(mo, alpha_t) + scale(x, sigma_t),
        }
    }

    /// Σ_k ρ_k·D_k.
    fn weighted(rhos: &[f32], d: &[Tensor]) -> Option<Tensor> {
        d.iter().zip(rhos).map(|(d, &r)| scale(d, r)).reduce(|a, b| a + b)
    }

    /// x_t from x_{s0}: the "linear" part plus coef·(weighted differences), coef·0 when there are none.
    fn combine(
        &self,
        x: &Tensor,
        m0: &Tensor,
        i_t: usize,
        i_s0: usize,
        c: &Coefficients,
        res: Option<Tensor>,
    ) -> Tensor {
        let (alpha_t, sigma_t, _) = self.lambda_at(i_t);
        let (alpha_s0, sigma_s0, _) = self.lambda_at(i_s0);
        let (x_t_, coef) = if self.predict_x0 {
            (scale(x, sigma_t / sigma_s0) - scale(m0, alpha_t * c.h_phi_1), alpha_t * c.b_h)
        } else {
            (scale(x, alpha_t / alpha_s0) - scale(m0, sigma_t * c.h_phi_1), sigma_t * c.b_h)
        };
        match res {
            Some(r) => x_t_ - scale(&r, coef),
            // diffusers subtracts coef * 0 (a 0-dim tensor): NaN if coef is infinite
            None => x_t_ - (coef * 0.0) as f64,
        }
    }

    /// UniP: predicts x at σ_{i+1} from the sample at σ_i.
    fn predictor(&self, x: &Tensor, i: usize, order: usize) -> Tensor {
        let m = &self.state.model_outputs;
        let m0 = &m[m.len() - 1];
        let (_, _, lambda_t) = self.lambda_at(i + 1);
        let (_, _, lambda_s0) = self.lambda_at(i);
        let h = lambda_t - lambda_s0;
        let (c, rks) = self.coefficients(h, lambda_s0, order, |k| i - k);
        let d1s: Vec<Tensor> = (1..order).map(|k| div(&(&m[m.len() - 1 - k] - m0), rks[k - 1])).collect();
        let res = if d1s.is_empty() {
            None
        } else {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let r: Vec<Vec<f32>> = c.r[..order - 1].iter().map(|row| row[..order - 1].to_vec()).collect();
                solve_f32(r, c.b[..order - 1].to_vec())
            };
            Self::weighted(&rhos, &d1s)
        };
        self.combine(x, m0, i + 1, i, &c, res)
    }

    /// UniC: corrects the sample at σ_i (predicted from σ_{i-1}) with the model output there.
    fn corrector(&self, model_t: &Tensor, last_sample: &Tensor, i: usize, order: usize) -> Tensor {
        let m = &self.state.model_outputs;
        let m0 = &m[m.len() - 1];
        let (_, _, lambda_t) = self.lambda_at(i);
        let (_, _, lambda_s0) = self.lambda_at(i - 1);
        let h = lambda_t - lambda_s0;
        let (c, rks) = self.coefficients(h, lambda_s0, order, |k| i - (k + 1));
        let d1s: Vec<Tensor> = (1..order).map(|k| div(&(&m[m.len() - 1 - k] - m0), rks[k - 1])).collect();
        let rhos = if order == 1 { vec![0.5] } else { solve_f32(c.r.clone(), c.b.clone()) };
        let d1_t = model_t - m0;
        let last = scale(&d1_t, rhos[rhos.len() - 1]);
        let res = match Self::weighted(&rhos[..rhos.len() - 1], &d1s) {
            Some(corr) => corr + last,
            None => last,
        };
        self.combine(last_sample, m0, i, i - 1, &c, Some(res))
    }
}

impl Sampler for UniPc {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Unipc
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
        let mut x = x.shallow_clone();
        let converted = self.convert(mo, &x, i);
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        if let Some(last) = self.state.last_sample.as_ref().filter(|_| use_corrector) {
            x = self.corrector(&converted, last, i, self.state.this_order);
        }
        let history = &mut self.state.model_outputs;
        if history.len() == self.solver_order {
            drop(history.remove(0));
        }
        history.push(converted);
        let order = if self.lower_order_final { self.solver_order.min(n - i) } else { self.solver_order };
        let order = order.min(self.state.lower_order_nums + 1);
        self.state.this_order = order;
        let prev = self.predictor(&x, i, order);
        self.state.last_sample = Some(x);
        if self.state.lower_order_nums < self.solver_order {
            self.state.lower_order_nums += 1;
        }
        prev
    }
}

#[cfg(test)]
mod tests {
    use super::solve_f32;

    #[test]
    fn solves_with_pivoting() {
        // needs a row swap: the first pivot is 0
        let x = solve_f32(vec![vec![0.0, 1.0], vec![2.0, 1.0]], vec![3.0, 5.0]);
        assert_eq!(x, vec![1.0, 3.0]);
        let x =
            solve_f32(vec![vec![1.0, 1.0, 1.0], vec![-0.5, -1.5, 1.0], vec![0.25, 2.25, 1.0]], vec![1.0, 0.5, 0.25]);
        let check = [x[0] + x[1] + x[2], -0.5 * x[0] - 1.5 * x[1] + x[2], 0.25 * x[0] + 2.25 * x[1] + x[2]];
        for (c, want) in check.iter().zip([1.0, 0.5, 0.25]) {
            assert!((c - want).abs() < 1e-5);
        }
    }
}
