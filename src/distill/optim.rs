//! Optimisation pieces of the trainer, each a reproduction of the PyTorch/diffusers function that
//! BK-SDM's training script and diffusers' `train_text_to_image.py` use, so runs compare with theirs:
//! - `AdamW`: `torch.optim.AdamW(fused=True)` (non-amsgrad), written over tch tensors because
//!   tch's optimizer keeps its moments out of reach and so cannot be checkpointed.
//! - `clip_grad_norm`: `torch.nn.utils.clip_grad_norm_` (2-norm, eps 1e-6).
//! - `lr_at`: diffusers' `get_scheduler` schedules as a pure function of the step, so resuming
//!   needs nothing but the step.
//! - `Ema`: an exponential moving average of the student, starting from the weights it is given.
//!
//! `OptimConfig` is the run YAML's `optim:` section (checked by its `validate`); `AdamWConfig` is
//! what the update kernel reads of it (`AdamWConfig::from(&OptimConfig)`), the learning rate
//! coming from `lr_at` per step.
//!
//! The update is LibTorch's `_fused_adamw_` kernel (reached through `crate::aten_extra`, since
//! tch 0.26 does not wrap it): `torch.optim.AdamW(fused=True)`, bit-identical to it, one pass over
//! each parameter instead of the ten of the default single-tensor path (3x faster on CPU, one
//! kernel launch instead of thousands on CUDA). It differs from the single-tensor path only in
//! rounding (< 1e-6 relative after hundreds of steps; tests/trainkit.rs checks both).
use crate::aten_extra;
use crate::config_error::{invalid, ConfigError};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub betas: [f64; 2],
    pub weight_decay: f64,
    pub eps: f64,
    /// Global grad-norm clip; null disables clipping.
    pub max_grad_norm: Option<f64>,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// The dtype AdamW keeps its two moments in.
    pub state_dtype: StateDtype,
    /// ZeRO-1 (`zero.rs`): each of a data-parallel run's N ranks keeps and updates the moments
    /// of 1/N of the parameters. Memory only: the run, its checkpoints and resume are the same.
    /// Written to the run's config only when on, so configs from before it read back the same.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shard_state: bool,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 5.0e-5,
            betas: [0.9, 0.999],
            weight_decay: 0.01,
            eps: 1.0e-8,
            max_grad_norm: Some(1.0),
            schedule: Schedule::default(),
            warmup_steps: 0,
            state_dtype: StateDtype::default(),
            shard_state: false,
        }
    }
}

/// `optim.state_dtype`: AdamW's moments in fp32, or in bf16 (half the memory; the update itself
/// still runs in fp32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateDtype {
    #[default]
    Fp32,
    Bf16,
}

impl StateDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            StateDtype::Fp32 => tch::Kind::Float,
            StateDtype::Bf16 => tch::Kind::BFloat16,
        }
    }
}

/// LR schedules with diffusers' `get_scheduler` semantics (see `lr_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// diffusers `constant`, or `constant_with_warmup` when warmup_steps > 0.
    #[default]
    Constant,
    /// diffusers `cosine` (half a cosine from lr to 0 after the warmup).
    Cosine,
    /// diffusers `linear` (straight from lr to 0 after the warmup).
    Linear,
}

impl OptimConfig {
    /// The `optim.*` checks that need no other section (warmup against `train.max_steps` is
    /// `RunConfig`'s); each message names the key and value.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let o = self;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return Err(invalid("optim.lr", format!("optim.lr = {}: must be > 0", o.lr)));
        }
        for (i, b) in o.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(invalid("optim.betas", format!("optim.betas[{i}] = {b}: must be in [0, 1)")));
            }
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(invalid(
                "optim.weight_decay",
                format!("optim.weight_decay = {}: must be >= 0", o.weight_decay),
            ));
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return Err(invalid("optim.eps", format!("optim.eps = {}: must be > 0", o.eps)));
        }
        if let Some(n) = o.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return Err(invalid(
                    "optim.max_grad_norm",
                    format!("optim.max_grad_norm = {n}: must be > 0 (or null to disable clipping)"),
                ));
            }
        }
        Ok(())
    }
}

