//! The latent consistency distillation (LCD) step of `method: lcm` (Luo et al. 2023, "Latent
//! Consistency Models", Algorithm 1), following diffusers' `train_lcm_distill_sd_wds.py` (and its
//! SDXL twin `train_lcm_distill_sdxl_wds.py`) step by step and dtype by dtype, beside the KD step
//! of `step.rs`:
//!
//! 1. per sample an index n of the DDIM solver's skipping grid: start t_{n+k} = (n+1)·k − 1, target
//!    t_n = t_{n+k} − k (0 at index 0); w ~ U[w_min, w_max] and its embedding;
//! 2. z = add_noise(latents, noise, t_{n+k});
//! 3. the online student at t_{n+k} with the w embedding, its x0 combined by the boundary
//!    scalings: `model_pred = c_skip(t_{n+k})·z + c_out(t_{n+k})·x0`;
//! 4. without gradients: the teacher on the text and the unconditional input, x0 and ε of each, CFG in
//!    the LCM convention `cond + w·(cond − uncond)` on both, one DDIM step to x_prev; the target
//!    network (an EMA of the student) at t_n on x_prev: `target = c_skip(t_n)·x_prev + c_out(t_n)·x0`;
//! 5. l2 or pseudo-Huber loss between them, plus `lcm.output_kd` × output KD when that is above
//!    0, backward.
//!
//! Output KD (BK-SDM's output-level term, Kim et al. 2023, moved into LCD): the MSE between the
//! student's raw UNet output at (z, t_{n+k}, text, w embedding) and the teacher's guided output at
//! the same z and t_{n+k}, `out_c + w·(out_c − out_u)` in the LCM convention, the same w — the
//! teacher calls of step 4 already make both. It pulls the student toward the teacher's one-step
//! guided prediction, which the consistency optimum departs from at large t (there x0 is the
//! ODE's endpoint, not the denoiser's mean): a regulariser, off by default. Feature KD has no
//! such target (CFG mixes two forwards' outputs, not their activations; the cond branch's
//! features are w = 0's) and is refused (`RunConfig::validate_method`).
//!
//! On an SDXL teacher every UNet call also takes the batch's time ids and pooled text embedding
//! (`added_cond_kwargs`); the unconditional teacher call has zeros for the text embedding and the
//! pooled one and keeps the batch's time ids, as the SDXL script (its `uncond_added_conditions`
//! swaps `text_embeds` alone).
//!
//! As in the script, the solver's ᾱ_prev table is float64 (numpy makes it from a list of Python
//! floats), so x_prev, the target network's x0 and the target are float64 until the loss; the
//! rest is float32. `Distiller` (step.rs) holds the `Consistency` state and steps the target EMA
//! after AdamW.
use super::encoder::{TextEmbeds, Unconditional};
use super::lcm::{ConsistencyLoss, LcmConfig};
use super::optim::Ema;
use crate::models::embeddings::guidance_scale_embedding;
use crate::models::unet::AddedCond;
use crate::models::{weights, Checkpointing, Init, Recompute, UNet};
use crate::schedulers::config::PredictionType;
use crate::schedulers::lcm::boundary_scalings;
use crate::schedulers::NoiseSchedule;
use anyhow::{anyhow, bail, ensure, Result};
use std::collections::BTreeSet;
use tch::{Device, Kind, Tensor};

/// Deterministic DDIM (η = 0) on the skipping grid of N points, as the script's `DDIMSolver`.
#[derive(Debug, Clone)]
pub struct DdimSolver {
    /// t_{n+k} of index n: (n + 1)·k − 1, i.e. 19, 39, ..., 999 for N = 50 of 1000.
    timesteps: Vec<i64>,
    /// ᾱ at index n's t_n (ᾱ_0 at index 0): the float32 table's values in float64.
    alphas_cumprod_prev: Vec<f64>,
    /// k = num_train_timesteps / N.
    skip: i64,
}

