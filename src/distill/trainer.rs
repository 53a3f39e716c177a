//! The distillation run of `sdkd train`: teacher and student, data, the KD step, AdamW, EMA,
//! checkpoints, logs and validation images, resumable exactly.
//!
//! All randomness of optimizer step `s`, micro-batch `m` (latent sample, noise, timesteps) comes
//! from a generator reseeded with `hash(seed, s, m)`, and the data order is a pure function of
//! (seed, epoch, position): a resumed run needs only the step and the data cursor to continue
//! exactly as an uninterrupted one (bit-for-bit on the CPU).
//!
//! Data parallel (`Trainer::with_ranks`, docs/distributed.md): rank `r` of `W` computes global
//! micro-batches `m·W + r` of each step (m < grad_accum), each keyed and positioned as micro-batch
//! `m·W + r` of a one-process run with `grad_accum·W` micro-batches, so both compute the same
//! step up to the order of float additions. Gradients are averaged before clipping; every rank
//! then takes the same AdamW and EMA step (under `optim.shard_state` each rank updates its share
//! and the parameters are all-gathered, `zero.rs`). Rank 0 alone writes; the others wait at
//! barriers.
use super::checkpoint::{self, CheckpointWriter, StateMeta, TrainState};
use super::encoder::{LatentScale, TeacherEncoder, TextEmbeds, Unconditional};
use super::optim::{lr_at, AdamWConfig, Ema};
use super::progress::{Progress, ProgressMode};
use super::scalars::{LogWindow, StepScalars};
use super::student::{copy_from_teacher, StudentPlan};
use super::tensorboard::EventWriter;
pub use super::step::{Distiller, Teacher, Update};
use crate::config::{Method, RunConfig, StudentInit};
use crate::data::config::DroppedCaption;
use crate::data::order::{drops_caption, hash, Stream};
use crate::data::formats::small_images_warning;
use crate::data::{open_image_rows, Cursor, ImageSource, LatentCache, Loader, LoaderOptions, SampleEncoder, Shard, Transform};
use crate::distributed::{checksum, Ranks};
use crate::eval::periodic::PeriodicEval;
use crate::export;
use crate::grid::grid;
use crate::models::unet::AddedCond;
use crate::models::{weights, Init, PipelineDir, UNet, UNet2DConditionModel, UNetConfig};
use crate::pipeline::{prompt_rows, GenerateRequest, Parts};
use crate::png_meta::write_png;
use crate::schedulers::{NoiseSchedule, SchedulerConfig, SchedulerKind};
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::rc::Rc;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    /// Optimizer steps done in total.
    pub step: u64,
    /// Stopped early by a signal (a checkpoint was written first).
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    /// Mean total loss of the last logged window.
    pub last_loss: f64,
}

/// `x`'s rows that `mask` picks replaced by `with` ((1, ...) broadcast), or by zeros.
fn replace_rows(x: &Tensor, with: Option<&Tensor>, mask: &[bool], what: &str) -> Result<Tensor> {
    let shape = x.size();
    let with = match with {
        Some(w) => {
            ensure!(
                w.size()[1..] == shape[1..],
                "data.caption_dropout: the empty prompt's {what} is {:?}, the batch's {:?} (a latent cache made with another text encoder than the teacher's?)",
                w.size(),
                shape
            );
            w.to_device(x.device()).to_kind(x.kind())
        }
        None => x.zeros_like(),
    };
    let mut view = vec![1i64; shape.len()];
    view[0] = shape[0];
    let keep = Tensor::from_slice(mask).to_device(x.device()).view(view.as_slice()).logical_not();
    Ok(x.where_self(&keep, &with))
}

/// `context` (and SDXL's `pooled`) with the rows `dropped(row)` picks replaced as `to` says.
fn drop_captions(context: &Tensor, pooled: Option<&Tensor>, to: &Unconditional, dropped: impl Fn(u64) -> bool) -> Result<(Tensor, Option<Tensor>)> {
    let b = context.size()[0];
    let mask: Vec<bool> = (0..b as u64).map(dropped).collect();
    if !mask.contains(&true) {
        return Ok((context.shallow_clone(), pooled.map(Tensor::shallow_clone)));
    }
    let (empty_context, empty_pooled) = match to {
        Unconditional::Zeros => (None, None),
        Unconditional::Embeds(e) => (Some(&e.context), e.pooled.as_ref()),
    };
    let context = replace_rows(context, empty_context, &mask, "text embedding")?;
    let pooled = pooled.map(|p| replace_rows(p, empty_pooled, &mask, "pooled embedding")).transpose()?;
    Ok((context, pooled))
}

/// Batches of (latent mean, latent std, text embeddings): from images through the teacher's
/// encoders, or from a `sdkd preprocess` cache.
enum Feed {
    Images { loader: Loader<ImageSource>, encoder: Rc<TeacherEncoder> },
    Cache { loader: Loader<LatentCache> },
}

struct FeedBatch {
    mean: Tensor,
    std: Tensor,
    context: Tensor,
    /// SDXL's pooled text embedding (b, dim), when the teacher has one.
    pooled: Option<Tensor>,
    /// (b, 6) i64 (absent from version 1 caches).
    time_ids: Option<Tensor>,
    next: Cursor,
    skipped: usize,
}

impl Feed {
    fn next(&mut self) -> Result<FeedBatch> {
        match self {
            Feed::Images { loader, encoder } => {
                let b = loader.next_batch()?.ok_or_else(|| anyhow!("the dataset ran out of samples"))?;
                let enc = encoder.encode(&b.data.images, &b.data.captions)?;
                Ok(FeedBatch {
                    mean: enc.latent_mean,
                    std: enc.latent_std,
                    context: enc.text_embeddings,
                    pooled: enc.pooled_embeddings,
                    time_ids: Some(b.data.time_ids),
                    next: b.next,
                    skipped: b.skipped.len(),
                })
            }
            Feed::Cache { loader } => {
                let b = loader.next_batch()?.ok_or_else(|| anyhow!("the latent cache ran out of samples"))?;
                let d = b.data;
                Ok(FeedBatch {
                    mean: d.latent_mean,
                    std: d.latent_std,
                    context: d.text_embeddings,
                    pooled: d.pooled_embeddings,
                    time_ids: d.time_ids,
                    next: b.next,
                    skipped: b.skipped.len(),
                })
            }
        }
    }
}