/// The learning rate of optimizer update number `step` (0-based: the number of updates already
/// done), equal to diffusers' `get_scheduler(...)` after `step` calls of `lr_scheduler.step()`.
/// `constant` with `warmup_steps > 0` is diffusers' `constant_with_warmup` (plain diffusers
/// `constant` ignores warmup); `cosine` is half a cosine (num_cycles 0.5) to 0 at `max_steps`;
/// `linear` falls straight to 0 at `max_steps`. With warmup, update 0 uses lr 0, as in diffusers.
pub fn lr_at(step: u64, cfg: &OptimConfig, max_steps: u64) -> f64 {
    let warmup = cfg.warmup_steps;
    let s = step as f64;
    let factor = if step < warmup {
        s / (warmup.max(1) as f64)
    } else {
        // Signed: diffusers' progress may go negative past the end and is clamped at 0.
        let span = (max_steps as i64 - warmup as i64).max(1) as f64;
        match cfg.schedule {
            Schedule::Constant => 1.0,
            Schedule::Cosine => {
                let progress = (s - warmup as f64) / span;
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
            Schedule::Linear => ((max_steps as f64 - s) / span).max(0.0),
        }
    };
    cfg.lr * factor
}

/// AdamW hyper-parameters other than the learning rate (which `lr_at` gives per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// The dtype of the moments (`optim.state_dtype`): the parameters' own, or bf16.
    pub state_kind: Kind,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults.
    fn default() -> Self {
        AdamWConfig { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, state_kind: Kind::Float }
    }
}

impl From<&OptimConfig> for AdamWConfig {
    fn from(c: &OptimConfig) -> Self {
        AdamWConfig { betas: (c.betas[0], c.betas[1]), eps: c.eps, weight_decay: c.weight_decay, state_kind: c.state_dtype.kind() }
    }
}

/// One parameter and its state. `step` counts this parameter's own updates, as PyTorch does: a
/// parameter whose gradient is undefined is skipped (no decay, no moment update). `step_t` is the
/// same count as the float32 scalar on the parameter's device that the fused kernel reads.
struct Slot {
    name: String,
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: i64,
    step_t: Tensor,
}

/// AdamW over named parameters (shallow clones of the model's variables: updates are in place).
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
}

/// Names of the optimizer state tensors in `optimizer.safetensors`.
pub(crate) const EXP_AVG: &str = "exp_avg.";
pub(crate) const EXP_AVG_SQ: &str = "exp_avg_sq.";
pub(crate) const STEP: &str = "step.";

