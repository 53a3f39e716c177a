//! `method: lcm` and its `lcm:` section: latent consistency distillation (LCD, Luo et al. 2023,
//! "Latent Consistency Models") of the student, with the defaults of diffusers'
//! `train_lcm_distill_sd_wds.py` (and `train_lcm_distill_sdxl_wds.py`'s guidance range on an SDXL
//! teacher). The step itself is `distill/lcd.rs`.
use crate::config_error::{invalid, ConfigError};
use crate::schedulers::config::{LcmGrid, LCM_ORIGINAL_INFERENCE_STEPS};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a run trains: knowledge distillation (BK-SDM) or latent consistency distillation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// BK-SDM's task + output KD + feature KD on one noise level per sample.
    #[default]
    Kd,
    /// Latent consistency distillation: the student learns to jump along the teacher's
    /// guided probability-flow ODE, so it samples in 1-8 steps with the LCM scheduler.
    Lcm,
}

impl Method {
    pub fn is_kd(&self) -> bool {
        *self == Method::Kd
    }
}

/// The consistency loss between the online student's and the target network's predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyLoss {
    /// Mean squared error (the script's default `--loss_type l2`).
    #[default]
    L2,
    /// Pseudo-Huber, `mean(sqrt(d² + c²) - c)` with c = `huber_c` (the published recipes').
    Huber,
}

/// The `lcm:` section (used when `method: lcm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LcmConfig {
    /// Points of the DDIM solver's skipping grid (N; k = num_train_timesteps / N).
    pub num_ddim_timesteps: usize,
    /// Guidance scale w ~ U[w_min, w_max] per sample, in the LCM convention
    /// `cond + w·(cond − uncond)` (an Imagen scale of w + 1). Unset: the teacher family's
    /// default (`fill_family_defaults`): 5 and 15 for SD-1.x/2.x, 3 and 15 for SDXL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub w_min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub w_max: Option<f64>,
    /// Width of the guidance embedding the student gains (`time_embedding.cond_proj`).
    pub time_cond_proj_dim: i64,
    /// s in the boundary scalings c_skip = σd² / ((s·t)² + σd²), c_out = s·t / sqrt((s·t)² + σd²).
    pub timestep_scaling: f64,
    /// Decay of the target network, an EMA of the student updated after every optimizer step.
    pub target_ema: f64,
    pub loss: ConsistencyLoss,
    /// c of the pseudo-Huber loss.
    pub huber_c: f64,
    /// λ of output KD beside the consistency loss: the MSE between the student's raw output and
    /// the teacher's guided output `out_c + w·(out_c − out_u)` at the same noisy latents, t_{n+k}
    /// and w (`lcd.rs`). 0 (the default, diffusers' script): off.
    pub output_kd: f64,
    /// Where the student's weights start: a KD run's checkpoint folder, its `final/`, or a
    /// diffusers UNet folder of the student's architecture. Unset: `student_init` (the teacher
    /// pruned on the spot by the copy map, or random).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub student_init: Option<PathBuf>,
}

impl Default for LcmConfig {
    /// diffusers' `train_lcm_distill_sd_wds.py` defaults for SD-1.x/2.x.
    fn default() -> Self {
        LcmConfig {
            num_ddim_timesteps: LCM_ORIGINAL_INFERENCE_STEPS,
            w_min: None,
            w_max: None,
            time_cond_proj_dim: 256,
            timestep_scaling: 10.0,
            target_ema: 0.95,
            loss: ConsistencyLoss::L2,
            huber_c: 0.001,
            output_kd: 0.0,
            student_init: None,
        }
    }
}

/// The guidance range of diffusers' `train_lcm_distill_sd_wds.py` (`--w_min`, `--w_max`).
pub const SD_GUIDANCE_RANGE: (f64, f64) = (5.0, 15.0);
/// The guidance range of diffusers' `train_lcm_distill_sdxl_wds.py`.
pub const SDXL_GUIDANCE_RANGE: (f64, f64) = (3.0, 15.0);