/// Everything a run holds.
pub struct Trainer {
    cfg: RunConfig,
    device: Device,
    distiller: Distiller,
    encoder: Option<Rc<TeacherEncoder>>,
    scale: LatentScale,
    step: u64,
    cursor: Cursor,
    /// The process group of a data-parallel run; None for one process.
    ranks: Option<Ranks>,
    /// The config as checkpoints and the run folder's marker identify the run: `grad_accum`
    /// counted over all ranks (the config itself for one process).
    identity: RunConfig,
    /// What dropped captions become, when `data.caption_dropout` > 0.
    dropped: Option<Unconditional>,
    /// `validation.eval` on the leader, when on.
    periodic_eval: Option<PeriodicEval>,
    /// `method: lcm`: the teacher's noise schedule as an `LCMScheduler` config on the run's grid,
    /// which the validation grid's student rows sample with (as the export will).
    lcm_schedule: Option<Arc<NoiseSchedule>>,
    /// A `lora:` run's frozen base: where it came from and its checksum, recorded in every
    /// checkpoint and checked unchanged before each.
    base: Option<checkpoint::BaseRef>,
}

/// The reference a LoRA checkpoint keeps to its frozen base: `lora.base`, else the teacher the
/// student was made from, and the checksum of the base's tensors.
fn base_ref(cfg: &RunConfig, student: &UNet) -> Option<checkpoint::BaseRef> {
    let lora = cfg.lora.as_ref()?;
    let source = match (&lora.base, &cfg.teacher) {
        (Some(base), _) => base.display().to_string(),
        (None, Some(t)) => format!("teacher {}{}", t.display(), cfg.revision.as_ref().map(|r| format!("@{r}")).unwrap_or_default()),
        (None, None) => "none".to_string(),
    };
    Some(checkpoint::BaseRef { source, checksum: base_checksum(student) })
}

/// `distributed::checksum` of the base UNet's tensors in name order, as 16 hex digits.
fn base_checksum(student: &UNet) -> String {
    let tensors: Vec<Tensor> = weights::named_tensors(&student.vs).into_iter().map(|(_, t)| t).collect();
    format!("{:016x}", checksum(&tensors) as u64)
}

/// The config that identifies a run of `cfg` on `world` ranks: micro-batches per step counted
/// over all of them, so 2 ranks × accum 1 and 1 rank × accum 2 are the same run.
/// A folder where every rank of a data-parallel run writes the student and EMA it holds at each
/// cross-rank comparison (start, checkpoints, end): `rank-R/step-N.safetensors` (names prefixed
/// `student.` / `ema.`). For looking into a divergence, and for tests/distributed.rs to compare
/// the ranks without trusting the checksum (docs/distributed.md).
pub const RANK_STATE_DIR: &str = "SDKD_RANK_STATE_DIR";

pub fn identity_config(cfg: &RunConfig, world: usize) -> RunConfig {
    let mut c = cfg.clone();
    c.train.grad_accum *= world;
    c
}

/// Fills the defaults that depend on the teacher's family into `cfg` (`method: lcm`'s guidance
/// range, `LcmConfig::fill_family_defaults`), so that the run's recorded config (its folder's
/// marker, its checkpoints, config.yaml) names them. Reads the teacher pipeline's configs.
pub fn teacher_family_defaults(cfg: &mut RunConfig) -> Result<()> {
    if cfg.method != Method::Lcm {
        return Ok(());
    }
    let sdxl = match cfg.teacher_local(crate::hub::Want::Pipeline)? {
        Some(t) => PipelineDir::open(&t.path)?.is_xl(),
        None => false,
    };
    fill_family_defaults(cfg, sdxl)
}

fn fill_family_defaults(cfg: &mut RunConfig, sdxl: bool) -> Result<()> {
    if cfg.method == Method::Lcm {
        cfg.lcm.fill_family_defaults(sdxl)?;
    }
    Ok(())
}

/// Refuses a checkpoint of another global batch (`batch_size × grad_accum × world size`), which
/// would be another run, with the numbers that differ and the grad_accum that would fit.
fn check_global_batch(ckpt: &checkpoint::Checkpoint, cfg: &RunConfig, world: usize) -> Result<()> {
    /// What a checkpoint's stored identity says of its batch.
    #[derive(serde::Deserialize)]
    struct Batch {
        batch_size: u64,
        grad_accum: u64,
    }
    let Ok(Batch { batch_size: batch, grad_accum: accum_all }) = serde_json::from_value(ckpt.meta.config["train"].clone()) else {
        return Ok(()); // an identity without them: check_config names what differs
    };
    let theirs = batch * accum_all;
    let ours = (cfg.train.batch_size * cfg.train.grad_accum * world) as u64;
    if theirs == ours {
        return Ok(());
    }
    let w = ckpt.meta.world_size as u64;
    let hint = match theirs % (cfg.train.batch_size * world) as u64 {
        0 if batch == cfg.train.batch_size as u64 => format!("; with {world} process(es) that is train.grad_accum: {}", theirs / (cfg.train.batch_size * world) as u64),
        _ => String::new(),
    };
    bail!(
        "checkpoint {} was made with a global batch of {theirs} (batch_size {batch} × grad_accum {} × {w} process(es)); this run's is {ours} \
         (batch_size {} × grad_accum {} × {world} process(es)): a run resumes only with the same global batch{hint}",
        ckpt.dir.display(),
        accum_all / w.max(1),
        cfg.train.batch_size,
        cfg.train.grad_accum
    )
}

/// The seed of step `step`, micro-batch `micro`.
fn step_seed(seed: u64, step: u64, micro: u64) -> i64 {
    (hash(seed, Stream::Noise, step, micro) >> 1) as i64
}

/// The noise schedule of the teacher pipeline's scheduler config; a run without a teacher uses
/// SD-1.5's, embedded so that it does not depend on the working directory.
fn noise_schedule(pipeline: Option<&PipelineDir>) -> Result<NoiseSchedule> {
    NoiseSchedule::new(match pipeline {
        Some(p) => p.scheduler_config()?,
        None => SchedulerConfig::from_json_str(include_str!("../../configs/reference/sd15_scheduler_config.json"))?,
    })
}