impl AdamW {
    /// Zero moments (like PyTorch's lazily created state) for every parameter. Parameters must be
    /// floating point with unique names.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<AdamW> {
        check_unique(&params, "optimizer")?;
        let slots = params
            .into_iter()
            .map(|(name, param)| {
                if !param.is_floating_point() {
                    bail!("optimizer parameter {name} is {:?}, not floating point", param.kind());
                }
                // bf16 moments under fp32 parameters (master weights); otherwise the parameter's dtype
                let kind = if cfg.state_kind == Kind::BFloat16 && param.kind() == Kind::Float { Kind::BFloat16 } else { param.kind() };
                let exp_avg = Tensor::f_zeros(param.size(), (kind, param.device()))?;
                let exp_avg_sq = Tensor::f_zeros(param.size(), (kind, param.device()))?;
                let step_t = Tensor::f_zeros([], (tch::Kind::Float, param.device()))?;
                Ok(Slot { name, param, exp_avg, exp_avg_sq, step: 0, step_t })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW { cfg, slots })
    }

    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// The parameters, in the order given to `new`.
    pub fn params(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.shallow_clone()).collect()
    }

    /// One AdamW update with learning rate `lr` of every parameter that has a gradient:
    /// `p *= 1 - lr·wd; m = lerp(m, g, 1-β1); v = β2·v + (1-β2)·g²;
    ///  p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)`.
    ///
    /// Moments stored in a narrower dtype than their parameter (bf16 under fp32) are widened for
    /// the update and rounded back (to nearest even) after it, a bounded group of parameters at a
    /// time, so the fp32 copies never hold more than `WIDE_CHUNK` elements.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let grads: Vec<Tensor> = self.slots.iter().map(|s| s.param.grad()).collect();
        self.step_with(lr, &grads)
    }

    /// `step` with the gradient of each parameter given (in `params` order; undefined: no
    /// gradient), where they are not the parameters' own: ZeRO-1's pieces (`zero::Shards`).
    pub fn step_with(&mut self, lr: f64, grads: &[Tensor]) -> Result<()> {
        let AdamWConfig { betas, eps, weight_decay, .. } = self.cfg;
        ensure!(grads.len() == self.slots.len(), "AdamW step: {} gradients for {} parameters", grads.len(), self.slots.len());
        tch::no_grad(|| -> Result<()> {
            let live: Vec<usize> = (0..self.slots.len()).filter(|&i| grads[i].defined()).collect();
            let (same, narrow): (Vec<usize>, Vec<usize>) = live.iter().partition(|&&i| self.slots[i].exp_avg.kind() == self.slots[i].param.kind());
            let pick = |ids: &[usize], f: &dyn Fn(&Slot) -> &Tensor| ids.iter().map(|&i| f(&self.slots[i])).collect::<Vec<_>>();
            let grads_of = |ids: &[usize]| ids.iter().map(|&i| &grads[i]).collect::<Vec<_>>();
            let fused = |ids: &[usize], m: &[&Tensor], v: &[&Tensor]| {
                aten_extra::fused_adamw_(&pick(ids, &|s| &s.param), &grads_of(ids), m, v, &pick(ids, &|s| &s.step_t), lr, betas, weight_decay, eps)
            };
            fused(&same, &pick(&same, &|s| &s.exp_avg), &pick(&same, &|s| &s.exp_avg_sq))?;
            for ids in chunks_of_elements(&narrow, |i| self.slots[i].param.numel(), WIDE_CHUNK) {
                let wide = |f: &dyn Fn(&Slot) -> &Tensor| -> Result<Vec<Tensor>> {
                    ids.iter().map(|&i| Ok(f(&self.slots[i]).f_to_kind(self.slots[i].param.kind())?)).collect()
                };
                let (m, v) = (wide(&|s| &s.exp_avg)?, wide(&|s| &s.exp_avg_sq)?);
                fused(&ids, &m.iter().collect::<Vec<_>>(), &v.iter().collect::<Vec<_>>())?;
                for (k, &i) in ids.iter().enumerate() {
                    self.slots[i].exp_avg.shallow_clone().f_copy_(&m[k])?;
                    self.slots[i].exp_avg_sq.shallow_clone().f_copy_(&v[k])?;
                }
            }
            for &i in &live {
                self.slots[i].step += 1;
            }
            Ok(())
        })
        .context("AdamW step")
    }

    /// The dtype of the moments (the parameters' own, or bf16).
    pub fn state_kind(&self) -> Kind {
        self.slots.first().map_or(self.cfg.state_kind, |s| s.exp_avg.kind())
    }

    /// Bytes the moments take.
    pub fn state_bytes(&self) -> i64 {
        self.slots.iter().map(|s| 2 * s.exp_avg.numel() as i64 * s.exp_avg.kind().elt_size_in_bytes() as i64).sum()
    }

    /// Drops every gradient (PyTorch's `zero_grad(set_to_none=True)`, its default): the next
    /// backward writes fresh gradients instead of adding to zeroed ones.
    pub fn zero_grad(&mut self) {
        for s in &self.slots {
            aten_extra::set_grad_none(&s.param).expect("clearing a gradient cannot fail");
        }
    }

    /// `torch.nn.utils.clip_grad_norm_` over this optimizer's parameters.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<Tensor> {
        clip_grad_norm(&self.params(), max_norm)
    }

    /// The state as named tensors: `exp_avg.<param>`, `exp_avg_sq.<param>` (shallow: they alias
    /// the optimizer's moments) and `step.<param>` (an int64 scalar). What `optimizer.safetensors`
    /// holds.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.slots.len());
        for s in &self.slots {
            out.push((format!("{EXP_AVG}{}", s.name), s.exp_avg.shallow_clone()));
            out.push((format!("{EXP_AVG_SQ}{}", s.name), s.exp_avg_sq.shallow_clone()));
            out.push((format!("{STEP}{}", s.name), Tensor::from(s.step)));
        }
        out
    }

    /// Restores `state_tensors` output (names and shapes must match exactly; moments are copied
    /// into the existing tensors, keeping their device and dtype).
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let steps: Vec<Tensor> = self.slots.iter().map(|_| Tensor::from(0i64)).collect();
        let dst = self.state_targets(&steps);
        copy_named(&dst, named, "optimizer state")?;
        self.set_steps(&steps)
    }

    /// `load_state` from a safetensors file, memory-mapped, one tensor at a time (the moments of
    /// a full student are gigabytes: no second copy in memory).
    ///
    /// Moments saved in another dtype than this optimizer keeps (a run resumed with another
    /// `optim.state_dtype`) are converted: bf16 to fp32 exactly, fp32 to bf16 rounded to nearest
    /// even, as the bf16 state rounds after every step. Returns the saved dtype when it differed.
    pub fn load_state_file(&mut self, path: &Path) -> Result<Option<Kind>> {
        let steps: Vec<Tensor> = self.slots.iter().map(|_| Tensor::from(0i64)).collect();
        let dst: HashMap<String, Tensor> = self.state_targets(&steps).into_iter().collect();
        let saved = self.saved_state_kind(path)?;
        crate::models::weights::load_strict(&dst, &[path.to_path_buf()])?;
        self.set_steps(&steps)?;
        Ok(saved.filter(|&k| k != self.state_kind()))
    }

    /// The dtype of the first moment in an `optimizer.safetensors` (None when it holds none).
    fn saved_state_kind(&self, path: &Path) -> Result<Option<Kind>> {
        let Some(first) = self.slots.first() else { return Ok(None) };
        let file = crate::models::weights::MappedFile::open(path)?;
        let st = file.parse()?;
        let Ok(view) = st.tensor(&format!("{EXP_AVG}{}", first.name)) else { return Ok(None) };
        Ok(crate::models::weights::kind_of(view.dtype()).ok()) // an unusable dtype: load_strict names it
    }

    fn state_targets(&self, steps: &[Tensor]) -> Vec<(String, Tensor)> {
        let mut dst = Vec::with_capacity(3 * self.slots.len());
        for (s, step) in self.slots.iter().zip(steps) {
            dst.push((format!("{EXP_AVG}{}", s.name), s.exp_avg.shallow_clone()));
            dst.push((format!("{EXP_AVG_SQ}{}", s.name), s.exp_avg_sq.shallow_clone()));
            dst.push((format!("{STEP}{}", s.name), step.shallow_clone()));
        }
        dst
    }

    fn set_steps(&mut self, steps: &[Tensor]) -> Result<()> {
        for (s, t) in self.slots.iter_mut().zip(steps) {
            s.step = t.f_int64_value(&[])?;
            if s.step < 0 {
                bail!("optimizer state: {STEP}{} = {} is negative", s.name, s.step);
            }
            // float32 counts exactly up to 2^24 steps, far beyond any run
            let _ = tch::no_grad(|| s.step_t.f_fill_(s.step as f64))?;
        }
        Ok(())
    }

    /// Each parameter's two moments (shallow), in `params` order.
    pub(crate) fn moments(&self) -> Vec<(Tensor, Tensor)> {
        self.slots.iter().map(|s| (s.exp_avg.shallow_clone(), s.exp_avg_sq.shallow_clone())).collect()
    }

    /// The update count of each parameter (all equal in a run where every parameter gets a
    /// gradient every step).
    pub fn steps(&self) -> Vec<(String, i64)> {
        self.slots.iter().map(|s| (s.name.clone(), s.step)).collect()
    }
}

