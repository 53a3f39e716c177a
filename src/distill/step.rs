//! The distillation step, apart from the loop that feeds it (burn's TrainStep and Learner): on
//! ready latents and text embeddings, noise and timesteps, the frozen teacher's forward, the
//! student's forward and backward, the three losses, then clipping, AdamW, EMA and the fp16 loss
//! scale. `Trainer` feeds it a run's data; `sdkd bench` and the tests feed it random tensors.
use super::encoder::Unconditional;
use super::loss::{distill_loss, LossTerms, LossWeights};
use super::lcd::{Consistency, LcdInputs, LcdModels, LcdTerms};
use super::lcm::LcmConfig;
use super::loss_scale::LossScale;
use super::optim::{clip_grads, clip_to_total, AdamW, AdamWConfig, Ema};
use super::zero::Shards;
use crate::distributed::{Ranks, BUCKET_BYTES};
use super::student::StudentPlan;
use crate::models::unet::AddedCond;
use crate::models::{weights, Checkpointing, Recompute, UNet};
use crate::schedulers::NoiseSchedule;
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeSet;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The frozen teacher UNet and the inner features its side of the pairs needs.
pub struct Teacher {
    pub unet: UNet,
    pub inner: BTreeSet<String>,
}

impl Teacher {
    pub fn new(mut unet: UNet, inner: BTreeSet<String>) -> Teacher {
        unet.vs.freeze();
        Teacher { unet, inner }
    }

    fn kind(&self) -> Kind {
        weights::var_kind(&self.unet.vs)
    }
}

/// The distillation step on ready latents and text embeddings: noise, the frozen teacher's
/// forward, the student's forward and backward, the three losses, clipping, AdamW and EMA. The
/// trainer feeds it data; `sdkd bench` feeds it random tensors.
///
/// The student's weights, gradients, optimizer state and EMA are fp32 whatever `compute_kind`
/// is: its forward and backward run in `compute_kind` by casting the inputs, and the layers cast
/// the weights to match (mixed precision without autocast; see `models::layers`).
pub struct Distiller {
    pub(crate) student: UNet,
    pub(crate) plan: StudentPlan,
    pub(crate) teacher: Option<Teacher>,
    student_inner: BTreeSet<String>,
    pub(crate) schedule: Arc<NoiseSchedule>,
    /// AdamW over the student's trainable parameters, or under `optim.shard_state` over this
    /// rank's pieces of them (`shards`).
    pub(crate) optimizer: AdamW,
    /// `optim.shard_state` (ZeRO-1, `zero.rs`): which part of every parameter this rank updates.
    shards: Option<Shards>,
    pub(crate) ema: Option<Ema>,
    weights: LossWeights,
    pub(crate) noise_offset: f64,
    compute_kind: Kind,
    /// Present exactly when the student computes in fp16.
    pub(crate) loss_scale: Option<LossScale>,
    /// What the student's backward recomputes (`train.gradient_checkpointing`).
    checkpointing: Checkpointing,
    /// `method: lcm`: the LCD step's solver and target network (`lcd.rs`); None for KD.
    pub(crate) consistency: Option<Consistency>,
}

/// What `Distiller::update` did.
pub struct Update {
    /// The gradient norm before clipping, as a tensor (reading it waits for the device).
    pub grad_norm: Tensor,
    /// fp16 gradients overflowed: no AdamW or EMA step, and the loss scale was halved.
    pub skipped: bool,
}

impl Distiller {
    pub fn new(student: UNet, plan: StudentPlan, teacher: Option<Teacher>, schedule: Arc<NoiseSchedule>, optim: AdamWConfig, ema_decay: Option<f64>, weights: LossWeights) -> Result<Distiller> {
        Self::new_sharded(student, plan, teacher, schedule, optim, ema_decay, weights, None)
    }