impl LcmConfig {
    pub fn is_default(&self) -> bool {
        *self == LcmConfig::default()
    }

    /// [w_min, w_max], once `fill_family_defaults` has run (an unset bound is then SD-1.x/2.x's).
    pub fn guidance_range(&self) -> (f64, f64) {
        (self.w_min.unwrap_or(SD_GUIDANCE_RANGE.0), self.w_max.unwrap_or(SD_GUIDANCE_RANGE.1))
    }

    /// Sets the unset guidance bounds to the teacher family's defaults (`sdxl`: SDXL's 3 and 15,
    /// else 5 and 15), so that the run's recorded config names them. An SD section left wholly
    /// at its defaults stays unset: the recorded config, and with it the resume hash, is the one
    /// SD runs had before SDXL had its own defaults (an SD section with other keys set recorded
    /// 5 and 15 then, and does now). Checks w_min <= w_max once both are known.
    pub fn fill_family_defaults(&mut self, sdxl: bool) -> Result<(), ConfigError> {
        if sdxl || !self.is_default() {
            let (lo, hi) = if sdxl { SDXL_GUIDANCE_RANGE } else { SD_GUIDANCE_RANGE };
            self.w_min.get_or_insert(lo);
            self.w_max.get_or_insert(hi);
        }
        let (lo, hi) = self.guidance_range();
        if lo > hi {
            let family = if sdxl { "SDXL" } else { "SD-1.x/2.x" };
            return Err(invalid("lcm.w_min", format!("lcm.w_min = {lo} is above lcm.w_max = {hi} (an unset bound is the {family} default)")));
        }
        Ok(())
    }

    /// The grid the student is distilled on, which its LCM sampler must repeat.
    pub fn grid(&self) -> LcmGrid {
        LcmGrid { original_inference_steps: self.num_ddim_timesteps, timestep_scaling: self.timestep_scaling }
    }

    /// The `lcm:` section a run's recorded config (a checkpoint's `config`) holds; the defaults
    /// when it has none (a `kd` run, or one at every default).
    pub fn of_recorded(run: &serde_json::Value) -> Result<LcmConfig, serde_json::Error> {
        match run.get("lcm") {
            Some(v) => serde_json::from_value(v.clone()),
            None => Ok(LcmConfig::default()),
        }
    }

    pub fn resolve_paths(&mut self, base: &Path) {
        if let Some(p) = self.student_init.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
    }