/// The student from the run's seed (PyTorch's default init, then the teacher's weights when
/// `student_init: teacher`), and the teacher when distilling.
/// `report`: print what was copied (rank 0 of a data-parallel run only, the others stay quiet).
/// `shard`: (world, rank) under `optim.shard_state` (`Distiller::new_sharded`).
fn build_distiller(cfg: &RunConfig, pipeline: Option<&PipelineDir>, device: Device, compute_kind: Kind, report: bool, shard: Option<(usize, usize)>) -> Result<Distiller> {
    let schedule = Arc::new(noise_schedule(pipeline)?);
    let teacher_config = pipeline.map(|p| p.unet_config()).transpose()?;
    if teacher_config.as_ref().is_some_and(|c| c.time_cond_proj_dim.is_some()) {
        bail!("teacher: a UNet with time_cond_proj_dim (a guidance-distilled UNet) cannot be distilled yet: training gives it no guidance embedding (sdkd generate and inspect take it)");
    }
    let mut plan = StudentPlan::of(&cfg.student, teacher_config.as_ref()).with_context(|| format!("student {:?}", cfg.student.to_string()))?;
    plan.feature_pairs = plan.pairs_at(cfg.loss.features);
    let lcm = cfg.method == Method::Lcm;
    if lcm && cfg.lora.is_none() {
        // the guidance embedding's projection, PyTorch's default init like the rest (the script's
        // `from_config(teacher.config, time_cond_proj_dim=...)`); LCM-LoRA has none
        plan.config.time_cond_proj_dim = Some(cfg.lcm.time_cond_proj_dim);
    }
    tch::manual_seed(step_seed(cfg.train.seed, u64::MAX, 0));
    let student = match &cfg.lora {
        Some(lora) => UNet::build_with_adapters(&plan.config, device, Kind::Float, Init::Torch, &lora.spec()).context("lora")?,
        None => UNet::build(&plan.config, device, Kind::Float, Init::Torch),
    };
    let lora_base = cfg.lora.as_ref().and_then(|l| l.base.as_deref());
    let need_teacher_unet = cfg.distill || (cfg.student_init == StudentInit::Teacher && lora_base.is_none());
    let teacher_unet = match (pipeline, need_teacher_unet) {
        (Some(p), true) => Some(p.load_unet(device, compute_kind)?),
        (None, true) => bail!("teacher: the run distils or copies the teacher, but `teacher` is not set"),
        _ => None,
    };
    let init_from = match lora_base {
        Some(base) => Some((base, "lora.base")),
        None => cfg.lcm.student_init.as_deref().filter(|_| lcm).map(|p| (p, "lcm.student_init")),
    };
    if let Some((from, key)) = init_from {
        let n = init_student_from(from, key, &plan, &student, device)?;
        if report {
            eprintln!("student {}: {} params, {n} tensors from {key} {}", plan.name, student.num_params(), from.display());
        }
    } else if let (StudentInit::Teacher, Some(t)) = (cfg.student_init, &teacher_unet) {
        let copied = copy_from_teacher(&plan, t, &student)?;
        if report {
            eprintln!(
            "student {}: {} params, {} tensors copied from the teacher, {} left at their initialisation",
            plan.name,
            student.num_params(),
            copied.copied,
            copied.left_random.len()
            );
        }
    }
    // LCD's teacher calls take no features
    let teacher_inner = if lcm { Default::default() } else { plan.inner_features().0 };
    let teacher = if cfg.distill { teacher_unet.map(|unet| Teacher::new(unet, teacher_inner)) } else { None };
    let mut d = Distiller::new_sharded(student, plan, teacher, schedule, AdamWConfig::from(&cfg.optim), cfg.train.ema_decay, cfg.loss, shard)?
        .with_compute_kind(compute_kind)?
        .with_checkpointing(cfg.train.gradient_checkpointing);
    d.noise_offset = cfg.train.noise_offset;
    Ok(d)
}

/// Copies a KD run's student (checkpoint, `final/` or UNet folder) into the student (the LCD
/// student of `lcm.student_init`, the frozen base of `lora.base`: `key`), which must be the same
/// architecture; `time_embedding.cond_proj` keeps its fresh initialisation unless the source has
/// one of the same width. Returns the number of tensors copied.
fn init_student_from(from: &Path, key: &str, plan: &StudentPlan, student: &UNet, device: Device) -> Result<usize> {
    let what = || format!("{key} {}", from.display());
    let source = crate::models::pipeline_dir::UnetSource::resolve(from, false).with_context(what)?;
    let init = source.load(device, Kind::Float).with_context(what)?;
    let theirs = &init.model.config;
    let mut ours = plan.config.clone();
    if theirs.time_cond_proj_dim.is_none() {
        ours.time_cond_proj_dim = None; // a KD student: cond_proj stays as initialised
    }
    if theirs.to_json() != ours.to_json() {
        let diff = crate::json_config::differing_keys(&theirs.to_json(), &ours.to_json());
        let keys: Vec<String> = diff.iter().take(5).map(|(k, a, b)| format!("{k}: {a} vs {b}")).collect();
        bail!("{}: its UNet is not the architecture of student {:?} ({})", what(), plan.name, keys.join("; "));
    }
    let named = weights::named_tensors(&init.vs);
    let ours: std::collections::HashMap<String, Tensor> = weights::named_tensors(&student.vs).into_iter().collect();
    tch::no_grad(|| -> Result<usize> {
        for (name, t) in &named {
            let dst = ours.get(name).ok_or_else(|| anyhow!("{}: {name} is not a tensor of the student", what()))?;
            dst.shallow_clone().f_copy_(t)?;
        }
        Ok(named.len())
    })
}

/// Refuses a cache whose text embeddings the student `c` cannot take: another cross-attention
/// width, or (an SDXL student) no pooled embeddings and time ids. Before the run claims output_dir.
fn check_cache_fits(c: &UNetConfig, cache: &LatentCache) -> Result<()> {
    let (_, text) = cache.row_shapes();
    let path = cache.dir.display();
    ensure!(
        text.last() == Some(&c.cross_attention_dim),
        "data.cache {path}: its text embeddings are {text:?} wide, the student's cross_attention_dim is {} (a cache made with another teacher?)",
        c.cross_attention_dim
    );
    if let Some(e) = &c.addition_embed {
        let (Some(pooled), true) = (cache.pooled_width(), cache.has_time_ids()) else {
            bail!(
                "data.cache {path}: the cache has no pooled text embeddings or time ids, which an SDXL teacher needs (made by an older sdkd, version {}, or with an SD teacher): run `sdkd preprocess` again with this teacher",
                cache.index.version
            )
        };
        let want = e.input_dim - crate::models::unet_config::TIME_IDS * e.time_embed_dim;
        ensure!(pooled == want, "data.cache {path}: its pooled embeddings are {pooled} wide, the student takes {want} (a cache made with another teacher?)");
    }
    Ok(())
}

