//! The BK-SDM objective: task loss + output-level KD + per-block feature KD, each an MSE (mean
//! over all elements) computed in fp32. Every term is returned on its own, because the feature
//! term is typically much larger than the others (BK-SDM issue 21) and users need to see that.
use super::student::{FeatureLevel, FeaturePair};
use crate::config_error::{invalid, ConfigError};
use crate::models::UNetOutput;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// λ weights of `loss = task + output_kd + Σ feature_kd` (BK-SDM's defaults: all 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossWeights {
    pub task: f64,
    pub output_kd: f64,
    pub feature_kd: f64,
    /// Which features are paired (`blocks`, `sub_blocks`, `self_attention`).
    #[serde(skip_serializing_if = "is_blocks")]
    pub features: FeatureLevel,
    /// Each feature MSE divided by the teacher feature's mean square (LAPTOP-Diff's normalised
    /// feature distillation: otherwise a few large terms dominate the sum).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub normalize_features: bool,
}

fn is_blocks(level: &FeatureLevel) -> bool {
    *level == FeatureLevel::Blocks
}

impl Default for LossWeights {
    /// BK-SDM's defaults: all three λ = 1.
    fn default() -> Self {
        LossWeights { task: 1.0, output_kd: 1.0, feature_kd: 1.0, features: FeatureLevel::Blocks, normalize_features: false }
    }
}

impl LossWeights {
    /// Each weight finite and >= 0 (whether any is active depends on `distill`: `RunConfig`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [("loss.task", self.task), ("loss.output_kd", self.output_kd), ("loss.feature_kd", self.feature_kd)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(invalid(key, format!("{key} = {v}: must be a finite number >= 0")));
            }
        }
        Ok(())
    }
}

/// The terms of one step's loss, as scalar tensors (the total carries the graph).
pub struct LossTerms {
    pub total: Tensor,
    pub task: Tensor,
    pub output_kd: Option<Tensor>,
    pub feature_kd: Option<Tensor>,
    /// Unweighted MSE of each feature pair, named `teacher->student`.
    pub per_pair: Vec<(String, Tensor)>,
}

/// Mean squared error in fp32, whatever the inputs' dtype.
pub fn mse(a: &Tensor, b: &Tensor) -> Tensor {
    a.to_kind(Kind::Float).mse_loss(&b.to_kind(Kind::Float), Reduction::Mean)
}

/// The loss of a student forward against the regression `target` and, when distilling, the
/// teacher's forward on the same inputs (computed without gradients).
pub fn distill_loss(
    student: &UNetOutput,
    teacher: Option<&UNetOutput>,
    target: &Tensor,
    pairs: &[FeaturePair],
    w: &LossWeights,
) -> LossTerms {
    let task = mse(&student.sample, target);
    let mut total = &task * w.task;
    let (mut output_kd, mut feature_kd, mut per_pair) = (None, None, vec![]);
    if let Some(teacher) = teacher {
        let out = mse(&student.sample, &teacher.sample.detach());
        total += &out * w.output_kd;
        output_kd = Some(out);
        if !pairs.is_empty() {
            let mut sum = Tensor::zeros([], (Kind::Float, target.device()));
            for p in pairs {
                let s = student.feature(&p.student).unwrap_or_else(|| panic!("student forward lacks feature {}", p.student));
                let t = teacher.feature(&p.teacher).unwrap_or_else(|| panic!("teacher forward lacks feature {}", p.teacher));
                let mut term = mse(s, &t.detach());
                if w.normalize_features {
                    term = term / t.detach().to_kind(Kind::Float).square().mean(Kind::Float);
                }
                sum += &term;
                per_pair.push((format!("{}->{}", p.teacher, p.student), term));
            }
            total += &sum * w.feature_kd;
            feature_kd = Some(sum);
        }
    }
    LossTerms { total, task, output_kd, feature_kd, per_pair }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn out(sample: Tensor, down: Vec<Tensor>) -> UNetOutput {
        UNetOutput { sample, down, mid: None, up: vec![], inner: BTreeMap::new() }
    }

    #[test]
    fn terms_add_up_with_weights() {
        let s = out(Tensor::from_slice(&[1.0f32, 2.0]), vec![Tensor::from_slice(&[0.0f32, 0.0])]);
        let t = out(Tensor::from_slice(&[1.0f32, 0.0]), vec![Tensor::from_slice(&[3.0f32, 1.0])]);
        let target = Tensor::from_slice(&[0.0f32, 0.0]);
        let pairs = vec![FeaturePair { teacher: "down_blocks.0".into(), student: "down_blocks.0".into() }];
        let w = LossWeights { task: 1.0, output_kd: 0.5, feature_kd: 0.25, ..Default::default() };
        let l = distill_loss(&s, Some(&t), &target, &pairs, &w);
        assert_eq!(l.task.double_value(&[]), 2.5); // (1 + 4) / 2
        assert_eq!(l.output_kd.as_ref().unwrap().double_value(&[]), 2.0); // (0 + 4) / 2
        assert_eq!(l.feature_kd.as_ref().unwrap().double_value(&[]), 5.0); // (9 + 1) / 2
        assert_eq!(l.total.double_value(&[]), 2.5 + 0.5 * 2.0 + 0.25 * 5.0);
        assert_eq!(l.per_pair[0].0, "down_blocks.0->down_blocks.0");
        let alone = distill_loss(&s, None, &target, &pairs, &w);
        assert!(alone.output_kd.is_none() && alone.feature_kd.is_none());
        assert_eq!(alone.total.double_value(&[]), 2.5);
        let normalized = distill_loss(&s, Some(&t), &target, &pairs, &LossWeights { normalize_features: true, ..w });
        assert_eq!(normalized.feature_kd.unwrap().double_value(&[]), 1.0); // 5 / ((9 + 1) / 2)
    }

    #[test]
    fn half_inputs_are_measured_in_fp32() {
        let a = Tensor::from_slice(&[300.0f32]).to_kind(Kind::Half);
        let b = Tensor::from_slice(&[0.0f32]).to_kind(Kind::Half);
        // 300² = 90000 overflows fp16 (max 65504)
        assert_eq!(mse(&a, &b).double_value(&[]), 90000.0);
    }
}
