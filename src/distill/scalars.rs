//! What a run logs: the named scalars of one optimizer step (`StepScalars`) and the window of
//! steps between two log lines (`LogWindow`), averaged into TensorBoard scalars; and the run
//! YAML's `log:` section that sets the window (`LogConfig`).
use super::lcd::LcdTerms;
use super::loss::LossTerms;
use crate::config_error::{invalid, ConfigError};
use crate::distributed::Ranks;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::time::Instant;
use tch::Tensor;

/// The run YAML's `log:` section: how often a run logs, and whether to TensorBoard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Optimizer steps between log lines and TensorBoard scalars.
    pub every: u64,
    pub tensorboard: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { every: 10, tensorboard: true }
    }
}

impl LogConfig {
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.every < 1 {
            return Err(invalid("log.every", format!("log.every = {}: must be >= 1", self.every)));
        }
        Ok(())
    }
}

/// Named scalars of one step, or their sums over a logging window: the loss terms
/// (`loss/total`, `loss/task`, `loss/output_kd`, `loss/feature_kd`, `feature_kd/<pair>`; LCD's
/// `loss/consistency`, `lcm/w_mean`, `lcm/target_ema`) and `grad_norm`, averaged over the window, in the order they were first added; the last `lr`; and
/// counters that stay sums.
#[derive(Default)]
pub struct StepScalars {
    pub averaged: Vec<(String, f64)>,
    pub lr: f64,
    pub samples: usize,
    pub skipped: usize,
    /// Steps skipped because fp16 gradients overflowed.
    pub overflow_steps: usize,
}

impl StepScalars {
    pub fn add(&mut self, name: &str, value: f64) {
        match self.averaged.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 += value,
            None => self.averaged.push((name.to_string(), value)),
        }
    }

    /// Adds one micro-batch's terms (averaged over the accumulation).
    pub fn add_terms(&mut self, t: &LossTerms, accum: usize) {
        let v = |x: &Tensor| x.double_value(&[]) / accum as f64;
        self.add("loss/total", v(&t.total));
        self.add("loss/task", v(&t.task));
        let kd = [("loss/output_kd", &t.output_kd), ("loss/feature_kd", &t.feature_kd)];
        for (name, x) in kd.iter().filter_map(|(n, x)| x.as_ref().map(|x| (n, x))) {
            self.add(name, v(x));
        }
        for (pair, x) in &t.per_pair {
            self.add(&format!("feature_kd/{pair}"), v(x));
        }
    }

    /// Adds one LCD micro-batch's consistency loss (also the total) and the mean of its w.
    /// `lambda_output_kd`: `lcm.output_kd`, the weight of `t.output_kd` in the total.
    pub fn add_lcd(&mut self, t: &LcdTerms, accum: usize, lambda_output_kd: f64) {
        let loss = t.loss.double_value(&[]) / accum as f64;
        let kd = t.output_kd.as_ref().map(|k| k.double_value(&[]) / accum as f64);
        self.add("loss/total", loss + kd.unwrap_or(0.0) * lambda_output_kd);
        self.add("loss/consistency", loss);
        if let Some(kd) = kd {
            self.add("loss/output_kd", kd);
        }
        self.add("lcm/w_mean", t.w_mean / accum as f64);
    }

    /// The loss terms averaged and the sample counts summed over the ranks: the step's scalars
    /// as one process computing every micro-batch would log them.
    pub fn average_over(&mut self, ranks: &Ranks) -> Result<()> {
        let values: Vec<f64> = self.averaged.iter().map(|(_, v)| *v).collect();
        for (slot, mean) in self.averaged.iter_mut().zip(ranks.mean(&values)?) {
            slot.1 = mean;
        }
        let counts = ranks.sum_counts(&[self.samples as i64, self.skipped as i64])?;
        (self.samples, self.skipped) = (counts[0] as usize, counts[1] as usize);
        Ok(())
    }

    pub fn merge(&mut self, s: &StepScalars) {
        for (name, v) in &s.averaged {
            self.add(name, *v);
        }
        self.lr = s.lr;
        self.samples += s.samples;
        self.skipped += s.skipped;
        self.overflow_steps += s.overflow_steps;
    }

    /// The sum of `name`, divided by `steps`.
    pub fn mean(&self, name: &str, steps: u64) -> f64 {
        self.averaged.iter().find(|(n, _)| n == name).map_or(0.0, |(_, v)| v / steps.max(1) as f64)
    }
}

/// The steps since the last log line: their scalars summed, and when the window opened.
pub struct LogWindow {
    sums: StepScalars,
    steps: u64,
    start: Instant,
}

impl Default for LogWindow {
    fn default() -> Self {
        LogWindow { sums: StepScalars::default(), steps: 0, start: Instant::now() }
    }
}

impl LogWindow {
    pub fn push(&mut self, s: &StepScalars) {
        self.sums.merge(s);
        self.steps += 1;
    }

    /// The mean total loss over the window.
    pub fn mean_loss(&self) -> f64 {
        self.sums.mean("loss/total", self.steps)
    }

    /// The TensorBoard scalars of the window (loss terms and grad norm averaged, the last lr,
    /// samples per second; `skipped_total` bad samples so far; the fp16 loss scale when there is
    /// one), and a fresh window.
    pub fn close(&mut self, skipped_total: usize, loss_scale: Option<f64>) -> Vec<(String, f32)> {
        let w = std::mem::take(self);
        let elapsed = w.start.elapsed().as_secs_f64().max(1e-9);
        let mut values: Vec<(String, f32)> = w.sums.averaged.iter().map(|(name, _)| (name.clone(), w.sums.mean(name, w.steps) as f32)).collect();
        values.push(("lr".into(), w.sums.lr as f32));
        values.push(("samples_per_s".into(), (w.sums.samples as f64 / elapsed) as f32));
        values.push(("data/skipped_samples".into(), skipped_total as f32));
        if let Some(scale) = loss_scale {
            values.push(("fp16/loss_scale".into(), scale as f32));
            values.push(("fp16/overflow_steps".into(), w.sums.overflow_steps as f32));
        }
        values
    }
}