/// A bucket list as a config would write it (`none` when absent).
fn show_buckets(b: Option<&crate::data::Buckets>) -> String {
    b.map_or("none".into(), |b| serde_json::to_string(b).unwrap_or_default())
}

/// Refuses a batch whose data alone this machine cannot hold, before any is loaded: the loader
/// builds each batch in host memory (pixels as f32, or the cache's latent mean and std), and a
/// failed allocation there would abort the process. A floor, not a plan of the whole step.
fn check_batch_memory(cfg: &RunConfig) -> Result<()> {
    let res = cfg.data.resolution as f64;
    // the largest bucket's pixels, with buckets
    let pixels = cfg.data.buckets().ok().flatten().map_or(res * res, |b| b.max_pixels() as f64);
    let batch = cfg.train.batch_size as f64;
    let per_sample = if cfg.data.cache.is_some() { 2.0 * 4.0 * pixels / 64.0 } else { 3.0 * pixels };
    let bytes = batch * per_sample * 4.0;
    ensure!(
        crate::memory::device_can_hold(Device::Cpu, bytes),
        "train.batch_size = {}, data.resolution = {}: one batch needs at least {:.1} GiB of host memory, more than this machine has available; lower one of them",
        cfg.train.batch_size,
        cfg.data.resolution,
        bytes / (1u64 << 30) as f64
    );
    Ok(())
}

impl Trainer {
    /// Builds the run from its config, on one process or as one rank of a data-parallel run
    /// (`ranks`; its device is `train.device`). Nothing is loaded from a checkpoint and nothing
    /// is exchanged with the other ranks: `resume` and `sync_ranks` do that.
    pub fn build(mut cfg: RunConfig, ranks: Option<Ranks>) -> Result<Trainer> {
        let device = cfg.train.device.resolve().context("train.device")?;
        check_batch_memory(&cfg)?;
        // The dtype the teacher, its encoders and the student's forward and backward run in.
        // LibTorch's CPU kernels in bf16/fp16 are slow and inexact: the CPU computes in fp32.
        let compute_kind = if device == Device::Cpu { Kind::Float } else { cfg.train.precision.kind() };
        let pipeline = cfg.teacher_local(crate::hub::Want::Pipeline)?.map(|t| PipelineDir::open(&t.path)).transpose()?;
        let sdxl = pipeline.as_ref().is_some_and(PipelineDir::is_xl);
        fill_family_defaults(&mut cfg, sdxl)?; // as `teacher_family_defaults` did for the run's marker
        let leader = ranks.as_ref().is_none_or(Ranks::is_leader);
        let shard = cfg.optim.shard_state.then(|| ranks.as_ref().map_or((1, 0), |r| (r.size(), r.rank())));
        let mut distiller = build_distiller(&cfg, pipeline.as_ref(), device, compute_kind, leader, shard)?;
        if let (Some((world, _)), true) = (shard, leader) {
            let elements: i64 = distiller.student().trainable().iter().map(|(_, t)| t.numel() as i64).sum();
            let whole = 2 * elements * distiller.optimizer.state_kind().elt_size_in_bytes() as i64;
            eprintln!("optim.shard_state: rank 0 keeps {} of the {whole} bytes of AdamW moments ({world} rank(s))", distiller.optimizer.state_bytes());
        }
        let lcm = cfg.method == Method::Lcm;
        // "no caption" as the family trains it: what dropped captions become, and LCD's
        // unconditional input (the encoded "" for SD-1.x/2.x, zeros for SDXL)
        let uncond_is = DroppedCaption::resolve(cfg.data.dropped_caption, sdxl);
        let encode_empty = (cfg.data.caption_dropout > 0.0 || lcm) && uncond_is == DroppedCaption::EmptyPrompt;
        // Images need the teacher's encoders; a latent cache needs them only for validation
        // images and the empty prompt.
        let encoder = match &pipeline {
            Some(p) if cfg.data.cache.is_none() || cfg.validation.every > 0 || cfg.validation.eval.every > 0 || encode_empty => {
                Some(Rc::new(TeacherEncoder::load(p, device, compute_kind)?))
            }
            _ => None,
        };
        let scale = match (&cfg.data.cache, &encoder) {
            (Some(cache), _) => {
                let index = crate::data::CacheIndex::read(cache).with_context(|| format!("data.cache {}", cache.display()))?;
                // the cache's latents decide the resolution: a config saying otherwise would be recorded wrongly
                ensure!(
                    index.transform.resolution == cfg.data.resolution,
                    "data.resolution = {} but data.cache {} holds latents of {} px images: set data.resolution: {} (or make the cache at {} px)",
                    cfg.data.resolution,
                    cache.display(),
                    index.transform.resolution,
                    index.transform.resolution,
                    cfg.data.resolution
                );
                let buckets = cfg.data.buckets().map_err(|e| anyhow!("{}", e.message))?;
                ensure!(
                    index.buckets == buckets,
                    "data.buckets = {} but data.cache {} was made with buckets {}: set data.buckets to the cache's (or make the cache with `sdkd preprocess --buckets`)",
                    show_buckets(buckets.as_ref()),
                    cache.display(),
                    show_buckets(index.buckets.as_ref())
                );
                check_cache_fits(&distiller.plan.config, &LatentCache::open(cache)?)?;
                LatentScale::from_description(&index.encoder).with_context(|| format!("data.cache {}", cache.display()))?
            }
            (None, Some(e)) => e.latent_scale(),
            (None, None) => bail!("data: a run without a teacher pipeline must read a latent cache (data.cache)"),
        };
        let uncond = match (uncond_is, encode_empty, &encoder) {
            // (the second: not used, neither captions are dropped nor LCD runs)
            (DroppedCaption::Zeros, _, _) | (_, false, _) => Unconditional::Zeros,
            (DroppedCaption::EmptyPrompt, true, Some(e)) => {
                let TextEmbeds { context, pooled } = e.encode_prompts(&[""]);
                Unconditional::Embeds(TextEmbeds { context: context.to_kind(Kind::Float), pooled: pooled.map(|p| p.to_kind(Kind::Float)) })
            }
            (DroppedCaption::EmptyPrompt, true, None) => {
                bail!("data.caption_dropout (data.dropped_caption: empty_prompt) and method: lcm need the teacher pipeline's text encoder (set teacher)")
            }
        };
        if lcm {
            distiller = distiller.with_consistency(&cfg.lcm, uncond.shallow_clone())?;
        }
        let dropped = (cfg.data.caption_dropout > 0.0).then_some(uncond);
        let identity = identity_config(&cfg, ranks.as_ref().map_or(1, Ranks::size));
        let lcm_schedule = match lcm {
            true => Some(Arc::new(NoiseSchedule::new(SchedulerConfig::from_json(&distiller.schedule.config().to_lcm_json(cfg.lcm.grid()))?)?)),
            false => None,
        };
        // before the first step: a bad captions or weights file, or a sampler the grid cannot
        // build (LCM past its original_inference_steps), fails now, not hours in
        if cfg.validation.every > 0 && leader {
            let v = &cfg.validation;
            v.scheduler.build(&distiller.schedule, v.steps as usize).with_context(|| format!("validation.scheduler {} with validation.steps {}", v.scheduler, v.steps))?;
            for (&n, schedule) in v.lcm_steps.iter().filter_map(|n| Some((n, lcm_schedule.as_ref()?))) {
                let grid = cfg.lcm.num_ddim_timesteps;
                SchedulerKind::Lcm.build(schedule, n as usize).with_context(|| format!("validation.lcm_steps {n} on the run's {grid}-point grid (lcm.num_ddim_timesteps)"))?;
            }
        }
        let periodic_eval = match cfg.validation.eval.every > 0 && leader {
            true => Some(PeriodicEval::prepare(&cfg.validation.eval, &distiller.schedule, device)?),
            false => None,
        };
        let base = base_ref(&cfg, &distiller.student);
        Ok(Trainer { cfg, device, distiller, encoder, scale, step: 0, cursor: Cursor::default(), ranks, identity, dropped, periodic_eval, lcm_schedule, base })
    }