/// At most this many elements of widened (fp32) moments exist at once during a bf16-state step
/// (32 MiB per moment; a larger parameter goes alone): small against what bf16 saves, and a
/// few hundred fused calls for an SD-sized student.
const WIDE_CHUNK: i64 = 1 << 23;

/// `ids` in order, split into runs whose `numel` sum stays within `limit` (a larger one alone).
fn chunks_of_elements(ids: &[usize], numel: impl Fn(usize) -> usize, limit: i64) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = vec![];
    let mut total = 0i64;
    for &i in ids {
        let n = numel(i) as i64;
        if out.is_empty() || total + n > limit {
            out.push(vec![]);
            total = 0;
        }
        out.last_mut().expect("a chunk was pushed").push(i);
        total += n;
    }
    out
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)`: the 2-norm of all gradients together
/// (the norm of the per-tensor norms), then every gradient times `min(max_norm / (norm + 1e-6),
/// 1)`, with PyTorch's multi-tensor kernels. Parameters without a gradient are ignored. Returns
/// the total norm before clipping as a scalar tensor on the gradients' device (read it only when
/// logging: that waits for the GPU).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<Tensor> {
    clip_grads(&params.iter().map(Tensor::grad).collect::<Vec<_>>(), Some(max_norm))
}

/// The total gradient 2-norm without clipping (for logging when clipping is off).
pub fn grad_norm(params: &[Tensor]) -> Result<Tensor> {
    clip_grads(&params.iter().map(Tensor::grad).collect::<Vec<_>>(), None)
}