    /// The section's own checks, each naming the key and value. That `num_ddim_timesteps`
    /// divides the teacher's `num_train_timesteps` is checked when the teacher is read
    /// (`lcd::DdimSolver::new`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.num_ddim_timesteps;
        if n < 1 {
            return Err(invalid("lcm.num_ddim_timesteps", format!("lcm.num_ddim_timesteps = {n}: must be >= 1")));
        }
        for (key, v) in [("lcm.w_min", self.w_min), ("lcm.w_max", self.w_max)] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(invalid(key, format!("{key} = {v}: must be a finite number >= 0")));
            }
        }
        // an unset bound is the teacher family's (`fill_family_defaults` checks again): refused
        // here when it is above every family's
        let lo = self.w_min.unwrap_or(SDXL_GUIDANCE_RANGE.0.min(SD_GUIDANCE_RANGE.0));
        let hi = self.w_max.unwrap_or(SDXL_GUIDANCE_RANGE.1.max(SD_GUIDANCE_RANGE.1));
        if lo > hi {
            return Err(invalid("lcm.w_min", format!("lcm.w_min = {lo} is above lcm.w_max = {hi}")));
        }
        let d = self.time_cond_proj_dim;
        if d < 2 || d % 2 == 1 || d > 1 << 16 {
            return Err(invalid(
                "lcm.time_cond_proj_dim",
                format!("lcm.time_cond_proj_dim = {d}: must be even, at least 2 and at most 65536 (the sin | cos embedding has two halves)"),
            ));
        }
        if !(self.timestep_scaling.is_finite() && self.timestep_scaling > 0.0) {
            return Err(invalid("lcm.timestep_scaling", format!("lcm.timestep_scaling = {}: must be > 0", self.timestep_scaling)));
        }
        if !(self.target_ema >= 0.0 && self.target_ema < 1.0) {
            return Err(invalid("lcm.target_ema", format!("lcm.target_ema = {}: must be in [0, 1)", self.target_ema)));
        }
        if !(self.huber_c.is_finite() && self.huber_c > 0.0) {
            return Err(invalid("lcm.huber_c", format!("lcm.huber_c = {}: must be > 0", self.huber_c)));
        }
        if !(self.output_kd.is_finite() && self.output_kd >= 0.0) {
            return Err(invalid("lcm.output_kd", format!("lcm.output_kd = {}: must be a finite number >= 0", self.output_kd)));
        }
        if let Some(p) = self.student_init.as_ref().filter(|p| !p.is_dir()) {
            return Err(invalid(
                "lcm.student_init",
                format!("lcm.student_init = {}: no such folder (a KD checkpoint, a run's final/ or a UNet folder)", p.display()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let cases: [(fn(&mut LcmConfig), &str); 8] = [
            (|c| c.output_kd = -1.0, "lcm.output_kd"),
            (|c| c.num_ddim_timesteps = 0, "lcm.num_ddim_timesteps"),
            (|c| (c.w_min, c.w_max) = (Some(16.0), Some(15.0)), "lcm.w_min"),
            (|c| c.w_max = Some(f64::NAN), "lcm.w_max"),
            (|c| c.time_cond_proj_dim = 255, "lcm.time_cond_proj_dim"),
            (|c| c.time_cond_proj_dim = 0, "lcm.time_cond_proj_dim"),
            (|c| c.target_ema = 1.0, "lcm.target_ema"),
            (|c| c.huber_c = 0.0, "lcm.huber_c"),
        ];
        for (set, key) in cases {
            let mut c = LcmConfig::default();
            set(&mut c);
            let e = c.validate().unwrap_err();
            assert_eq!(e.key, key, "{}", e.message);
            assert!(e.message.contains(key), "{}", e.message);
        }
        assert!(LcmConfig::default().validate().is_ok());
    }

    /// The family's guidance range fills the unset bounds (diffusers' SD script: 5, 15; its SDXL
    /// script: 3, 15); a fully default SD section stays unset (its recorded config is unchanged);
    /// an SDXL default above a set w_max is refused naming the key.
    #[test]
    fn guidance_range_defaults_by_family() {
        let mut sdxl = LcmConfig::default();
        sdxl.fill_family_defaults(true).unwrap();
        assert_eq!((sdxl.w_min, sdxl.w_max, sdxl.guidance_range()), (Some(3.0), Some(15.0), (3.0, 15.0)));
        let mut sd = LcmConfig::default();
        sd.fill_family_defaults(false).unwrap();
        assert_eq!((sd.is_default(), sd.guidance_range()), (true, (5.0, 15.0)));
        let mut sd = LcmConfig { loss: ConsistencyLoss::Huber, ..LcmConfig::default() };
        sd.fill_family_defaults(false).unwrap();
        assert_eq!((sd.w_min, sd.w_max), (Some(5.0), Some(15.0)));
        let mut set = LcmConfig { w_min: Some(4.0), ..LcmConfig::default() };
        set.fill_family_defaults(true).unwrap();
        assert_eq!(set.guidance_range(), (4.0, 15.0));
        let e = LcmConfig { w_max: Some(2.0), ..LcmConfig::default() }.fill_family_defaults(true).unwrap_err();
        assert_eq!(e.key, "lcm.w_min", "{}", e.message);
    }
}