    /// A data-parallel run's start: rank 0's student and EMA (built, or resumed) broadcast to
    /// every rank, then checked equal. Nothing for one process.
    pub fn sync_ranks(&self) -> Result<()> {
        if let Some(ranks) = &self.ranks {
            ranks.broadcast_from_leader(&self.distiller.state_tensors())?;
            self.check_ranks_agree()?;
        }
        Ok(())
    }

    /// Loads the student, optimizer, EMA, loss scale, step and data cursor of a checkpoint of
    /// this run (`latest` or a checkpoint folder).
    pub fn resume(&mut self, arg: &str) -> Result<()> {
        let (cfg, d) = (&self.cfg, &mut self.distiller);
        let ckpt = checkpoint::resolve(&cfg.output_dir, arg)?;
        let world = self.ranks.as_ref().map_or(1, Ranks::size);
        check_global_batch(&ckpt, cfg, world)?;
        ckpt.check_config(&self.identity)?;
        if ckpt.unet_config != d.plan.config.to_json() {
            bail!(
                "checkpoint {} holds a student of another architecture than student {:?} of this run",
                ckpt.dir.display(),
                cfg.student.to_string()
            );
        }
        match (&ckpt.meta.lora_base, &self.base) {
            (Some(theirs), Some(ours)) if theirs.checksum != ours.checksum => bail!(
                "checkpoint {}: its adapters were trained on base {} (checksum {}), but this run's base {} has checksum {}: the base's weights changed",
                ckpt.dir.display(),
                theirs.source,
                theirs.checksum,
                ours.source,
                ours.checksum
            ),
            (Some(_), Some(_)) | (None, None) => {}
            (theirs, _) => bail!(
                "checkpoint {} {} adapters, this run {}: a run resumes only with its own lora: setting",
                ckpt.dir.display(),
                if theirs.is_some() { "holds LoRA" } else { "holds a whole student, no" },
                if self.base.is_some() { "trains LoRA adapters" } else { "trains the whole student" }
            ),
        }
        ckpt.load_student_into(&d.student.trainable().into_iter().collect())?;
        if let Some(saved) = d.load_optimizer_state(&ckpt.optimizer_file())? {
            eprintln!(
                "checkpoint {}: AdamW moments saved as {saved:?}, converted to {:?} (optim.state_dtype = {})",
                ckpt.dir.display(),
                d.optimizer.state_kind(),
                serde_json::to_value(cfg.optim.state_dtype).map(|v| v.to_string()).unwrap_or_default()
            );
        }
        if let Some(ema) = &mut d.ema {
            let file = ckpt.ema_file().ok_or_else(|| anyhow!("checkpoint {} has no EMA, but train.ema_decay is set", ckpt.dir.display()))?;
            ema.load_state_file(&file)?;
        }
        if let Some(c) = d.consistency_mut().filter(|c| c.has_target()) {
            let file = ckpt.target_file().ok_or_else(|| anyhow!("checkpoint {} has no LCD target network, but method is lcm", ckpt.dir.display()))?;
            c.load_target_file(&file)?;
        }
        if let Some(saved) = ckpt.meta.loss_scale {
            d.set_loss_scale(saved);
        }
        self.step = ckpt.meta.step;
        self.cursor = serde_json::from_value(ckpt.meta.data_cursor.clone())
            .with_context(|| format!("checkpoint {}: data_cursor", ckpt.dir.display()))?;
        if self.ranks.as_ref().is_none_or(Ranks::is_leader) {
            eprintln!("resuming from {} (step {})", ckpt.dir.display(), self.step);
        }
        Ok(())
    }