/// `clip_grad_norm` (or, without `max_norm`, `grad_norm`) of the gradients themselves; undefined
/// ones are ignored.
pub fn clip_grads(grads: &[Tensor], max_norm: Option<f64>) -> Result<Tensor> {
    tch::no_grad(|| {
        let grads: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return Ok(Tensor::from(0f32));
        }
        aten_extra::clip_grad_norm_(&grads, max_norm)
    })
}

/// The scaling step of `clip_grad_norm_` for a `total` norm measured elsewhere (ZeRO-1's, over
/// every rank's share): each defined gradient times `min(max_norm / (total + 1e-6), 1)`,
/// computed as PyTorch computes it.
pub fn clip_to_total(grads: &[Tensor], total: &Tensor, max_norm: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let coef = total.f_add_scalar(1e-6)?.f_reciprocal()?.f_mul_scalar(max_norm)?.f_clamp_max(1.0)?;
        for g in grads.iter().filter(|g| g.defined()) {
            let _ = g.shallow_clone().f_mul_(&coef)?;
        }
        Ok(())
    })
}

/// Exponential moving average of parameters: after each optimizer step
/// `shadow = decay · shadow + (1 - decay) · param` (as diffusers' EMAModel with a fixed decay).
/// The shadow starts as a copy of the parameters given, i.e. the student's initial weights.
pub struct Ema {
    decay: f64,
    slots: Vec<(String, Tensor, Tensor)>, // (name, param, shadow)
}

impl Ema {
    pub fn new(params: Vec<(String, Tensor)>, decay: f64) -> Result<Ema> {
        if !(decay > 0.0 && decay < 1.0) {
            bail!("EMA decay {decay} is not in (0, 1)");
        }
        check_unique(&params, "EMA")?;
        let slots = params
            .into_iter()
            .map(|(name, p)| {
                let shadow = tch::no_grad(|| p.f_detach_copy())?;
                Ok((name, p, shadow))
            })
            .collect::<Result<_>>()?;
        Ok(Ema { decay, slots })
    }

