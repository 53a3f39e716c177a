//! Diffusion samplers that reproduce diffusers' schedulers step for step, on one shared
//! `NoiseSchedule`.
//!
//! A `Sampler` is built fresh for each run (`SchedulerKind::build`), is keyed by step index (no
//! look-up of a step by its timestep value), keeps its multistep history private, and does its
//! arithmetic where diffusers does: tensors in float32, per-step scalars in float32 (emulated, so
//! that cancellations such as λ_t - λ_s round the same way), schedules in float64.
//!
//! The loop the text-to-image pipeline runs, in diffusers' order (so that `--seed S` gives
//! diffusers' images with `torch.Generator("cpu").manual_seed(S)`):
//!
//! ```ignore
//! tch::manual_seed(seed);                       // LibTorch's CPU generator = torch.Generator("cpu")
//! let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_path(dir)?)?);
//! let mut sampler = kind.build(&schedule, steps)?;
//! let mut latents = randn(&[b, 4, h / 8, w / 8], Kind::Float, device) * sampler.init_noise_sigma();
//! for i in 0..sampler.num_inference_steps() {
//!     let x = sampler.scale_model_input(&latents, i);     // (doubled for CFG)
//!     let eps = unet(&x, &sampler.timestep_tensor(i, device), ...);   // then guidance
//!     latents = sampler.step(&eps, i, &latents);          // DDPM / Euler-a draw their noise here
//! }
//! ```
//!
//! Nothing else may draw from LibTorch's CPU generator between the seed and the end of the loop.
pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod dpmpp_2m;
pub mod euler;
pub mod lcm;
pub mod noise_schedule;
pub mod pndm;
pub mod timesteps;
pub mod unipc;

pub use config::{
    BetaSchedule, FinalSigmas, PredictionType, SchedulerConfig, SolverType, TimestepSpacing, VarianceType,
};
pub use noise_schedule::NoiseSchedule;

use anyhow::{bail, Result};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One sampling run: a fixed list of timesteps and the update that goes from step i to i+1.
pub trait Sampler: Send {
    fn kind(&self) -> SchedulerKind;

    /// The timestep given to the UNet at each step, as diffusers computes it: integers, or float32
    /// values for Euler (fractional with linspace spacing). Every value is exact in f32.
    fn timesteps(&self) -> &[f64];

    /// The UNet's timestep at `step_index` as a 0-dim float32 tensor on `device` (exact: every
    /// value is a float32; the UNet casts to float32 like diffusers).
    fn timestep_tensor(&self, step_index: usize, device: Device) -> Tensor {
        Tensor::from(self.timesteps()[step_index] as f32).to_device(device)
    }

    /// How many times `step` is called (UNet evaluations): the requested steps, but n + 1 for
    /// PNDM's PLMS and n + 9 with its Runge-Kutta warm-up, as diffusers' pipelines loop.
    fn num_inference_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// σ at each step plus the final one (n + 1 float32 values) for the σ-based samplers (Euler,
    /// Euler ancestral, DPM++, UniPC); empty for DDPM and DDIM.
    fn sigmas(&self) -> &[f32] {
        &[]
    }