impl DdimSolver {
    /// The grid of `n` points over the schedule's timesteps; `n` must divide them.
    pub fn new(schedule: &NoiseSchedule, n: usize) -> Result<DdimSolver> {
        let total = schedule.num_train_timesteps();
        if n == 0 || n > total || total % n != 0 {
            bail!("lcm.num_ddim_timesteps = {n} must divide the teacher scheduler's num_train_timesteps = {total} (and not exceed it)");
        }
        let skip = (total / n) as i64;
        let timesteps: Vec<i64> = (1..=n as i64).map(|i| i * skip - 1).collect();
        let ac = schedule.alphas_cumprod();
        let alphas_cumprod_prev = std::iter::once(ac[0]).chain(timesteps[..n - 1].iter().map(|&t| ac[t as usize])).collect();
        Ok(DdimSolver { timesteps, alphas_cumprod_prev, skip })
    }

    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    pub fn alphas_cumprod_prev(&self) -> &[f64] {
        &self.alphas_cumprod_prev
    }

    /// (t_{n+k}, t_n) of each index (b,) int64, on the index's device.
    pub fn start_and_target(&self, index: &Tensor) -> (Tensor, Tensor) {
        let start = Tensor::from_slice(&self.timesteps).to_device(index.device()).index_select(0, index);
        let target = (&start - self.skip).clamp_min(0);
        (start, target)
    }

    /// x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev)·ε in float64 (the table's dtype).
    pub fn ddim_step(&self, pred_x0: &Tensor, pred_noise: &Tensor, index: &Tensor) -> Tensor {
        let mut shape = vec![index.size()[0]];
        shape.resize(pred_x0.dim(), 1);
        let a = Tensor::from_slice(&self.alphas_cumprod_prev).to_device(index.device()).index_select(0, index).reshape(&shape);
        let dir_xt = (-&a + 1.0).sqrt() * pred_noise;
        a.sqrt() * pred_x0 + dir_xt
    }
}

/// The x0 and ε a UNet output `out` at timesteps `t` on `sample` means (the script's
/// `get_predicted_original_sample` and `get_predicted_noise`), with float32 coefficients: a
/// float64 `sample` makes the results float64, as there.
pub fn x0_and_noise(prediction: PredictionType, schedule: &NoiseSchedule, out: &Tensor, t: &Tensor, sample: &Tensor) -> (Tensor, Tensor) {
    let (alpha, sigma) = schedule.coefficients(t, out);
    match prediction {
        PredictionType::Epsilon => ((sample - &sigma * out) / &alpha, out.shallow_clone()),
        PredictionType::VPrediction => (&alpha * sample - &sigma * out, &alpha * out + &sigma * sample),
        PredictionType::Sample => (out.shallow_clone(), (sample - &alpha * out) / &sigma),
    }
}

/// What one LCD micro-step draws: the solver index (b,) int64, the noise like the latents, and
/// w (b,) float32.
pub struct LcdInputs {
    pub index: Tensor,
    pub noise: Tensor,
    pub w: Tensor,
}

impl LcdInputs {
    /// From LibTorch's CPU generator, in the script's order (index, noise, w).
    pub fn draw(latents: &Tensor, cfg: &LcmConfig) -> LcdInputs {
        let b = latents.size()[0];
        let cpu = Device::Cpu;
        let index = Tensor::randint(cfg.num_ddim_timesteps as i64, [b], (Kind::Int64, cpu));
        let noise = Tensor::randn(latents.size(), (Kind::Float, cpu));
        let (w_min, w_max) = cfg.guidance_range();
        let w = Tensor::rand([b], (Kind::Float, cpu)) * (w_max - w_min) + w_min;
        LcdInputs { index, noise, w }
    }
}

/// One micro-step's logged values.
pub struct LcdTerms {
    /// The consistency loss (scalar, float32).
    pub loss: Tensor,
    /// The unweighted output-KD MSE, when `lcm.output_kd` > 0.
    pub output_kd: Option<Tensor>,
    /// The mean of the drawn guidance scales.
    pub w_mean: f64,
}