    /// An EMA of `params` kept in `shadow` (tensors of the same names and shapes, updated in
    /// place: another model's variables, such as LCM's target network), which starts as a copy
    /// of `params`. `decay` may be 0 here (the shadow then follows the parameters exactly).
    pub fn into_shadow(params: Vec<(String, Tensor)>, shadow: Vec<(String, Tensor)>, decay: f64) -> Result<Ema> {
        if !(0.0..1.0).contains(&decay) {
            bail!("EMA decay {decay} is not in [0, 1)");
        }
        check_unique(&params, "EMA")?;
        copy_named(&shadow, &params, "EMA shadow")?;
        let mut shadow: HashMap<String, Tensor> = shadow.into_iter().collect();
        let slots = params
            .into_iter()
            .map(|(name, p)| {
                let s = shadow.remove(&name).ok_or_else(|| anyhow::anyhow!("EMA shadow has no {name}"))?;
                Ok((name, p, s))
            })
            .collect::<Result<_>>()?;
        Ok(Ema { decay, slots })
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// shadow ← shadow + (1 - decay)(param - shadow), in place.
    pub fn update(&mut self) -> Result<()> {
        let w = 1.0 - self.decay;
        tch::no_grad(|| -> Result<()> {
            for (_, p, shadow) in &mut self.slots {
                let _ = shadow.f_lerp_(p, w)?;
            }
            Ok(())
        })
        .context("EMA update")
    }

    /// The shadow weights under the parameters' own names (shallow): `ema.safetensors` is a
    /// student state dict that export can write as a diffusers UNet.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots.iter().map(|(n, _, s)| (n.clone(), s.shallow_clone())).collect()
    }

    /// Restores `state_tensors` output (strict names and shapes), copying into the shadow.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        copy_named(&self.state_tensors(), named, "EMA state")
    }

    /// `load_state` from a safetensors file, memory-mapped.
    pub fn load_state_file(&mut self, path: &Path) -> Result<()> {
        let dst: HashMap<String, Tensor> = self.state_tensors().into_iter().collect();
        crate::models::weights::load_strict(&dst, &[path.to_path_buf()])
    }
}

fn check_unique(params: &[(String, Tensor)], what: &str) -> Result<()> {
    let mut seen = HashSet::new();
    for (name, _) in params {
        if !seen.insert(name.as_str()) {
            bail!("{what}: parameter name {name} appears twice");
        }
    }
    Ok(())
}