    fn feed(&self) -> Result<Feed> {
        let d = &self.cfg.data;
        let mut opts = LoaderOptions::shuffled(self.cfg.train.batch_size, self.cfg.train.seed);
        opts.on_bad_sample = d.on_bad_sample;
        // Each rank reads only its share of every round of micro-batches (one per rank).
        let shard = self.ranks.as_ref().filter(|r| r.size() > 1).map(|r| Shard { rank: r.rank(), world: r.size() });
        fn open<S: crate::data::SampleSource>(source: Arc<S>, opts: LoaderOptions, cursor: Cursor, shard: Option<Shard>) -> Result<Loader<S>> {
            match shard {
                Some(shard) => Loader::sharded(source, opts, cursor, shard),
                None => Loader::new(source, opts, cursor),
            }
        }
        if let Some(cache) = &d.cache {
            let source = Arc::new(LatentCache::open(cache)?);
            return Ok(Feed::Cache { loader: open(source, opts, self.cursor, shard)? });
        }
        let (location, key) = d.location().ok_or_else(|| anyhow!("data: set data.path (an image folder), data.shards or data.cache"))?;
        let options = d.options().map_err(|e| anyhow!("{}", e.message))?;
        let rows = open_image_rows(&location, key, &options)?;
        if let Some(w) = small_images_warning(rows.as_ref(), d.resolution) {
            if self.ranks.as_ref().is_none_or(Ranks::is_leader) {
                eprintln!("{w}");
            }
        }
        let transform = Transform { resolution: d.resolution, center_crop: d.center_crop, random_flip: d.random_flip };
        let mut source = ImageSource::new(rows, transform, self.cfg.train.seed);
        if let Some(buckets) = d.buckets().map_err(|e| anyhow!("{}", e.message))? {
            let (bucketed, unsizable) = source.with_buckets(buckets, d.on_bad_sample)?;
            source = bucketed;
            if let (Some(first), true) = (unsizable.first(), self.ranks.as_ref().is_none_or(Ranks::is_leader)) {
                eprintln!("warning: data.buckets: {} sample(s) whose size cannot be read are left out; the first: {first}", unsizable.len());
            }
        }
        let source = Arc::new(source);
        let encoder = self.encoder.clone().expect("an image run has the teacher's encoders");
        Ok(Feed::Images { loader: open(source, opts, self.cursor, shard)?, encoder })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// One optimizer step over `grad_accum` micro-batches. Returns the logged scalars.
    fn train_step(&mut self, feed: &mut Feed) -> Result<StepScalars> {
        let accum = self.cfg.train.grad_accum;
        let (rank, world) = self.ranks.as_ref().map_or((0, 1), |r| (r.rank() as u64, r.size() as u64));
        let mut s = StepScalars::default();
        for micro in 0..accum as u64 {
            let batch = feed.next()?;
            s.skipped += batch.skipped;
            s.samples += batch.mean.size()[0] as usize;
            self.cursor = batch.next;
            // keyed by the micro-batch's index in the whole step, whichever rank computes it
            tch::manual_seed(step_seed(self.cfg.train.seed, self.step, micro * world + rank));
            let dev = self.device;
            let latents = self.scale.draw(&batch.mean.to_device(dev), &batch.std.to_device(dev));
            let mut context = batch.context.to_device(dev).to_kind(Kind::Float);
            let mut pooled = batch.pooled.map(|p| p.to_device(dev).to_kind(Kind::Float));
            if let Some(to) = &self.dropped {
                let first = (micro * world + rank) * self.cfg.train.batch_size as u64;
                let p = self.cfg.data.caption_dropout;
                (context, pooled) = drop_captions(&context, pooled.as_ref(), to, |i| drops_caption(self.cfg.train.seed, self.step, first + i, p))?;
            }
            let added = self.added_cond(pooled, batch.time_ids.map(|t| t.to_device(dev).to_kind(Kind::Float)))?;
            if self.distiller.consistency().is_some() {
                let terms = self.distiller.lcd_micro_step(&latents, &context, &added, accum)?;
                s.add_lcd(&terms, accum, self.cfg.lcm.output_kd);
            } else {
                let terms = self.distiller.micro_step_cond(&latents, &context, &added, accum);
                s.add_terms(&terms, accum);
            }
        }
        if let Some(ranks) = &self.ranks {
            s.average_over(ranks)?;
        }
        s.lr = lr_at(self.step, &self.cfg.optim, self.cfg.train.max_steps);
        let update = self.distiller.update_over(s.lr, self.cfg.optim.max_grad_norm, self.ranks.as_ref())?;
        s.add("grad_norm", update.grad_norm.double_value(&[]));
        if let Some(c) = self.distiller.consistency() {
            s.add("lcm/target_ema", c.config().target_ema);
        }
        s.overflow_steps = update.skipped as usize;
        self.step += 1;
        Ok(s)
    }

    /// SDXL's added conditioning of a batch: its pooled embeddings and time ids, which a
    /// `text_time` student must have (an SD batch gives none).
    fn added_cond(&self, pooled: Option<Tensor>, time_ids: Option<Tensor>) -> Result<AddedCond> {
        if !self.distiller.student.model.needs_text_time() {
            return Ok(AddedCond::default());
        }
        let (Some(text_embeds), Some(time_ids)) = (pooled, time_ids) else {
            bail!("the SDXL student needs the pooled text embedding and the time ids of every sample, and the data gave none (data.cache made by an older sdkd, or with an SD teacher?)")
        };
        Ok(AddedCond { text_embeds: Some(text_embeds), time_ids: Some(time_ids), timestep_cond: None })
    }

    /// The checkpoint of this step; `optimizer`: the whole optimizer state (`Distiller::optimizer_state`).
    fn state(&self, optimizer: Vec<(String, Tensor)>) -> TrainState {
        let mut meta = StateMeta::new(&self.identity, self.step, self.cursor.epoch, serde_json::to_value(self.cursor).expect("cursor serialises"));
        meta.loss_scale = self.distiller.loss_scale;
        meta.world_size = self.ranks.as_ref().map_or(1, Ranks::size);
        meta.lora_base = self.base.clone();
        TrainState {
            meta,
            unet_config: self.distiller.plan.config.to_json(),
            student: self.distiller.student.trainable(),
            ema: self.distiller.ema.as_ref().map(Ema::state_tensors),
            target: self.distiller.consistency().filter(|c| c.has_target()).map(|c| c.target_tensors()),
            optimizer,
        }
    }

    /// Runs until `train.max_steps` or until `stop` is raised (then checkpoints and returns).
    /// In a data-parallel run every rank calls it; the ranks agree on the step a signal stops
    /// them at, and rank 0 alone writes the config, logs, checkpoints, samples and final folders.
    pub fn run(&mut self, stop: &AtomicBool, progress_mode: ProgressMode) -> Result<RunOutcome> {
        let cfg = self.cfg.clone();
        let leader = self.ranks.as_ref().is_none_or(Ranks::is_leader);
        let progress_mode = if leader { progress_mode } else { ProgressMode::Hidden };
        let mut feed = self.feed()?; // before writing anything: a bad dataset leaves output_dir as it was
        if leader {
            std::fs::create_dir_all(&cfg.output_dir).with_context(|| format!("creating {}", cfg.output_dir.display()))?;
            std::fs::write(cfg.output_dir.join("config.yaml"), cfg.to_yaml()?)?;
        }
        let writer = CheckpointWriter::new(&cfg.output_dir, cfg.checkpoint.keep);
        let mut tb = if cfg.log.tensorboard && leader {
            // purges what a stopped run logged after its checkpoint (steps from self.step + 1 on)
            Some(EventWriter::create(&cfg.output_dir.join("tb"), (self.step > 0).then_some(self.step + 1))?)
        } else {
            None
        };
        let mut progress = Progress::new(progress_mode, self.step, cfg.train.max_steps, cfg.log.every.max(1));
        let mut window = LogWindow::default();
        let mut last_checkpoint = None;
        let mut skipped_total = 0usize;
        let mut last_loss = f64::NAN;
        let mut interrupted = false;
        while self.step < cfg.train.max_steps {
            let stopping = stop.load(Ordering::SeqCst);
            // one rank's signal (SLURM signals every task, a user may signal one) stops all here
            let stopping = match &self.ranks {
                Some(ranks) => ranks.any(stopping)?,
                None => stopping,
            };
            if stopping {
                interrupted = true;
                break;
            }
            let s = self.train_step(&mut feed)?;
            skipped_total += s.skipped;
            if s.skipped > 0 {
                progress.message(&format!("step {}: skipped {} bad sample(s) ({} so far)", self.step, s.skipped, skipped_total));
            }
            if let (1, Some(scale)) = (s.overflow_steps, &self.distiller.loss_scale) {
                progress.message(&format!("step {}: fp16 gradients overflowed, step skipped; loss scale now {}", self.step, scale.scale));
            }
            progress.update(self.step, s.mean("loss/total", 1), s.lr);
            window.push(&s);
            if self.step.is_multiple_of(cfg.log.every.max(1)) || self.step == cfg.train.max_steps {
                last_loss = window.mean_loss();
                let values = window.close(skipped_total, self.distiller.loss_scale.map(|s| s.scale));
                if let Some(tb) = &mut tb {
                    let refs: Vec<(&str, f32)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                    tb.add_scalars(&refs, self.step)?;
                    tb.flush()?;
                }
            }
            if cfg.checkpoint.every > 0 && self.step.is_multiple_of(cfg.checkpoint.every) {
                if let Some(agree) = self.check_ranks_agree()? {
                    progress.message(&agree);
                }
                last_checkpoint = self.write_checkpoint(&writer)?;
                progress.message(&format!("checkpoint step {} written", self.step));
            }
            if cfg.validation.every > 0 && self.step.is_multiple_of(cfg.validation.every) {
                if leader {
                    self.validate(tb.as_mut())?;
                }
                self.barrier()?;
            }
            if cfg.validation.eval.every > 0 && self.step.is_multiple_of(cfg.validation.eval.every) {
                if leader {
                    progress.message(&format!("step {}: evaluating {} images (validation.eval)", self.step, cfg.validation.eval.count));
                    let line = self.evaluate(tb.as_mut())?;
                    progress.message(&line);
                }
                self.barrier()?;
            }
        }
        progress.finish();
        let done = self.step;
        if last_checkpoint.as_ref().is_none_or(|p: &PathBuf| !p.ends_with(format!("step-{done}"))) && done > 0 {
            if let (true, Some(agree)) = (leader, self.check_ranks_agree()?) {
                eprintln!("{agree}");
            }
            last_checkpoint = self.write_checkpoint(&writer)?;
            if leader {
                eprintln!("checkpoint step {done} written");
            }
        }
        if !interrupted && leader {
            self.export_final()?;
        }
        if let Some(tb) = &mut tb {
            tb.flush()?;
        }
        self.barrier()?;
        Ok(RunOutcome { step: done, interrupted, last_checkpoint, last_loss })
    }

    /// Rank 0 writes the checkpoint (the others hold the same state) while the others wait.
    fn write_checkpoint(&self, writer: &CheckpointWriter) -> Result<Option<PathBuf>> {
        if let Some(base) = &self.base {
            // the base is frozen: a change would mean adapters saved against weights nobody has
            let now = base_checksum(&self.distiller.student);
            ensure!(now == base.checksum, "step {}: the frozen base UNet changed during training (checksum {now}, was {}): not writing a checkpoint of it", self.step, base.checksum);
        }
        // every rank takes part: under optim.shard_state the state is gathered from all
        let written = match self.distiller.optimizer_state(self.ranks.as_ref())? {
            Some(optimizer) => Some(writer.write(&self.state(optimizer))?),
            None => Some(checkpoint::checkpoints_dir(&self.cfg.output_dir).join(format!("step-{}", self.step))),
        };
        self.barrier()?;
        Ok(written)
    }

    fn barrier(&self) -> Result<()> {
        match &self.ranks {
            Some(ranks) => ranks.group.barrier(),
            None => Ok(()),
        }
    }

    /// Compares a checksum of the student and EMA across the ranks (an error naming those that
    /// differ); a line for rank 0 to print when they agree, None for one process.
    fn check_ranks_agree(&self) -> Result<Option<String>> {
        let Some(ranks) = &self.ranks else { return Ok(None) };
        let named = self.distiller.named_state_tensors();
        if let Some(dir) = std::env::var_os(RANK_STATE_DIR) {
            // before the comparison, so that a rank that differs leaves what it held
            let file = Path::new(&dir).join(format!("rank-{}", ranks.rank())).join(format!("step-{}.safetensors", self.step));
            std::fs::create_dir_all(file.parent().unwrap()).with_context(|| format!("{RANK_STATE_DIR}: creating {}", file.parent().unwrap().display()))?;
            weights::save(&file, &named, None).with_context(|| format!("{RANK_STATE_DIR}: writing {}", file.display()))?;
        }
        let sum = checksum(&named.into_iter().map(|(_, t)| t).collect::<Vec<_>>());
        ranks.check_same(sum, &format!("at step {}, the student and EMA", self.step))?;
        Ok(Some(format!("step {}: student and EMA bit-identical on all {} ranks (checksum {:016x})", self.step, ranks.size(), sum as u64)))
    }

    /// `final/unet` (and `final/unet_ema`, and LCD's `final/unet_target`) as diffusers UNet
    /// folders; a `lora:` run's adapters as `final/pytorch_lora_weights.safetensors`.
    fn export_final(&self) -> Result<()> {
        let dir = self.cfg.output_dir.join("final");
        let d = &self.distiller;
        if let Some(lora) = &self.cfg.lora {
            // the adapters alone, as diffusers' load_lora_weights reads them
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let set = crate::lora::LoraSet::from_trained(&d.student.trainable(), lora.alpha())?;
            return set.write(&dir.join(crate::lora::DIFFUSERS_FILE), crate::lora::Layout::Diffusers, &d.plan.config);
        }
        export::write_unet_dir(&dir.join("unet"), &d.plan.config, &weights::named_tensors(&d.student.vs), None)?;
        if let Some(ema) = &d.ema {
            export::write_unet_dir(&dir.join("unet_ema"), &d.plan.config, &ema.state_tensors(), None)?;
        }
        if let Some(c) = d.consistency().filter(|c| c.has_target()) {
            export::write_unet_dir(&dir.join("unet_target"), &d.plan.config, &c.target_tensors(), None)?;
        }
        Ok(())
    }

    /// The teacher pipeline's tokenizers, text encoders and VAE with `unet`, to generate with.
    fn parts<'a>(&'a self, encoder: &'a TeacherEncoder, unet: &'a UNet2DConditionModel) -> Parts<'a> {
        encoder.parts(unet, &self.distiller.schedule)
    }

    /// The validation prompts through the teacher (when one is loaded) and the student, with the
    /// run's seed: `samples/step-N.png` (a teacher row over a student row; for `method: lcm` one
    /// student row per `validation.lcm_steps` count, sampled with `lcm`; the PNG's `rows` text
    /// labels each row) and a TensorBoard image. Sampling reseeds the generator, which changes
    /// nothing for training: each step reseeds too.
    fn validate(&self, tb: Option<&mut EventWriter>) -> Result<()> {
        let v = &self.cfg.validation;
        let encoder = self.encoder.as_ref().ok_or_else(|| anyhow!("validation needs the teacher pipeline's VAE and text encoder"))?;
        let d = &self.distiller;
        let base = self.parts(encoder, &d.student.model);
        let req = GenerateRequest {
            scheduler: v.scheduler,
            steps: v.steps as usize,
            guidance_scale: v.guidance_scale,
            seed: self.cfg.train.seed,
            ..GenerateRequest::default()
        };
        let (mut rows, mut labels) = (vec![], vec![]);
        let mut row = |parts: &Parts, unet: &UNet2DConditionModel, req: &GenerateRequest, label: String| -> Result<()> {
            rows.extend(prompt_rows(parts, &[unet], &v.prompts, req)?);
            labels.push(format!("{label} ({}, {} step{})", req.scheduler, req.steps, if req.steps == 1 { "" } else { "s" }));
            Ok(())
        };
        if let Some(t) = &d.teacher {
            row(&base, &t.unet.model, &req, "teacher".into())?;
        }
        match &self.lcm_schedule {
            None => row(&base, &d.student.model, &req, "student".into())?,
            Some(schedule) => {
                let parts = Parts { schedule, ..base };
                for &n in &v.lcm_steps {
                    row(&parts, &d.student.model, &GenerateRequest { scheduler: SchedulerKind::Lcm, steps: n as usize, ..req.clone() }, "student".into())?;
                }
            }
        }
        let image = grid(&rows);
        let dir = self.cfg.output_dir.join("samples");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("step-{}.png", self.step));
        let text: Vec<(&str, String)> = vec![("prompts", v.prompts.join(" | ")), ("rows", labels.join(" | "))];
        write_png(&path, &image, &text)?;
        if let Some(tb) = tb {
            tb.add_image_rgb("validation", image.as_raw(), image.width(), image.height(), self.step)?;
            tb.flush()?;
        }
        Ok(())
    }

    /// `validation.eval` at this step: the student's (or its EMA's) metrics to TensorBoard and
    /// `eval/step-N/`; returns the line to print.
    fn evaluate(&self, tb: Option<&mut EventWriter>) -> Result<String> {
        let periodic = self.periodic_eval.as_ref().expect("prepared on the leader when validation.eval is on");
        let encoder = self.encoder.as_ref().ok_or_else(|| anyhow!("validation.eval needs the teacher pipeline's VAE and text encoder"))?;
        let d = &self.distiller;
        // the EMA weights in a UNet of their own (the student keeps training on its own)
        let ema_unet = match (&d.ema, self.cfg.validation.eval.ema) {
            (Some(ema), true) => {
                let kind = weights::var_kind(&d.student.vs);
                let unet = UNet::build(&d.plan.config, self.device, kind, Init::Empty);
                super::optim::copy_named(&weights::named_tensors(&unet.vs), &ema.state_tensors(), "EMA weights for validation.eval")?;
                Some(unet)
            }
            _ => None,
        };
        let (unet, what) = match &ema_unet {
            Some(u) => (&u.model, "student EMA"),
            None => (&d.student.model, "student"),
        };
        let parts = self.parts(encoder, unet);
        let scores = tch::no_grad(|| periodic.run(&parts, what, self.step, &self.cfg.output_dir.join("eval")))?;
        if let Some(tb) = tb {
            tb.add_scalars(&scores.scalars(), self.step)?;
            tb.flush()?;
        }
        Ok(format!("step {}: {what}: {} (eval/step-{}/report.json)", self.step, scores.summary(), self.step))
    }

    pub fn student_config(&self) -> &UNetConfig {
        &self.distiller.plan.config
    }

    /// The trained student, when the run is over.
    pub fn into_student(self) -> UNet {
        self.distiller.student
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_captions_become_zeros_or_the_empty_prompt() {
        let context = Tensor::ones([3, 2, 4], (Kind::Float, Device::Cpu));
        let pooled = Tensor::ones([3, 5], (Kind::Float, Device::Cpu));
        let dropped = |i: u64| i == 1;
        let (c, p) = drop_captions(&context, Some(&pooled), &Unconditional::Zeros, dropped).unwrap();
        let p = p.unwrap();
        assert_eq!((c.get(1).abs().sum(Kind::Float).double_value(&[]), p.get(1).abs().sum(Kind::Float).double_value(&[])), (0.0, 0.0));
        assert!(c.get(0).equal(&context.get(0)) && c.get(2).equal(&context.get(2)) && p.get(2).equal(&pooled.get(2)));
        let empty = TextEmbeds { context: Tensor::full([1, 2, 4], 7.0, (Kind::Float, Device::Cpu)), pooled: Some(Tensor::full([1, 5], 3.0, (Kind::Float, Device::Cpu))) };
        let (c, p) = drop_captions(&context, Some(&pooled), &Unconditional::Embeds(empty), dropped).unwrap();
        assert!(c.get(1).equal(&Tensor::full([2, 4], 7.0, (Kind::Float, Device::Cpu))) && c.get(0).equal(&context.get(0)));
        assert!(p.unwrap().get(1).equal(&Tensor::full([5], 3.0, (Kind::Float, Device::Cpu))));
    }
}