/// The LCD state beside the student: the solver, the target network (an EMA of the student,
/// evaluated without gradients) and the teacher's unconditional input.
pub struct Consistency {
    cfg: LcmConfig,
    solver: DdimSolver,
    /// The target network and its variables as the EMA's shadow; None for LCM-LoRA, whose
    /// target is the adapted student itself without gradients (diffusers'
    /// `train_lcm_distill_lora_sd_wds.py`: "we do not use a separate target network").
    target: Option<(UNet, Ema)>,
    /// The teacher's unconditional input: the encoded "" for SD-1.x/2.x (the SD script), zeros
    /// for SDXL (the SDXL script); float32.
    uncond: Unconditional,
}

impl Consistency {
    pub fn config(&self) -> &LcmConfig {
        &self.cfg
    }

    pub fn solver(&self) -> &DdimSolver {
        &self.solver
    }

    /// The target network's weights, by the student's parameter names (shallow).
    pub fn target_tensors(&self) -> Vec<(String, Tensor)> {
        self.target.as_ref().map(|(_, ema)| ema.state_tensors()).unwrap_or_default()
    }

    /// Whether there is a target network apart from the student (not for LCM-LoRA).
    pub fn has_target(&self) -> bool {
        self.target.is_some()
    }

    fn target_ema_mut(&mut self) -> Result<&mut Ema> {
        self.target.as_mut().map(|(_, ema)| ema).ok_or_else(|| anyhow::anyhow!("LCM-LoRA has no target network"))
    }

    /// Replaces the target network's weights (a resumed run), strict names and shapes.
    pub fn load_target(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        self.target_ema_mut()?.load_state(named)
    }

    /// `load_target` from a checkpoint's safetensors file.
    pub fn load_target_file(&mut self, path: &std::path::Path) -> Result<()> {
        self.target_ema_mut()?.load_state_file(path)
    }

    /// The EMA step of the target network toward the student (after each optimizer step).
    pub(crate) fn update_target(&mut self) -> Result<()> {
        match &mut self.target {
            Some((_, ema)) => ema.update(),
            None => Ok(()),
        }
    }
}

/// What one LCD step runs besides the `Consistency` state: the online student (computing in
/// `compute_kind`, its regions recomputed per `checkpointing`), the frozen teacher and the noise
/// schedule.
pub struct LcdModels<'a> {
    pub student: &'a UNet,
    pub teacher: &'a UNet,
    pub schedule: &'a NoiseSchedule,
    pub compute_kind: Kind,
    pub checkpointing: Checkpointing,
}

impl Consistency {
    /// The LCD state for `student`, which must have `time_embedding.cond_proj` of
    /// `cfg.time_cond_proj_dim`: the target network starts as a copy of it; `uncond` is the
    /// teacher's unconditional input (embeddings of batch 1, or zeros).
    ///
    /// A student with LoRA adapters is LCM-LoRA's: no guidance embedding (it must have no
    /// `cond_proj`: w is baked in by the teacher's CFG) and no target network.
    pub fn new(cfg: &LcmConfig, student: &UNet, schedule: &NoiseSchedule, uncond: Unconditional) -> Result<Consistency> {
        let config = &student.model.config;
        let lora = student.adapters.is_some();
        let want = (!lora).then_some(cfg.time_cond_proj_dim);
        ensure!(
            config.time_cond_proj_dim == want,
            "method: lcm: the student has time_cond_proj_dim {:?}, {}",
            config.time_cond_proj_dim,
            if lora { "LCM-LoRA feeds no guidance embedding".to_string() } else { format!("lcm.time_cond_proj_dim is {}", cfg.time_cond_proj_dim) }
        );
        if let Unconditional::Embeds(e) = &uncond {
            ensure!(e.context.dim() == 3 && e.context.size()[0] == 1, "the unconditional embedding must be (1, tokens, dim), not {:?}", e.context.size());
        }
        let solver = DdimSolver::new(schedule, cfg.num_ddim_timesteps)?;
        let device = student.model.device();
        let target = match lora {
            true => None,
            false => {
                let mut target = UNet::build(config, device, Kind::Float, Init::Empty);
                target.vs.freeze();
                let ema = Ema::into_shadow(weights::named_tensors(&student.vs), weights::named_tensors(&target.vs), cfg.target_ema)?;
                Some((target, ema))
            }
        };
        let uncond = match uncond {
            Unconditional::Zeros => Unconditional::Zeros,
            Unconditional::Embeds(e) => {
                let float = |t: &Tensor| t.to_kind(Kind::Float).to_device(device);
                Unconditional::Embeds(TextEmbeds { context: float(&e.context), pooled: e.pooled.as_ref().map(float) })
            }
        };
        Ok(Consistency { cfg: cfg.clone(), solver, target, uncond })
    }

