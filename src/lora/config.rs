//! The run YAML's `lora:` section: train LoRA adapters on a frozen UNet instead of the whole
//! student (Hu et al. 2021), shaped as PEFT's `LoraConfig`, with the defaults of diffusers'
//! `train_lcm_distill_lora_sd_wds.py` (rank 64, alpha 64, dropout 0, its target list).
//! The adapters themselves are `models::adapter`.
use crate::config_error::{invalid, ConfigError};
use crate::models::adapter::{AdapterInit, AdapterSpec};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// diffusers' LCM-LoRA targets: attention projections, the transformers' in/out projections and
/// feed-forward, every resnet conv and time projection, the resamplers' convs.
pub const DEFAULT_TARGETS: [&str; 14] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
];

/// `lora:`: present, only adapters train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// r: the adapters' inner width.
    pub rank: i64,
    /// The output is scaled by alpha / rank; unset: alpha = rank (scale 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapters' input while training (PEFT's `lora_dropout`).
    pub dropout: f64,
    /// Module-name patterns (PEFT's `target_modules` list): a Linear or Conv2d is adapted when
    /// its dotted name equals one or ends with `.` + one.
    pub targets: Vec<String>,
    pub init: AdapterInit,
    /// Where the frozen base's weights come from: a UNet folder, a run's `final/` or a KD
    /// checkpoint of the student's architecture. Unset: the student as `student_init` makes it
    /// (the teacher's weights by the copy map).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { rank: 64, alpha: None, dropout: 0.0, targets: DEFAULT_TARGETS.map(String::from).to_vec(), init: AdapterInit::default(), base: None }
    }
}

impl LoraConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// What the UNet builder makes of it.
    pub fn spec(&self) -> AdapterSpec {
        AdapterSpec { rank: self.rank, alpha: self.alpha(), dropout: self.dropout, targets: self.targets.clone(), init: self.init }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = self.base.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    }

    /// The section's own checks, each naming the key and value. A rank larger than a targeted
    /// layer, a target matching no layer and a `base` that is not a UNet of the student's
    /// architecture are found when the UNet is built (so recipes load before their base exists).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rank < 1 || self.rank > 1 << 16 {
            return Err(invalid("lora.rank", format!("lora.rank = {}: must be at least 1 (and at most 65536)", self.rank)));
        }
        if let Some(a) = self.alpha.filter(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(invalid("lora.alpha", format!("lora.alpha = {a}: must be > 0")));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("lora.dropout", format!("lora.dropout = {}: must be in [0, 1)", self.dropout)));
        }
        if self.targets.is_empty() {
            return Err(invalid("lora.targets", "lora.targets is empty: name at least one module (e.g. to_q)".to_string()));
        }
        if let Some(i) = self.targets.iter().position(|t| t.trim().is_empty() || t.starts_with('.') || t.ends_with('.')) {
            return Err(invalid("lora.targets", format!("lora.targets[{i}] = {:?} is not a module name", self.targets[i])));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(fn(&mut LoraConfig), &str); 5] = [
            (|c| c.rank = 0, "lora.rank"),
            (|c| c.alpha = Some(0.0), "lora.alpha"),
            (|c| c.dropout = 1.0, "lora.dropout"),
            (|c| c.targets.clear(), "lora.targets"),
            (|c| c.targets.push(" ".into()), "lora.targets"),
        ];
        for (set, key) in cases {
            let mut c = LoraConfig::default();
            set(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, key, "{}", e.message);
            assert!(e.message.contains(key), "{}", e.message);
        }
        assert!(LoraConfig::default().validate().is_ok());
        assert_eq!(LoraConfig::default().alpha(), 64.0);
    }
}