/// Copies `src` into `dst` by name: the same names (each once), the same shapes; values are
/// converted to each destination's dtype and device.
pub fn copy_named(dst: &[(String, Tensor)], src: &[(String, Tensor)], what: &str) -> Result<()> {
    let src_map: HashMap<&str, &Tensor> = src.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if src_map.len() != src.len() {
        bail!("{what}: duplicate tensor names");
    }
    let dst_names: HashSet<&str> = dst.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing: Vec<&str> = dst.iter().map(|(n, _)| n.as_str()).filter(|n| !src_map.contains_key(n)).collect();
    let mut unexpected: Vec<&str> = src.iter().map(|(n, _)| n.as_str()).filter(|n| !dst_names.contains(n)).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        missing.sort();
        unexpected.sort();
        let first = |v: &[&str]| v.iter().take(5).copied().collect::<Vec<_>>().join(", ");
        bail!(
            "{what} does not match: {} missing ({}), {} unexpected ({})",
            missing.len(),
            first(&missing),
            unexpected.len(),
            first(&unexpected)
        );
    }
    tch::no_grad(|| -> Result<()> {
        for (name, d) in dst {
            let s = src_map[name.as_str()];
            if s.size() != d.size() {
                bail!("{what}: {name} has shape {:?}, expected {:?}", s.size(), d.size());
            }
            let s = s.f_to_kind(d.kind())?.f_to_device(d.device())?;
            d.shallow_clone().f_copy_(&s).map_err(|e| anyhow!("{what}: copying {name}: {e}"))?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn cfg(schedule: Schedule, warmup: u64) -> OptimConfig {
        OptimConfig { lr: 2.0, schedule, warmup_steps: warmup, ..OptimConfig::default() }
    }

    #[test]
    fn schedules_by_hand() {
        let c = cfg(Schedule::Constant, 0);
        assert_eq!((lr_at(0, &c, 10), lr_at(9, &c, 10), lr_at(50, &c, 10)), (2.0, 2.0, 2.0));
        let c = cfg(Schedule::Constant, 4);
        assert_eq!([0, 1, 2, 4, 9].map(|s| lr_at(s, &c, 10)), [0.0, 0.5, 1.0, 2.0, 2.0]);
        let c = cfg(Schedule::Linear, 2);
        assert_eq!([0, 1, 2, 6, 10, 12].map(|s| lr_at(s, &c, 10)), [0.0, 1.0, 2.0, 1.0, 0.0, 0.0]);
        let c = cfg(Schedule::Cosine, 0);
        assert!((lr_at(5, &c, 10) - 1.0).abs() < 1e-12);
        assert!(lr_at(10, &c, 10).abs() < 1e-12 && lr_at(0, &c, 10) == 2.0);
    }

    #[test]
    fn adamw_first_step_is_sign_times_lr() {
        // After one step m̂ = g and v̂ = g², so p moves by lr·g/(|g| + eps) ≈ lr·sign(g).
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0]).set_requires_grad(true);
        let mut opt =
            AdamW::new(vec![("w".into(), p.shallow_clone())], AdamWConfig { weight_decay: 0.0, ..Default::default() })
                .unwrap();
        (&p * Tensor::from_slice(&[0.5f32, -3.0, 0.0])).sum(Kind::Float).backward();
        opt.step(0.1).unwrap();
        let got = Vec::<f32>::try_from(&p.detach()).unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 1.9).abs() < 1e-6 && got[2] == 3.0, "{got:?}");
        assert_eq!(opt.steps(), vec![("w".to_string(), 1)]);
    }

    #[test]
    fn params_without_grad_are_skipped_and_state_round_trips() {
        let a = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[5.0f32]).set_requires_grad(true);
        let mut opt =
            AdamW::new(vec![("a".into(), a.shallow_clone()), ("b".into(), b.shallow_clone())], Default::default())
                .unwrap();
        (&a * 3.0).sum(Kind::Float).backward();
        opt.step(0.01).unwrap();
        assert_eq!(b.double_value(&[0]), 5.0, "a parameter without a gradient must not move");
        let state = opt.state_tensors();
        assert_eq!(state.len(), 6);
        let mut fresh = AdamW::new(vec![("a".into(), a.copy()), ("b".into(), b.copy())], Default::default()).unwrap();
        let saved: Vec<(String, Tensor)> = state.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        fresh.load_state(&saved).unwrap();
        assert_eq!(fresh.steps(), vec![("a".to_string(), 1), ("b".to_string(), 0)]);
        let e = format!("{:#}", fresh.load_state(&saved[1..]).unwrap_err());
        assert!(e.contains("missing") && e.contains("exp_avg.a"), "{e}");
        let mut bad: Vec<(String, Tensor)> = saved.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        bad[0].1 = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        let e = format!("{:#}", fresh.load_state(&bad).unwrap_err());
        assert!(e.contains("exp_avg.a") && e.contains("shape"), "{e}");
        let dup = vec![("a".to_string(), a.shallow_clone()), ("a".to_string(), b.shallow_clone())];
        assert!(AdamW::new(dup, Default::default()).is_err());
    }

    #[test]
    fn clip_scales_only_above_max_norm() {
        let a = Tensor::from_slice(&[0.0f32, 0.0]).set_requires_grad(true);
        (&a * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let n = clip_grad_norm(&[a.shallow_clone()], 10.0).unwrap().double_value(&[]);
        assert!((n - 5.0).abs() < 1e-6);
        assert_eq!(Vec::<f32>::try_from(&a.grad()).unwrap(), vec![3.0, 4.0]);
        let n = clip_grad_norm(&[a.shallow_clone()], 1.0).unwrap().double_value(&[]);
        assert!((n - 5.0).abs() < 1e-6);
        let g = Vec::<f32>::try_from(&a.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6, "{g:?}");
        assert_eq!(grad_norm(&[]).unwrap().double_value(&[]), 0.0);
    }

    #[test]
    fn ema_follows_the_formula() {
        let p = Tensor::from_slice(&[1.0f32, 2.0]);
        let mut ema = Ema::new(vec![("w".into(), p.shallow_clone())], 0.75).unwrap();
        tch::no_grad(|| p.shallow_clone().copy_(&Tensor::from_slice(&[5.0f32, 6.0])));
        ema.update().unwrap();
        let s = Vec::<f32>::try_from(&ema.state_tensors()[0].1).unwrap();
        assert_eq!(s, vec![2.0, 3.0]); // 0.75·1 + 0.25·5, 0.75·2 + 0.25·6
        assert!(Ema::new(vec![], 1.0).is_err());
    }
}
