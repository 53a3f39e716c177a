//! Inference timesteps and sigmas exactly as diffusers' `set_timesteps` computes them: numpy's
//! `linspace`, `arange` (with its fill rule), `round` (half to even), `interp`, and the
//! `_sigma_to_t` / `_convert_to_karras` helpers, re-done step for step so that the integer (or
//! float32) timesteps come out bit-identical.
use super::config::{FinalSigmas, TimestepSpacing};
use super::{NoiseSchedule, SchedulerKind};
use anyhow::{bail, Result};

/// `np.linspace(start, stop, num)` (endpoint included) in float64.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            y.iter_mut().for_each(|v| *v = *v / div as f64 * delta);
        } else {
            y.iter_mut().for_each(|v| *v *= step);
        }
    } else {
        y.iter_mut().for_each(|v| *v *= delta);
    }
    y.iter_mut().for_each(|v| *v += start);
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for a float step: length `ceil((stop - start) / step)`, then
/// numpy's fill, `start + i * ((start + step) - start)`, which is not always `start + i * step`.
pub fn arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)`, clamping outside the table like numpy.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    assert!(n >= 2, "interp needs at least two points");
    let last = (n - 1) as f64;
    if x.is_nan() {
        return x;
    }
    if x > last {
        return fp[n - 1];
    }
    if x < 0.0 {
        return fp[0];
    }
    let j = x.floor() as usize;
    if j >= n - 1 || j as f64 == x {
        return fp[j.min(n - 1)];
    }
    // numpy: slope * (x - xp[j]) + fp[j], with xp[j+1] - xp[j] == 1
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// Which of diffusers' two timestep recipes a sampler uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipe {
    /// DDPM, DDIM: `n` points, rounded to integers.
    Integer,
    /// Euler, Euler ancestral: `n` points kept as float32 (linspace spacing is fractional).
    Float32,
    /// DPM-Solver, UniPC: `n + 1` points with the final one (t = 0) dropped, integers.
    Multistep,
}

/// The timesteps (descending) that `set_timesteps(n)` produces for `spacing`.
pub fn spaced_timesteps(
    recipe: Recipe,
    spacing: TimestepSpacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let t = num_train as f64;
    match (spacing, recipe) {
        (TimestepSpacing::Linspace, Recipe::Integer) => {
            linspace(0.0, t - 1.0, n).into_iter().rev().map(f64::round_ties_even).collect()
        }
        (TimestepSpacing::Linspace, Recipe::Float32) => {
            linspace(0.0, t - 1.0, n).into_iter().rev().map(|v| v as f32 as f64).collect()
        }
        (TimestepSpacing::Linspace, Recipe::Multistep) => {
            let mut v: Vec<f64> = linspace(0.0, t - 1.0, n + 1).into_iter().rev().map(f64::round_ties_even).collect();
            v.pop();
            v
        }
        (TimestepSpacing::Leading, Recipe::Integer | Recipe::Float32) => {
            let ratio = num_train / n;
            (0..n).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
        }
        (TimestepSpacing::Leading, Recipe::Multistep) => {
            let ratio = num_train / (n + 1);
            (1..=n).rev().map(|i| (i * ratio) as f64 + steps_offset as f64).collect()
        }
        (TimestepSpacing::Trailing, _) => {
            let ratio = t / n as f64;
            // rounding then subtracting 1 in float32 for Euler is exact for these small integers
            arange(t, 0.0, -ratio).into_iter().map(|v| v.round_ties_even() - 1.0).collect()
        }
    }
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`,
/// by linear interpolation in the float32 `log_sigmas` table (ascending in t). numpy promotes
/// `low - log_sigma` to float64 but computes `low - high` in float32; kept.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of the cumulative count of `log_sigma >= log_sigmas[i]`: the last such index (0 if none)
    let low_idx = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0).min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al.'s sigmas (rho = 7) from `sigma_max` down to `sigma_min`, `n` of them.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, n).into_iter().map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho)).collect()
}

/// float32 log of each sigma (numpy's `np.log` of a float32 array), correctly rounded.
pub fn log_sigmas(sigmas: &[f64]) -> Vec<f32> {
    sigmas.iter().map(|&s| s.ln() as f32).collect()
}

/// DDPM's and DDIM's integer timesteps (leading spacing by default), each checked to lie in
/// `0..num_train_timesteps`.
pub(crate) fn integer_timesteps(schedule: &NoiseSchedule, n: usize, kind: SchedulerKind) -> Result<Vec<f64>> {
    let (c, n_train) = (schedule.config(), schedule.num_train_timesteps());
    let spacing = c.spacing_or(TimestepSpacing::Leading);
    let timesteps = spaced_timesteps(Recipe::Integer, spacing, n_train, n, c.steps_offset);
    if let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t >= n_train as f64) {
        bail!(
            "{kind}: {n} steps with timestep_spacing {spacing:?} and steps_offset {} give timestep {t}, outside 0..{n_train}",
            c.steps_offset
        );
    }
    Ok(timesteps)
}