    /// The unconditional text embedding and pooled embedding for a batch of `context` and
    /// `pooled` (SDXL's; None for SD-1.x/2.x), float32.
    fn uncond_for(&self, context: &Tensor, pooled: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let b = context.size()[0];
        Ok(match &self.uncond {
            Unconditional::Zeros => (context.to_kind(Kind::Float).zeros_like(), pooled.map(|p| p.to_kind(Kind::Float).zeros_like())),
            Unconditional::Embeds(e) => {
                let pooled = match pooled {
                    Some(_) => Some(e.pooled.as_ref().ok_or_else(|| anyhow!("the batch has pooled text embeddings, the unconditional embedding none"))?.repeat([b, 1])),
                    None => None,
                };
                (e.context.repeat([b, 1, 1]), pooled)
            }
        })
    }

    /// Forward and backward of one micro-batch on given draws; the gradients accumulate, the
    /// loss multiplied by `grad_scale` (the fp16 loss scale over the accumulation). `added`: the
    /// batch's pooled text embedding and time ids for an SDXL teacher and student (empty for
    /// SD-1.x/2.x; its `timestep_cond` is unused: the w embedding is made here).
    pub fn micro_step(&self, m: &LcdModels, latents: &Tensor, context: &Tensor, added: &AddedCond, inputs: &LcdInputs, grad_scale: f64) -> Result<LcdTerms> {
        let c = self;
        let (dev, b) = (latents.device(), latents.size()[0]);
        let prediction = m.schedule.prediction_type();
        let latents = latents.to_kind(Kind::Float);
        let index = inputs.index.to_device(dev);
        let (start, t_n) = c.solver.start_and_target(&index);
        let per_sample = |(skip, out): (Tensor, Tensor)| (skip.view([b, 1, 1, 1]), out.view([b, 1, 1, 1]));
        let (skip_start, out_start) = per_sample(boundary_scalings(&start, c.cfg.timestep_scaling));
        let (skip_n, out_n) = per_sample(boundary_scalings(&t_n, c.cfg.timestep_scaling));
        let noisy = m.schedule.add_noise(&latents, &inputs.noise.to_device(dev), &start);
        // LCM-LoRA feeds no guidance embedding (timestep_cond=None in the LoRA script)
        let w_emb = c.has_target().then(|| guidance_scale_embedding(&inputs.w, c.cfg.time_cond_proj_dim).to_device(dev));
        let w = inputs.w.to_device(dev).to_kind(Kind::Float).view([b, 1, 1, 1]);
        let none = BTreeSet::new();

        let (uncond_context, uncond_pooled) = c.uncond_for(context, added.text_embeds.as_ref())?;
        // the added conditioning in `kind`, as the script casts it to the UNet's dtype
        let cond = |kind: Kind, pooled: Option<&Tensor>, w_emb: Option<&Tensor>| AddedCond {
            text_embeds: pooled.map(|t| t.to_kind(kind)),
            time_ids: added.time_ids.as_ref().map(|t| t.to_kind(kind)),
            timestep_cond: w_emb.map(|t| t.to_kind(kind)),
        };

        // the online student at t_{n+k}
        let kind = m.compute_kind;
        let student_added = cond(kind, added.text_embeds.as_ref(), w_emb.as_ref());
        let recompute = Recompute::new(m.checkpointing); // lives until after the backward
        let out = m.student.model.forward_cond_with(&noisy.to_kind(kind), &start, &context.to_kind(kind), &student_added, &none, &recompute).sample;
        let (x0, _) = x0_and_noise(prediction, m.schedule, &out.to_kind(Kind::Float), &start, &noisy);
        let model_pred = &skip_start * &noisy + &out_start * x0;

        let (target, guided_out) = tch::no_grad(|| {
            // the teacher's guided estimate, one DDIM step back to t_n
            let tk = weights::var_kind(&m.teacher.vs);
            let teacher_at = |ctx: &Tensor, pooled: Option<&Tensor>| {
                let out = m.teacher.model.forward_cond(&noisy.to_kind(tk), &start, &ctx.to_kind(tk), &cond(tk, pooled, None), &none).sample.to_kind(Kind::Float);
                let (x0, eps) = x0_and_noise(prediction, m.schedule, &out, &start, &noisy);
                (x0, eps, out)
            };
            let (cond_x0, cond_eps, cond_out) = teacher_at(context, added.text_embeds.as_ref());
            // the unconditional call keeps the batch's time ids (the SDXL script swaps text_embeds alone)
            let (uncond_x0, uncond_eps, uncond_out) = teacher_at(&uncond_context, uncond_pooled.as_ref());
            let guided_out = (c.cfg.output_kd > 0.0).then(|| &cond_out + &w * (&cond_out - &uncond_out));
            let pred_x0 = &cond_x0 + &w * (&cond_x0 - &uncond_x0);
            let pred_eps = &cond_eps + &w * (&cond_eps - &uncond_eps);
            let x_prev = c.solver.ddim_step(&pred_x0, &pred_eps, &index); // float64
            // the target network at t_n on x_prev
            let target = c.target.as_ref().map_or(m.student, |(t, _)| t);
            let out = target.model.forward_cond(&x_prev.to_kind(kind), &t_n, &context.to_kind(kind), &student_added, &none).sample.to_kind(Kind::Float);
            let (x0, _) = x0_and_noise(prediction, m.schedule, &out, &t_n, &x_prev);
            (&skip_n * &x_prev + &out_n * x0, guided_out)
        });
        let target = target.to_kind(Kind::Float);
        let loss = match c.cfg.loss {
            ConsistencyLoss::L2 => model_pred.mse_loss(&target, tch::Reduction::Mean),
            ConsistencyLoss::Huber => {
                let h = c.cfg.huber_c;
                (((&model_pred - &target).square() + h * h).sqrt() - h).mean(Kind::Float)
            }
        };
        let output_kd = guided_out.map(|g| super::loss::mse(&out, &g));
        let total = match &output_kd {
            Some(kd) => &loss + kd * c.cfg.output_kd,
            None => loss.shallow_clone(),
        };
        (&total * grad_scale).backward();
        let w_mean = inputs.w.to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
        Ok(LcdTerms { loss: loss.detach(), output_kd: output_kd.map(|t| t.detach()), w_mean })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::SchedulerConfig;

    fn sd15() -> NoiseSchedule {
        NoiseSchedule::new(SchedulerConfig::from_json_str(include_str!("../../configs/reference/sd15_scheduler_config.json")).unwrap()).unwrap()
    }

    #[test]
    fn solver_grid_and_table() {
        let s = sd15();
        let solver = DdimSolver::new(&s, 50).unwrap();
        assert_eq!(solver.timesteps()[..3], [19, 39, 59]);
        assert_eq!(*solver.timesteps().last().unwrap(), 999);
        let prev = solver.alphas_cumprod_prev();
        assert_eq!(prev[0], s.alphas_cumprod()[0]);
        assert_eq!(prev[1], s.alphas_cumprod()[19]);
        assert_eq!(prev[49], s.alphas_cumprod()[979]);
        let (start, target) = solver.start_and_target(&Tensor::from_slice(&[0i64, 1, 49]));
        assert_eq!(Vec::<i64>::try_from(&start).unwrap(), [19, 39, 999]);
        assert_eq!(Vec::<i64>::try_from(&target).unwrap(), [0, 19, 979]);
        for n in [0, 3, 1001] {
            assert!(DdimSolver::new(&s, n).unwrap_err().to_string().contains("lcm.num_ddim_timesteps"), "{n}");
        }
    }
}