    /// `new`; with `shard` (`optim.shard_state`: this process is rank `.1` of `.0`) its AdamW
    /// keeps and updates the state of its 1/N of the parameters only (ZeRO-1, `zero.rs`), and
    /// the whole moments are never allocated.
    #[allow(clippy::too_many_arguments)]
    pub fn new_sharded(
        student: UNet,
        plan: StudentPlan,
        teacher: Option<Teacher>,
        schedule: Arc<NoiseSchedule>,
        optim: AdamWConfig,
        ema_decay: Option<f64>,
        weights: LossWeights,
        shard: Option<(usize, usize)>,
    ) -> Result<Distiller> {
        // a LoRA student trains its adapters alone: AdamW and the EMA hold nothing of the base
        let (optimizer, shards) = match shard {
            None => (AdamW::new(student.trainable(), optim)?, None),
            Some((world, rank)) => {
                let (shards, pieces) = Shards::new(student.trainable(), world, rank, BUCKET_BYTES)?;
                (AdamW::new(pieces, optim)?, Some(shards))
            }
        };
        let ema = ema_decay.map(|d| Ema::new(student.trainable(), d)).transpose()?;
        let (_, student_inner) = plan.inner_features();
        Ok(Distiller {
            student,
            plan,
            teacher,
            student_inner,
            schedule,
            optimizer,
            shards,
            ema,
            weights,
            noise_offset: 0.0,
            compute_kind: Kind::Float,
            loss_scale: None,
            checkpointing: Checkpointing::None,
            consistency: None,
        })
    }