/// Timesteps and n + 1 float32 σs of diffusers' multistep solvers (DPM-Solver++, UniPC).
pub struct MultistepSigmas {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
}

/// The `set_timesteps` of DPM-Solver++ and UniPC: spaced timesteps with σs interpolated from the
/// schedule's table, or Karras σs with the timesteps they map to, then the final σ. The classes
/// differ only with Karras σs: DPM-Solver++ truncates the mapped timesteps without rounding for
/// the cosine schedule (`round_karras_t` false), and UniPC's final `sigma_min` is the last Karras
/// σ rather than the schedule's (`karras_min_is_last`).
pub(crate) fn multistep_sigmas(schedule: &NoiseSchedule, n: usize, round_karras_t: bool, karras_min_is_last: bool) -> MultistepSigmas {
    let (c, table) = (schedule.config(), schedule.sigmas());
    let spacing = c.spacing_or(TimestepSpacing::Linspace);
    let mut timesteps = spaced_timesteps(Recipe::Multistep, spacing, schedule.num_train_timesteps(), n, c.steps_offset);
    let (mut sigmas, sigma_min): (Vec<f64>, f64) = if c.use_karras_sigmas {
        let logs = log_sigmas(table);
        let sigmas = karras_sigmas(c.sigma_min.unwrap_or(table[0]), c.sigma_max.unwrap_or(table[table.len() - 1]), n);
        timesteps = sigmas
            .iter()
            .map(|&s| {
                let t = sigma_to_t(s, &logs);
                (if round_karras_t { t.round_ties_even() } else { t }).trunc()
            })
            .collect();
        let last = sigmas[sigmas.len() - 1];
        (sigmas, if karras_min_is_last { last } else { table[0] })
    } else {
        (timesteps.iter().map(|&t| interp(t, table)).collect(), table[0])
    };
    sigmas.push(match c.final_sigmas_type {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => sigma_min,
    });
    MultistepSigmas { timesteps, sigmas: sigmas.iter().map(|&s| s as f32).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_hits_both_ends() {
        let v = linspace(0.0, 999.0, 25);
        assert_eq!(v.len(), 25);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[24], 999.0);
        assert_eq!(v[1], 999.0 / 24.0);
        assert_eq!(linspace(3.0, 5.0, 1), vec![3.0]);
    }

    #[test]
    fn arange_length_and_fill() {
        assert_eq!(arange(1000.0, 0.0, -250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert!(arange(0.0, 10.0, -1.0).is_empty());
    }

    #[test]
    fn rounding_is_half_to_even() {
        // trailing with 16 steps has .5 values: 937.5 -> 938, 812.5 -> 812
        let v = spaced_timesteps(Recipe::Integer, TimestepSpacing::Trailing, 1000, 16, 0);
        assert_eq!(v[1], 937.0);
        assert_eq!(v[3], 811.0);
        assert_eq!(*v.last().unwrap(), 61.0);
    }

    #[test]
    fn leading_with_offset() {
        let v = spaced_timesteps(Recipe::Integer, TimestepSpacing::Leading, 1000, 10, 1);
        assert_eq!(v, vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
        let v = spaced_timesteps(Recipe::Multistep, TimestepSpacing::Leading, 1000, 4, 1);
        assert_eq!(v, vec![801.0, 601.0, 401.0, 201.0]);
    }

    #[test]
    fn interp_matches_table_points_and_clamps() {
        let fp = [1.0, 2.0, 4.0];
        assert_eq!(interp(1.0, &fp), 2.0);
        assert_eq!(interp(1.5, &fp), 3.0);
        assert_eq!(interp(-1.0, &fp), 1.0);
        assert_eq!(interp(7.0, &fp), 4.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas: Vec<f64> = (0..100).map(|i| 0.1 * (1.05f64).powi(i)).collect();
        let logs = log_sigmas(&sigmas);
        for t in [0usize, 1, 37, 98, 99] {
            assert!((sigma_to_t(sigmas[t], &logs) - t as f64).abs() < 1e-4);
        }
        // below and above the table clamp to the ends
        assert_eq!(sigma_to_t(1e-3, &logs), 0.0);
        assert_eq!(sigma_to_t(1e3, &logs), 99.0);
    }

    #[test]
    fn karras_runs_from_max_to_min() {
        let s = karras_sigmas(0.03, 14.6, 10);
        assert!((s[0] - 14.6).abs() < 1e-9 && (s[9] - 0.03).abs() < 1e-12);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
    }
}