    /// What the initial unit-variance noise is multiplied by (1 but for the Euler samplers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet input at `step_index` (Euler divides by sqrt(σ² + 1); the others return `sample`).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Tensor {
        sample.shallow_clone()
    }

    /// x_{i+1} from the model output at `step_index` and the current sample x_i. Steps must be
    /// taken in order 0, 1, 2, ... (multistep samplers keep history). The result has `sample`'s
    /// dtype; the arithmetic is float32 (`step_f32`).
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor) -> Tensor {
        let (kind, total) = (self.kind(), self.num_inference_steps());
        let taken = self.steps_taken();
        assert!(step_index < total, "{kind}: step index {step_index} past the last step {}", total - 1);
        assert_eq!(step_index, *taken, "{kind}: steps must be taken in order; expected step {taken}, got {step_index}");
        *taken += 1;
        let (mo, x) = (model_output.to_kind(Kind::Float), sample.to_kind(Kind::Float));
        self.step_f32(&mo, step_index, &x, model_output.kind()).to_kind(sample.kind())
    }

    /// The update of `step` on float32 `mo` and `x`. Step noise is drawn in `noise_kind`, the model
    /// output's dtype, as diffusers draws it.
    fn step_f32(&mut self, mo: &Tensor, step_index: usize, x: &Tensor, noise_kind: Kind) -> Tensor;

    /// How many steps were taken: `step` checks that they come in order.
    fn steps_taken(&mut self) -> &mut usize;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SchedulerKind {
    Ddpm,
    Ddim,
    Euler,
    EulerAncestral,
    /// DPM-Solver++ multistep, order 2 (midpoint) by default.
    Dpmpp2m,
    /// UniPC multistep (bh2, predict-x0, corrector on): sdkd's default, as in Segmind's API.
    #[default]
    Unipc,
    /// PNDM / PLMS (`skip_prk_steps`): the SD-1.x pipelines' default, BK-SDM's evaluation sampler.
    Pndm,
    /// The latent consistency model sampler, 1 to 8 steps for LCM-distilled UNets and LCM-LoRAs.
    Lcm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 8] = [
        SchedulerKind::Ddpm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Dpmpp2m,
        SchedulerKind::Unipc,
        SchedulerKind::Pndm,
        SchedulerKind::Lcm,
    ];

    /// The name sdkd uses on the command line and in PNG metadata.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::Dpmpp2m => "dpmpp_2m",
            SchedulerKind::Unipc => "unipc",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// Whether its steps draw noise (DDPM's variance, Euler ancestral's σ_up, LCM's re-noising),
    /// from the same generator as the initial latents.
    pub fn draws_step_noise(self) -> bool {
        matches!(self, SchedulerKind::Ddpm | SchedulerKind::EulerAncestral | SchedulerKind::Lcm)
    }

    /// The diffusers class it reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            SchedulerKind::Ddpm => "DDPMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::Dpmpp2m => "DPMSolverMultistepScheduler",
            SchedulerKind::Unipc => "UniPCMultistepScheduler",
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Lcm => "LCMScheduler",
        }
    }

    /// A sampler for `num_inference_steps` steps on `schedule`, configured by its config.
    pub fn build(self, schedule: &Arc<NoiseSchedule>, num_inference_steps: usize) -> Result<Box<dyn Sampler>> {
        let config = schedule.config();
        config.check_supported(self)?;
        let max = schedule.num_train_timesteps();
        if num_inference_steps == 0 || num_inference_steps > max {
            bail!("{self}: {num_inference_steps} inference steps is out of range (1 to num_train_timesteps = {max})");
        }
        let schedule = Arc::clone(schedule);
        Ok(match self {
            SchedulerKind::Ddpm => Box::new(ddpm::Ddpm::new(schedule, num_inference_steps)?),
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(schedule, num_inference_steps)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(schedule, num_inference_steps)?),
            SchedulerKind::EulerAncestral => Box::new(euler::Euler::ancestral(schedule, num_inference_steps)?),
            SchedulerKind::Dpmpp2m => Box::new(dpmpp_2m::DpmSolverPP::new(schedule, num_inference_steps)?),
            SchedulerKind::Unipc => Box::new(unipc::UniPc::new(schedule, num_inference_steps)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(schedule, num_inference_steps)?),
            SchedulerKind::Lcm => Box::new(lcm::Lcm::new(schedule, num_inference_steps)?),
        })
    }

    /// A sampler on the given timesteps instead of a step count (diffusers' `timesteps=`): only
    /// LCM takes them in sdkd; they must descend strictly and lie in 0..num_train_timesteps.
    pub fn build_with_timesteps(self, schedule: &Arc<NoiseSchedule>, timesteps: &[i64]) -> Result<Box<dyn Sampler>> {
        schedule.config().check_supported(self)?;
        match self {
            SchedulerKind::Lcm => Ok(Box::new(lcm::Lcm::with_timesteps(Arc::clone(schedule), timesteps)?)),
            _ => bail!("{self}: custom timesteps are supported only by the lcm sampler in sdkd (give a step count instead)"),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = anyhow::Error;
    /// sdkd's names, a few common spellings, and diffusers' class names; case-insensitive.
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match key.as_str() {
            "ddpm" | "ddpmscheduler" => SchedulerKind::Ddpm,
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "euler" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "euler_a" | "euler_ancestral" | "eulerancestraldiscretescheduler" => SchedulerKind::EulerAncestral,
            "dpmpp_2m" | "dpm++2m" | "dpm++_2m" | "dpmpp2m" | "dpmsolvermultistepscheduler" => SchedulerKind::Dpmpp2m,
            "unipc" | "unipcmultistepscheduler" => SchedulerKind::Unipc,
            "pndm" | "plms" | "pndmscheduler" => SchedulerKind::Pndm,
            "lcm" | "lcmscheduler" => SchedulerKind::Lcm,
            _ => bail!("unknown scheduler {s:?} (ddpm, ddim, euler, euler_a, dpmpp_2m, unipc, pndm, lcm)"),
        })
    }
}

/// Written as its `name`, read through `FromStr` (any accepted spelling), so a run YAML's
/// `validation.scheduler` is checked when it loads and the error keeps serde_yaml's key path.
impl serde::Serialize for SchedulerKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for SchedulerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        crate::runtime::parsed(d)
    }
}

