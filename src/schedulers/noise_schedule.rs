//! The one noise schedule (betas, alphas_cumprod, sigmas) that the trainer and every sampler share.
//!
//! diffusers builds betas and their cumulative product in float32 (`torch.linspace`,
//! `torch.cumprod`), and computing them in float64 instead moves the small sigmas by ~1e-5
//! relative (cancellation in `1 - alphas_cumprod`), enough to fail a tight parity test. So the
//! arrays are the exact float32 values diffusers gets (made with LibTorch's own float32 kernels),
//! held as f64 so that everything derived from them is computed in double precision.
use super::config::{BetaSchedule, PredictionType, SchedulerConfig};
use anyhow::Result;
use tch::{Device, Kind, Tensor};

#[derive(Debug)]
pub struct NoiseSchedule {
    config: SchedulerConfig,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    sigmas: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f32>,
    sqrt_one_minus_alphas_cumprod: Vec<f32>,
}

/// Glide's cosine schedule: betas from alpha_bar(t) = cos²((t + 0.008) / 1.008 · π/2), in float64
/// like diffusers' `betas_for_alpha_bar`, capped at 0.999.
fn cosine_betas(n: usize) -> Vec<f64> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
        })
        .collect()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view(-1)).expect("float tensor to vec")
}

/// `torch.cumprod` in float32 (LibTorch accumulates in double and rounds each partial product).
fn cumprod_f32(x: &[f32]) -> Vec<f32> {
    to_vec(&Tensor::from_slice(x).cumprod(0, Kind::Float))
}

/// diffusers' float32 betas for the config.
fn betas_f32(c: &SchedulerConfig) -> Vec<f32> {
    let n = c.num_train_timesteps as i64;
    let opts = (Kind::Float, Device::Cpu);
    if let Some(b) = &c.trained_betas {
        return b.iter().map(|&x| x as f32).collect();
    }
    match c.beta_schedule {
        BetaSchedule::Linear => to_vec(&Tensor::linspace(c.beta_start, c.beta_end, n, opts)),
        BetaSchedule::ScaledLinear => {
            to_vec(&Tensor::linspace(c.beta_start.powf(0.5), c.beta_end.powf(0.5), n, opts).pow_tensor_scalar(2i64))
        }
        BetaSchedule::SquaredcosCapV2 => cosine_betas(c.num_train_timesteps).into_iter().map(|b| b as f32).collect(),
    }
}

/// "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1: shift and scale
/// sqrt(alphas_cumprod) so that the last step has zero SNR. float32, in diffusers' operation order.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut s = sqrt_f32(&cumprod_f32(&alphas));
    let (s0, st) = (s[0], s[s.len() - 1]);
    let scale = s0 / (s0 - st);
    s.iter_mut().for_each(|x| *x = (*x - st) * scale);
    let ab: Vec<f32> = s.iter().map(|x| x * x).collect();
    let mut out = vec![1.0 - ab[0]];
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// Elementwise float32 square root through LibTorch: its CPU kernel (MKL's vector sqrt) is not
/// always correctly rounded, and the tables must carry diffusers' exact values.
fn sqrt_f32(x: &[f32]) -> Vec<f32> {
    to_vec(&Tensor::from_slice(x).sqrt())
}