    /// The dtype the student's forward and backward run in: fp32, bf16, or fp16 (which brings
    /// dynamic loss scaling).
    pub fn with_compute_kind(mut self, kind: Kind) -> Result<Distiller> {
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            bail!("the student computes in fp32, bf16 or fp16, not {kind:?}");
        }
        self.compute_kind = kind;
        self.loss_scale = (kind == Kind::Half).then(LossScale::default);
        Ok(self)
    }

    /// Recompute the student's blocks or transformers in backward instead of storing their
    /// activations; the gradients are the same bit for bit on the CPU (`models::recompute`).
    pub fn with_checkpointing(mut self, checkpointing: Checkpointing) -> Distiller {
        self.checkpointing = checkpointing;
        self
    }

    /// The whole optimizer state as `optimizer.safetensors` holds it, on rank 0 (or one
    /// process); None on the other ranks. Under `optim.shard_state` it is gathered from every
    /// rank, which must all call this.
    pub fn optimizer_state(&self, ranks: Option<&Ranks>) -> Result<Option<Vec<(String, Tensor)>>> {
        match &self.shards {
            Some(shards) => shards.gather_state(&self.optimizer, ranks),
            None => Ok(ranks.is_none_or(Ranks::is_leader).then(|| self.optimizer.state_tensors())),
        }
    }

    /// Loads `optimizer.safetensors` (of any world size, sharded or not) into this process's
    /// optimizer; returns the saved moments' dtype when it differed (`AdamW::load_state_file`).
    pub fn load_optimizer_state(&mut self, path: &std::path::Path) -> Result<Option<Kind>> {
        match &self.shards {
            Some(shards) => shards.load_state_file(&mut self.optimizer, path),
            None => self.optimizer.load_state_file(path),
        }
    }

    pub fn student(&self) -> &UNet {
        &self.student
    }

    pub fn plan(&self) -> &StudentPlan {
        &self.plan
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    pub fn ema(&self) -> Option<&Ema> {
        self.ema.as_ref()
    }

    /// The student's tensors, the EMA's, then LCD's target network's, in a fixed order: what the ranks of a data-parallel
    /// run broadcast at start and compare by checksum.
    pub fn state_tensors(&self) -> Vec<Tensor> {
        self.named_state_tensors().into_iter().map(|(_, t)| t).collect()
    }

    /// `state_tensors` named `student.<param>`, `ema.<param>` and `target.<param>` (what
    /// `SDKD_RANK_STATE_DIR` writes); a LoRA student's are its adapters.
    pub fn named_state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state: Vec<(String, Tensor)> = self.student.trainable().into_iter().map(|(n, t)| (format!("student.{n}"), t)).collect();
        state.extend(self.ema.iter().flat_map(|e| e.state_tensors().into_iter().map(|(n, t)| (format!("ema.{n}"), t))));
        state.extend(self.consistency.iter().flat_map(|c| c.target_tensors().into_iter().map(|(n, t)| (format!("target.{n}"), t))));
        state
    }

    /// The fp16 loss scale (`None` unless the student computes in fp16).
    pub fn loss_scale(&self) -> Option<LossScale> {
        self.loss_scale
    }

    /// Replaces the fp16 loss scale (what a resumed run restores).
    pub fn set_loss_scale(&mut self, scale: LossScale) {
        if let Some(s) = &mut self.loss_scale {
            *s = scale;
        }
    }

    /// Forward and backward of one micro-batch (`latents` scaled for the UNet, (b, c, h, w) on
    /// the student's device); gradients accumulate, scaled by 1/`accum`. Draws noise and timesteps
    /// from the current generator.
    pub fn micro_step(&self, latents: &Tensor, context: &Tensor, accum: usize) -> LossTerms {
        self.micro_step_cond(latents, context, &AddedCond::default(), accum)
    }

    /// `micro_step` with the added conditioning an SDXL (`text_time`) UNet takes, given to the
    /// teacher and the student alike: the pooled text embedding and the time ids, per sample.
    pub fn micro_step_cond(&self, latents: &Tensor, context: &Tensor, added: &AddedCond, accum: usize) -> LossTerms {
        let dev = latents.device();
        let b = latents.size()[0];
        let mut noise = Tensor::randn(latents.size(), (Kind::Float, Device::Cpu)).to_device(dev);
        if self.noise_offset > 0.0 {
            let offset = Tensor::randn([b, latents.size()[1], 1, 1], (Kind::Float, Device::Cpu)).to_device(dev);
            noise += offset * self.noise_offset;
        }
        let t = self.schedule.sample_timesteps(b, Device::Cpu).to_device(dev);
        self.micro_step_with(latents, context, added, &noise, &t, accum)
    }

    /// `micro_step_cond` on given noise (offset included) and timesteps (what parity tests feed).
    pub fn micro_step_with(&self, latents: &Tensor, context: &Tensor, added: &AddedCond, noise: &Tensor, t: &Tensor, accum: usize) -> LossTerms {
        let (noise, t) = (noise.to_device(latents.device()), t.to_device(latents.device()));
        let noisy = self.schedule.add_noise(latents, &noise, &t);
        let target = self.schedule.training_target(self.schedule.prediction_type(), latents, &noise, &t);
        let teacher_out = self.teacher.as_ref().map(|teacher| {
            let kind = teacher.kind();
            let added = added_as(added, kind);
            tch::no_grad(|| teacher.unet.model.forward_cond(&noisy.to_kind(kind), &t, &context.to_kind(kind), &added, &teacher.inner))
        });
        let kind = self.compute_kind;
        // Lives until after the backward: it holds what the checkpointed regions recompute.
        let recompute = Recompute::new(self.checkpointing);
        let student_added = added_as(added, kind);
        let student_out = self.student.model.forward_cond_with(&noisy.to_kind(kind), &t, &context.to_kind(kind), &student_added, &self.student_inner, &recompute);
        let pairs = if teacher_out.is_some() { &self.plan.feature_pairs[..] } else { &[] };
        let terms = distill_loss(&student_out, teacher_out.as_ref(), &target, pairs, &self.weights);
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        (&terms.total * (scale / accum as f64)).backward();
        terms
    }

    /// Turns this distiller into an LCD one (`method: lcm`, `lcd.rs`): the target network starts
    /// as a copy of the student, which must have `time_embedding.cond_proj` of
    /// `cfg.time_cond_proj_dim`; `uncond` is the teacher's unconditional input (the encoded ""
    /// of batch 1, or zeros).
    pub fn with_consistency(mut self, cfg: &LcmConfig, uncond: Unconditional) -> Result<Distiller> {
        if self.teacher.is_none() {
            bail!("method: lcm needs the teacher UNet");
        }
        self.consistency = Some(Consistency::new(cfg, &self.student, &self.schedule, uncond)?);
        Ok(self)
    }

    pub fn consistency(&self) -> Option<&Consistency> {
        self.consistency.as_ref()
    }

    pub fn consistency_mut(&mut self) -> Option<&mut Consistency> {
        self.consistency.as_mut()
    }

    /// One LCD micro-batch with its index, noise and w drawn from the current generator;
    /// gradients accumulate, scaled by 1/`accum`. `added`: an SDXL batch's pooled text embedding
    /// and time ids, given to the teacher, the student and the target network alike.
    pub fn lcd_micro_step(&self, latents: &Tensor, context: &Tensor, added: &AddedCond, accum: usize) -> Result<LcdTerms> {
        let c = self.consistency.as_ref().ok_or_else(|| anyhow!("not an LCD distiller (with_consistency)"))?;
        let inputs = LcdInputs::draw(latents, c.config());
        self.lcd_micro_step_with(latents, context, added, &inputs, accum)
    }

    /// `lcd_micro_step` on given draws (what the parity tests feed).
    pub fn lcd_micro_step_with(&self, latents: &Tensor, context: &Tensor, added: &AddedCond, inputs: &LcdInputs, accum: usize) -> Result<LcdTerms> {
        let c = self.consistency.as_ref().ok_or_else(|| anyhow!("not an LCD distiller (with_consistency)"))?;
        let teacher = self.teacher.as_ref().ok_or_else(|| anyhow!("method: lcm needs the teacher UNet"))?;
        let models = LcdModels {
            student: &self.student,
            teacher: &teacher.unet,
            schedule: &self.schedule,
            compute_kind: self.compute_kind,
            checkpointing: self.checkpointing,
        };
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        c.micro_step(&models, latents, context, added, inputs, scale / accum as f64)
    }

    /// `update_over` on one process.
    pub fn update(&mut self, lr: f64, max_grad_norm: Option<f64>) -> Result<Update> {
        self.update_over(lr, max_grad_norm, None)
    }

    /// Averages the accumulated gradients over `ranks` (a data-parallel run's group: all-reduced,
    /// or under `optim.shard_state` reduce-scattered to the rank that updates them), clips them by
    /// their global norm (or only measures it), steps AdamW at `lr` (then, sharded, all-gathers
    /// the parameters), clears the gradients and updates the EMA and LCD's target network. Under
    /// fp16 the gradients are unscaled first, and a step whose gradients overflowed is skipped.
    pub fn update_over(&mut self, lr: f64, max_grad_norm: Option<f64>, ranks: Option<&Ranks>) -> Result<Update> {
        let grads = match &self.shards {
            Some(shards) => shards.reduce_gradients(ranks)?,
            None => {
                let params = self.optimizer.params();
                if let Some(ranks) = ranks {
                    ranks.average_gradients(&params)?;
                }
                params.iter().map(Tensor::grad).collect()
            }
        };
        if let Some(scale) = self.loss_scale.map(|s| s.scale) {
            unscale(&grads, scale)?;
            let norm = self.global_norm(&grads, None, ranks)?;
            let finite = norm.double_value(&[]).is_finite();
            self.loss_scale.as_mut().expect("checked above").update(finite);
            if !finite {
                self.optimizer.zero_grad();
                return Ok(Update { grad_norm: norm, skipped: true });
            }
        }
        let norm = self.global_norm(&grads, max_grad_norm, ranks)?;
        self.optimizer.step_with(lr, &grads)?;
        drop(grads);
        if let Some(shards) = &self.shards {
            shards.gather_params(ranks)?;
        }
        self.optimizer.zero_grad();
        if let Some(ema) = &mut self.ema {
            ema.update()?;
        }
        if let Some(c) = &mut self.consistency {
            c.update_target()?;
        }
        Ok(Update { grad_norm: norm, skipped: false })
    }

    /// The 2-norm of `grads` (the optimizer's, in its order) over every rank's share, and
    /// `clip_grad_norm_` by it when `max_norm` is given. Unsharded, and on one process, every
    /// rank holds every gradient: `clip_grads` itself.
    fn global_norm(&self, grads: &[Tensor], max_norm: Option<f64>, ranks: Option<&Ranks>) -> Result<Tensor> {
        match &self.shards {
            Some(shards) if shards.world() > 1 => {
                let total = shards.global_norm(&clip_grads(grads, None)?, ranks)?;
                if let Some(max) = max_norm {
                    clip_to_total(grads, &total, max)?;
                }
                Ok(total)
            }
            _ => clip_grads(grads, max_norm),
        }
    }
}

/// `added` in `kind`, as diffusers' training scripts cast the pooled embedding and the time ids
/// to the weights' dtype.
fn added_as(added: &AddedCond, kind: Kind) -> AddedCond {
    let cast = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_kind(kind));
    AddedCond { text_embeds: cast(&added.text_embeds), time_ids: cast(&added.time_ids), timestep_cond: cast(&added.timestep_cond) }
}

/// Divides every (defined) gradient by `scale`.
fn unscale(grads: &[Tensor], scale: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        for g in grads.iter().filter(|g| g.defined()) {
            let _ = g.shallow_clone().f_mul_scalar_(1.0 / scale)?;
        }
        Ok(())
    })
}
