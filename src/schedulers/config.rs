//! diffusers' `scheduler_config.json`, parsed once into a typed `SchedulerConfig`.
//!
//! Any scheduler class's file is accepted (PNDM, DDIM, Euler, ...), the way diffusers'
//! `Target.from_config(loaded.config)` accepts it: keys present in the file are used, missing keys
//! take the *target* sampler's constructor default (diffusers drops keys it filled with defaults
//! before handing a config to another class). Keys whose default differs between classes
//! (`timestep_spacing`, `clip_sample`, ...) are therefore `Option`s resolved by each sampler.
//! Values sdkd does not implement are errors naming the key and value: shared keys at parse time,
//! keys only some samplers read when such a sampler is built.
use super::SchedulerKind;
use crate::json_config;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::path::Path;

/// LCMScheduler's default `original_inference_steps`, which is also the default grid of the
/// distillation that makes an LCM student (`num_ddim_timesteps` of diffusers' LCM scripts).
pub const LCM_ORIGINAL_INFERENCE_STEPS: usize = 50;

/// What an LCM student's sampler must repeat of the distillation that made it: the solver grid's
/// points (`original_inference_steps`, the run's `lcm.num_ddim_timesteps`) and the boundary
/// scalings' `timestep_scaling` (the run's `lcm.timestep_scaling`). Written into the
/// `LCMScheduler` config an export carries and used by an `lcm` run's validation grids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LcmGrid {
    pub original_inference_steps: usize,
    pub timestep_scaling: f64,
}