impl NoiseSchedule {
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let mut betas = betas_f32(&config);
        if config.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        let ac = cumprod_f32(&alphas);
        // The sigma-based samplers need a finite terminal sigma under zero SNR; diffusers pins
        // alphas_cumprod[-1] to 2^-24 for them (not for DDPM/DDIM or training).
        let mut ac_sigma = ac.clone();
        if let Some(last) = ac_sigma.last_mut().filter(|_| config.rescale_betas_zero_snr) {
            *last = 2f32.powi(-24);
        }
        let snr_inv: Vec<f32> = ac_sigma.iter().map(|&a| (1.0 - a) / a).collect();
        let one_minus: Vec<f32> = ac.iter().map(|&a| 1.0 - a).collect();
        Ok(NoiseSchedule {
            betas: betas.iter().map(|&b| b as f64).collect(),
            alphas_cumprod: ac.iter().map(|&a| a as f64).collect(),
            sigmas: sqrt_f32(&snr_inv).into_iter().map(f64::from).collect(),
            sqrt_alphas_cumprod: sqrt_f32(&ac),
            sqrt_one_minus_alphas_cumprod: sqrt_f32(&one_minus),
            config,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.config.prediction_type
    }

    /// β_t, t = 0..T.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t = Π(1 - β), t = 0..T (without the zero-SNR pin).
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) in float32 as diffusers, ascending in t (index = timestep).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// (sqrt(ᾱ_t), sqrt(1 - ᾱ_t)) per sample, shaped (b, 1, 1, ...) like `like`, in its dtype
    /// (diffusers' float32 values, cast).
    pub fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let b = like.size()[0];
        assert_eq!(timesteps.size(), [b], "timesteps must be a (b,) tensor with one entry per sample");
        let device = like.device();
        let t = timesteps.to_device(device).to_kind(Kind::Int64);
        let mut shape = vec![b];
        shape.resize(like.dim(), 1);
        let pick = |table: &[f32]| {
            Tensor::from_slice(table).to_device(device).index_select(0, &t).reshape(&shape).to_kind(like.kind())
        };
        (pick(&self.sqrt_alphas_cumprod), pick(&self.sqrt_one_minus_alphas_cumprod))
    }

    /// The forward process q(x_t | x_0): sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·noise, one timestep per sample
    /// (int tensor (b,), values in 0..T). The coefficients are float32 (diffusers' values in fp32)
    /// cast to x0's dtype.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (a, s) = self.coefficients(timesteps, x0);
        a * x0 + s * noise
    }

    /// The v-prediction target sqrt(ᾱ_t)·noise - sqrt(1-ᾱ_t)·x0 (diffusers' `get_velocity`).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (a, s) = self.coefficients(timesteps, x0);
        a * noise - s * x0
    }

    /// What a UNet of `prediction_type` should output for x_t = add_noise(x0, noise, t).
    pub fn training_target(
        &self,
        prediction_type: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        match prediction_type {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => x0.shallow_clone(),
        }
    }

    /// `batch` timesteps uniform in 0..T (int64), drawn from LibTorch's generator of `device`
    /// like the diffusers training scripts' `torch.randint(0, T, (b,))`.
    pub fn sample_timesteps(&self, batch: i64, device: Device) -> Tensor {
        Tensor::randint(self.num_train_timesteps() as i64, [batch], (Kind::Int64, device))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> SchedulerConfig {
        SchedulerConfig::from_json_str(json).unwrap()
    }

    #[test]
    fn cosine_betas_are_not_zero() {
        // the integer-division bug of two Rust ports made them all zero
        let b = cosine_betas(1000);
        assert!(b.iter().all(|&x| x > 0.0 && x <= 0.999));
        assert_eq!(b[999], 0.999);
    }

    #[test]
    fn scaled_linear_ends() {
        let s = NoiseSchedule::new(config(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#,
        ))
        .unwrap();
        assert!((s.betas()[0] - 0.00085).abs() < 1e-9);
        assert!((s.betas()[999] - 0.012).abs() < 1e-8);
        assert!(s.alphas_cumprod().windows(2).all(|w| w[1] < w[0]));
        let ac = s.alphas_cumprod()[500];
        assert!((s.sigmas()[500] - ((1.0 - ac) / ac).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let s = NoiseSchedule::new(config(r#"{"rescale_betas_zero_snr": true}"#)).unwrap();
        assert_eq!(s.alphas_cumprod()[999], 0.0);
        // pinned for the sigma samplers: sqrt((1 - 2^-24) / 2^-24)
        assert!((s.sigmas()[999] - 4096.0).abs() < 1e-3);
    }

    #[test]
    fn add_noise_and_velocity_recover_x0() {
        let s = NoiseSchedule::new(SchedulerConfig::default()).unwrap();
        let x0 = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).reshape([2, 2]);
        let noise = Tensor::from_slice(&[0.3f32, 0.1, -0.7, 0.2]).reshape([2, 2]);
        let t = Tensor::from_slice(&[0i64, 999]);
        let xt = s.add_noise(&x0, &noise, &t);
        let v = s.velocity(&x0, &noise, &t);
        // x0 = sqrt(a)·x_t - sqrt(1-a)·v
        let (a, b) = s.coefficients(&t, &x0);
        let back = a * &xt - b * &v;
        assert!((back - &x0).abs().max().double_value(&[]) < 1e-5);
        let target = s.training_target(PredictionType::Epsilon, &x0, &noise, &t);
        assert_eq!(target.double_value(&[1, 0]), noise.double_value(&[1, 0]));
    }
}