/// Standard normal noise drawn as diffusers' `randn_tensor` does with a CPU `torch.Generator`:
/// on the CPU from LibTorch's default generator (seed it with `tch::manual_seed`), in `kind`,
/// then moved to `device`. The samplers draw their step noise through this too, so one seed
/// reproduces diffusers' latents and every step's noise, in order.
pub fn randn(shape: &[i64], kind: Kind, device: Device) -> Tensor {
    Tensor::randn(shape, (kind, Device::Cpu)).to_device(device)
}

/// float32 scalar maths as diffusers does it, on 0-dim float32 tensors: + - * / are IEEE-exact in
/// f32; sqrt, ln, exp and expm1 are LibTorch's own, since its vectorised kernels are not always
/// correctly rounded (sqrt is an ulp off IEEE for ~15% of inputs in PyTorch 2.13's CPU build).
pub(crate) mod f32x {
    use tch::Tensor;

    fn libtorch(x: f32, f: impl Fn(&Tensor) -> Tensor) -> f32 {
        f(&Tensor::from(x)).double_value(&[]) as f32
    }
    /// `x ** 0.5`
    pub fn sqrt(x: f32) -> f32 {
        libtorch(x, Tensor::sqrt)
    }
    pub fn ln(x: f32) -> f32 {
        libtorch(x, Tensor::log)
    }
    pub fn exp(x: f32) -> f32 {
        libtorch(x, Tensor::exp)
    }
    pub fn expm1(x: f32) -> f32 {
        libtorch(x, Tensor::expm1)
    }
    /// diffusers' `_sigma_to_alpha_sigma_t`: α = 1/sqrt(σ²+1), σ_t = σ·α.
    pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
        let alpha = 1.0 / sqrt(sigma * sigma + 1.0);
        (alpha, sigma * alpha)
    }
    /// log-SNR λ = ln α - ln σ.
    pub fn lambda(alpha: f32, sigma: f32) -> f32 {
        ln(alpha) - ln(sigma)
    }
}

/// `tensor * s` for a float32 scalar (exact in f64, so LibTorch rounds it back to the same f32).
pub(crate) fn scale(t: &Tensor, s: f32) -> Tensor {
    t * (s as f64)
}

/// `tensor / s` for a float32 scalar.
pub(crate) fn div(t: &Tensor, s: f32) -> Tensor {
    t / (s as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_parse() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.diffusers_class().parse::<SchedulerKind>().unwrap(), k);
        }
        assert_eq!("Euler_Ancestral".parse::<SchedulerKind>().unwrap(), SchedulerKind::EulerAncestral);
        assert_eq!("DPM++2M".parse::<SchedulerKind>().unwrap(), SchedulerKind::Dpmpp2m);
        assert_eq!(SchedulerKind::default(), SchedulerKind::Unipc);
        assert_eq!("PLMS".parse::<SchedulerKind>().unwrap(), SchedulerKind::Pndm);
        let e = "lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(e.contains("lms"), "{e}");
    }

    #[test]
    fn f32_lambda_at_zero_sigma_is_infinite() {
        let (a, s) = f32x::alpha_sigma(0.0);
        assert_eq!((a, s), (1.0, 0.0));
        assert_eq!(f32x::lambda(a, s), f32::INFINITY);
        assert_eq!(f32x::expm1(-f32::INFINITY), -1.0);
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn steps_out_of_order_are_a_bug() {
        let s = Arc::new(NoiseSchedule::new(SchedulerConfig::default()).unwrap());
        let mut sampler = SchedulerKind::Unipc.build(&s, 10).unwrap();
        let x = Tensor::zeros([1, 4, 2, 2], (Kind::Float, Device::Cpu));
        let _ = sampler.step(&x, 1, &x);
    }

    #[test]
    fn timestep_tensor_is_exact() {
        let s = Arc::new(NoiseSchedule::new(SchedulerConfig::default()).unwrap());
        let sampler = SchedulerKind::Euler.build(&s, 25).unwrap();
        let t = sampler.timestep_tensor(1, Device::Cpu);
        assert_eq!(t.dim(), 0);
        assert_eq!(t.double_value(&[]), sampler.timesteps()[1]);
        assert_ne!(sampler.timesteps()[1].fract(), 0.0, "linspace Euler timesteps are fractional");
    }

    #[test]
    fn build_rejects_bad_step_counts() {
        let s = Arc::new(NoiseSchedule::new(SchedulerConfig::default()).unwrap());
        for k in SchedulerKind::ALL {
            assert!(k.build(&s, 0).is_err());
            assert!(k.build(&s, 1001).is_err());
            let sampler = k.build(&s, 20).unwrap();
            // PNDM without skip_prk_steps (this config): 12 Runge-Kutta calls for 3 steps
            let calls = if k == SchedulerKind::Pndm { 29 } else { 20 };
            assert_eq!(sampler.num_inference_steps(), calls);
            assert_eq!(sampler.kind(), k);
        }
    }
}