impl Default for LcmGrid {
    /// `LCMScheduler`'s defaults, which are diffusers' LCM scripts' (50 points, s = 10).
    fn default() -> Self {
        LcmGrid { original_inference_steps: LCM_ORIGINAL_INFERENCE_STEPS, timestep_scaling: 10.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum BetaSchedule {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// Glide's cosine schedule through `betas_for_alpha_bar`, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "epsilon")]
    Epsilon,
    #[serde(rename = "v_prediction")]
    VPrediction,
    #[serde(rename = "sample")]
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum TimestepSpacing {
    #[serde(rename = "leading")]
    Leading,
    #[serde(rename = "linspace")]
    Linspace,
    #[serde(rename = "trailing")]
    Trailing,
}

/// What the last sigma is for sigma-based samplers (Euler, DPM++, UniPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FinalSigmas {
    #[serde(rename = "zero")]
    Zero,
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// DDPM's posterior variance choice (the learned kinds need a UNet with twice the channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum VarianceType {
    #[serde(rename = "fixed_small")]
    FixedSmall,
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    #[serde(rename = "fixed_large")]
    FixedLarge,
}

/// `solver_type` as written. DPM-Solver reads bh1/bh2/logrho as midpoint, UniPC reads
/// midpoint/heun/logrho as bh2 (diffusers rewrites them the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SolverType {
    #[serde(rename = "midpoint")]
    Midpoint,
    #[serde(rename = "heun")]
    Heun,
    #[serde(rename = "logrho")]
    Logrho,
    #[serde(rename = "bh1")]
    Bh1,
    #[serde(rename = "bh2")]
    Bh2,
}

impl BetaSchedule {
    pub fn name(self) -> &'static str {
        match self {
            BetaSchedule::Linear => "linear",
            BetaSchedule::ScaledLinear => "scaled_linear",
            BetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
        }
    }
}

impl PredictionType {
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// A typed scheduler config. Fields are diffusers' keys; `None` means "absent from the file: the
/// sampler's own default".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// `_class_name` of the file (e.g. `PNDMScheduler`), informational.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Explicit betas; replace `beta_start/beta_end/beta_schedule`.
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    /// DDPM/DDIM/PNDM default to leading, the others to linspace.
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: i64,
    pub rescale_betas_zero_snr: bool,
    /// DDIM/PNDM: the "previous" alpha of the last step is 1 (true) or alphas_cumprod[0]. Default
    /// true for DDIM, false for PNDM.
    pub set_alpha_to_one: Option<bool>,
    /// DDPM/DDIM: clamp the predicted x0 to ±clip_sample_range. Default true.
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    /// DDPM only; default fixed_small.
    pub variance_type: Option<VarianceType>,
    /// Euler, DPM++, UniPC.
    pub use_karras_sigmas: bool,
    /// Karras range overrides (else the schedule's own smallest/largest sigma).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: FinalSigmas,
    /// DPM++ and UniPC, default 2.
    pub solver_order: usize,
    pub solver_type: Option<SolverType>,
    pub lower_order_final: bool,
    /// DPM++: first-order final step whatever the step count.
    pub euler_at_final: bool,
    /// UniPC: solve for x0 (true) or for the noise.
    pub predict_x0: bool,
    /// UniPC: step indices whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// PNDM: PLMS from the first step (true, every SD-1.x config) or a Runge-Kutta warm-up first
    /// (false, diffusers' constructor default).
    pub skip_prk_steps: bool,
    /// LCM: the distillation's grid has this many points, T / it apart (default 50: 19, 39, ..., 999).
    pub original_inference_steps: usize,
    /// LCM: the timestep is multiplied by this in the boundary scalings c_skip and c_out (default 10).
    pub timestep_scaling: f64,
    /// The parsed file, for the per-sampler checks of keys read only at their defaults.
    #[serde(skip)]
    raw: Map<String, Value>,
}

impl Default for SchedulerConfig {
    /// diffusers' constructor defaults (shared by all its classes for these keys, but for
    /// LCMScheduler's betas: `lcm.rs` puts those in where the file has none).
    fn default() -> Self {
        SchedulerConfig {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            set_alpha_to_one: None,
            clip_sample: None,
            clip_sample_range: 1.0,
            variance_type: None,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmas::Zero,
            solver_order: 2,
            solver_type: None,
            lower_order_final: true,
            euler_at_final: false,
            predict_x0: true,
            disable_corrector: Vec::new(),
            skip_prk_steps: false,
            original_inference_steps: LCM_ORIGINAL_INFERENCE_STEPS,
            timestep_scaling: 10.0,
            raw: Map::new(),
        }
    }
}

/// Keys that select features sdkd does not implement: accepted only at the value given, checked
/// for the samplers that read them. `Value::Null` means "absent or null".
fn read_only_at_default() -> Vec<(&'static str, Value, &'static [SchedulerKind])> {
    use serde_json::json;
    use SchedulerKind::*;
    vec![
        ("thresholding", json!(false), &[Ddpm, Ddim, Dpmpp2m, Unipc, Lcm]),
        ("use_exponential_sigmas", json!(false), &[Euler, Dpmpp2m, Unipc]),
        ("use_beta_sigmas", json!(false), &[Euler, Dpmpp2m, Unipc]),
        ("use_flow_sigmas", json!(false), &[Dpmpp2m, Unipc]),
        ("use_dynamic_shifting", json!(false), &[Dpmpp2m, Unipc]),
        ("use_lu_lambdas", json!(false), &[Dpmpp2m]),
        ("timestep_type", json!("discrete"), &[Euler]),
        ("interpolation_type", json!("linear"), &[Euler]),
        ("solver_p", Value::Null, &[Unipc]),
        ("shift_terminal", Value::Null, &[Unipc]),
    ]
}

/// A number; also the strings that stand for Python's `json.dumps` output `Infinity`, `-Infinity`
/// and `NaN` (see `quote_non_finite`).
fn float(key: &str, v: &Value) -> Result<f64> {
    match v {
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        _ => v.as_f64().ok_or_else(|| anyhow!("key {key:?}: expected a number, got {v}")),
    }
}

/// Python's json module writes `Infinity`, `-Infinity` and `NaN` bare (diffusers saves
/// `lambda_min_clipped: -Infinity`); serde_json rejects them, so they become strings first.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if let Some(tok) = ["-Infinity", "Infinity", "NaN"].into_iter().find(|t| rest.starts_with(t)) {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`: the file itself, `<dir>/scheduler_config.json`, or a
    /// pipeline folder's `<dir>/scheduler/scheduler_config.json`.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            let direct = path.join("scheduler_config.json");
            let nested = path.join("scheduler").join("scheduler_config.json");
            if !direct.exists() && nested.exists() {
                nested
            } else {
                direct
            }
        } else {
            path.to_path_buf()
        };
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("reading scheduler config {}", file.display()))?;
        Self::from_json_str(&text).with_context(|| format!("scheduler config {}", file.display()))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&quote_non_finite(text)).context("not valid JSON")?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let obj = json_config::object(value)?;
        let mut c: SchedulerConfig = json_config::typed(obj)?;
        c.raw = obj.clone();
        c.validate()?;
        Ok(c)
    }

    /// Checks values that every sampler shares, naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.num_train_timesteps < 2 {
            bail!("key \"num_train_timesteps\": {} is too small (at least 2)", self.num_train_timesteps);
        }
        if !(1..=3).contains(&self.solver_order) {
            bail!("key \"solver_order\": {} is not supported (1, 2 or 3)", self.solver_order);
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                bail!(
                    "key \"trained_betas\": {} betas but num_train_timesteps is {}",
                    b.len(),
                    self.num_train_timesteps
                );
            }
            if let Some(x) = b.iter().find(|x| !(0.0..1.0).contains(*x)) {
                bail!("key \"trained_betas\": {x} is outside [0, 1)");
            }
        } else {
            for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                    bail!("key {key:?}: {v} is outside [0, 1)");
                }
            }
        }
        if self.steps_offset < 0 {
            bail!("key \"steps_offset\": {} is negative", self.steps_offset);
        }
        if let Some(i) = self.disable_corrector.iter().find(|&&i| i >= self.num_train_timesteps) {
            bail!("key \"disable_corrector\": step {i} is past num_train_timesteps");
        }
        Ok(())
    }

    /// Errors (naming key and value) if the file sets a key that `kind` reads to a value sdkd
    /// does not implement for it.
    pub fn check_supported(&self, kind: SchedulerKind) -> Result<()> {
        let read_by_kind: Vec<_> =
            read_only_at_default().into_iter().filter(|(_, _, readers)| readers.contains(&kind)).map(|(k, v, _)| (k, v)).collect();
        json_config::check_defaults(&self.raw, &read_by_kind, &format!("sdkd's {kind} sampler"))?;
        if kind == SchedulerKind::Dpmpp2m {
            if let Some(v) = self.raw.get("algorithm_type").filter(|v| !v.is_null()) {
                // diffusers maps the retired "deis" onto dpmsolver++ too.
                let s = v.as_str().ok_or_else(|| anyhow!("key \"algorithm_type\": expected a string, got {v}"))?;
                if s != "dpmsolver++" && s != "deis" {
                    bail!("key \"algorithm_type\": value {s:?} is not supported by sdkd's {kind} sampler (only \"dpmsolver++\")");
                }
            }
            if let Some(v) = self.raw.get("lambda_min_clipped").filter(|v| !v.is_null()) {
                let x = float("lambda_min_clipped", v)?;
                if x != f64::NEG_INFINITY {
                    bail!("key \"lambda_min_clipped\": value {x} is not supported by sdkd's {kind} sampler (only -Infinity)");
                }
            }
        }
        if kind == SchedulerKind::Pndm {
            if self.prediction_type == PredictionType::Sample {
                bail!("key \"prediction_type\": value \"sample\" is not supported by the {kind} sampler (diffusers' PNDMScheduler takes epsilon or v_prediction)");
            }
            // PNDMScheduler has no such argument: diffusers keeps the plain betas, which the
            // shared NoiseSchedule would not
            if self.rescale_betas_zero_snr {
                bail!("key \"rescale_betas_zero_snr\": value true is not supported by the {kind} sampler (diffusers' PNDMScheduler ignores it)");
            }
        }
        if kind == SchedulerKind::Lcm {
            let (n, t) = (self.original_inference_steps, self.num_train_timesteps);
            if n == 0 || n > t {
                bail!("key \"original_inference_steps\": {n} is out of range for the {kind} sampler (1 to num_train_timesteps = {t})");
            }
            let s = self.timestep_scaling;
            if !(s.is_finite() && s > 0.0) {
                bail!("key \"timestep_scaling\": {s} is not supported by the {kind} sampler (a finite number above 0)");
            }
        }
        if kind == SchedulerKind::EulerAncestral && self.prediction_type == PredictionType::Sample {
            bail!("key \"prediction_type\": value \"sample\" is not supported by the {kind} sampler (diffusers does not implement it either)");
        }
        Ok(())
    }

    /// This noise schedule as a complete `LCMScheduler` config (what an exported LCM student's
    /// pipeline carries): the betas, `prediction_type` and zero-SNR setting as this config
    /// resolves them, every other key at `LCMScheduler`'s default, on a distillation grid of
    /// `grid.original_inference_steps` points with `grid.timestep_scaling`.
    pub fn to_lcm_json(&self, grid: LcmGrid) -> Value {
        serde_json::json!({
            "_class_name": SchedulerKind::Lcm.diffusers_class(),
            "_diffusers_version": "0.42.1",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "beta_schedule": self.beta_schedule.name(),
            "trained_betas": self.trained_betas,
            "original_inference_steps": grid.original_inference_steps,
            "clip_sample": false,
            "clip_sample_range": self.clip_sample_range,
            "set_alpha_to_one": true,
            "steps_offset": self.steps_offset,
            "prediction_type": self.prediction_type.name(),
            "thresholding": false,
            "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0,
            "timestep_spacing": "leading",
            "timestep_scaling": grid.timestep_scaling,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        })
    }

    /// The LCM grid this config samples on (its own keys, or `LCMScheduler`'s defaults).
    pub fn lcm_grid(&self) -> LcmGrid {
        LcmGrid { original_inference_steps: self.original_inference_steps, timestep_scaling: self.timestep_scaling }
    }

    /// `timestep_spacing`, or the default of the sampler reading it.
    pub fn spacing_or(&self, default: TimestepSpacing) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(default)
    }

    /// The parsed JSON object the config came from.
    pub fn raw(&self) -> &Map<String, Value> {
        &self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sd15() -> &'static str {
        include_str!("../../configs/reference/sd15_scheduler_config.json")
    }

    #[test]
    fn parses_sd15_pndm_config() {
        let c = SchedulerConfig::from_json_str(sd15()).unwrap();
        assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!((c.beta_start, c.beta_end), (0.00085, 0.012));
        assert_eq!(c.steps_offset, 1);
        assert_eq!(c.set_alpha_to_one, Some(false));
        assert_eq!(c.clip_sample, Some(false));
        // absent: each sampler's own default
        assert_eq!(c.timestep_spacing, None);
        assert_eq!(c.spacing_or(TimestepSpacing::Leading), TimestepSpacing::Leading);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
    }

    #[test]
    fn python_infinity_is_accepted() {
        let c = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity, "note": "NaN -Infinity"}"#,
        )
        .unwrap();
        c.check_supported(SchedulerKind::Dpmpp2m).unwrap();
        let c = SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        let e = c.check_supported(SchedulerKind::Dpmpp2m).unwrap_err().to_string();
        assert!(e.contains("lambda_min_clipped") && e.contains("-5.1"), "{e}");
        // unipc does not read it
        c.check_supported(SchedulerKind::Unipc).unwrap();
    }

    #[test]
    fn unsupported_values_name_key_and_value() {
        for (key, value) in [
            ("beta_schedule", json!("sigmoid")),
            ("prediction_type", json!("flow_prediction")),
            ("timestep_spacing", json!("karras")),
            ("final_sigmas_type", json!("one")),
            ("variance_type", json!("learned_range")),
            ("solver_order", json!(4)),
            ("beta_start", json!("small")),
        ] {
            let mut v: Value = serde_json::from_str(sd15()).unwrap();
            v[key] = value.clone();
            let e = SchedulerConfig::from_json(&v).unwrap_err().to_string();
            let shown = value.as_str().map(str::to_string).unwrap_or(value.to_string());
            assert!(e.contains(key) && e.contains(&shown), "{e}");
        }
        let mut v: Value = serde_json::from_str(sd15()).unwrap();
        v["thresholding"] = json!(true);
        v["algorithm_type"] = json!("sde-dpmsolver++");
        let c = SchedulerConfig::from_json(&v).unwrap();
        let e = c.check_supported(SchedulerKind::Ddim).unwrap_err().to_string();
        assert!(e.contains("thresholding") && e.contains("true"), "{e}");
        let e = c.check_supported(SchedulerKind::Dpmpp2m).unwrap_err().to_string();
        assert!(e.contains("thresholding"), "{e}");
        // Euler reads neither key
        c.check_supported(SchedulerKind::Euler).unwrap();
        v["thresholding"] = json!(false);
        let e =
            SchedulerConfig::from_json(&v).unwrap().check_supported(SchedulerKind::Dpmpp2m).unwrap_err().to_string();
        assert!(e.contains("algorithm_type") && e.contains("sde-dpmsolver++"), "{e}");
    }

    #[test]
    fn reads_files_folders_and_pipeline_folders() {
        let dir = tempfile::tempdir().unwrap();
        let sched = dir.path().join("scheduler");
        std::fs::create_dir(&sched).unwrap();
        std::fs::write(sched.join("scheduler_config.json"), r#"{"lambda_min_clipped": -Infinity, "steps_offset": 1}"#)
            .unwrap();
        for p in [dir.path().to_path_buf(), sched.clone(), sched.join("scheduler_config.json")] {
            assert_eq!(SchedulerConfig::from_path(&p).unwrap().steps_offset, 1);
        }
        std::fs::write(sched.join("scheduler_config.json"), "{").unwrap();
        let e = format!("{:#}", SchedulerConfig::from_path(&sched).unwrap_err());
        assert!(e.contains("scheduler_config.json"), "{e}");
    }

    #[test]
    fn impossible_lcm_keys_name_key_and_value() {
        for (key, value, shown) in [
            ("original_inference_steps", json!(0), "0"),
            ("original_inference_steps", json!(1001), "1001"),
            ("timestep_scaling", json!(0.0), "0"),
            ("timestep_scaling", json!(-10.0), "-10"),
            ("thresholding", json!(true), "true"),
        ] {
            let mut v: Value = serde_json::from_str(sd15()).unwrap();
            v[key] = value;
            let c = SchedulerConfig::from_json(&v).unwrap();
            let e = c.check_supported(SchedulerKind::Lcm).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(shown), "{e}");
            // the other samplers do not read the LCM keys
            if key != "thresholding" {
                c.check_supported(SchedulerKind::Ddim).unwrap();
            }
        }
    }

    #[test]
    fn lcm_json_keeps_the_noise_schedule() {
        let c = SchedulerConfig::from_json_str(sd15()).unwrap();
        let lcm = SchedulerConfig::from_json(&c.to_lcm_json(LcmGrid::default())).unwrap();
        assert_eq!(lcm.class_name.as_deref(), Some("LCMScheduler"));
        assert_eq!((lcm.beta_schedule, lcm.beta_start, lcm.beta_end), (c.beta_schedule, c.beta_start, c.beta_end));
        assert_eq!((lcm.original_inference_steps, lcm.timestep_scaling, lcm.clip_sample), (50, 10.0, Some(false)));
        lcm.check_supported(SchedulerKind::Lcm).unwrap();
        let other = SchedulerConfig::from_json(&c.to_lcm_json(LcmGrid { original_inference_steps: 20, timestep_scaling: 5.0 })).unwrap();
        assert_eq!((other.original_inference_steps, other.timestep_scaling), (20, 5.0));
    }

    #[test]
    fn trained_betas_length_is_checked() {
        let e = SchedulerConfig::from_json(&json!({"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trained_betas"), "{e}");
    }
}
