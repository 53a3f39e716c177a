//! Text to image, step for step what diffusers' `StableDiffusionPipeline.__call__` does, so that
//! `--seed S` on the CPU gives diffusers' image with `torch.Generator("cpu").manual_seed(S)`:
//!
//! 1. tokenise the prompt and the negative prompt (`""` when none) to 77 ids each and encode them
//!    one at a time (diffusers calls the text encoder twice, never on a batch of both);
//! 2. with guidance (`guidance_scale > 1`) the UNet sees the batch `[uncond; cond]`;
//! 3. seed LibTorch's CPU generator, draw the latents `(samples, 4, h/f, w/f)` in one `randn` and
//!    multiply by the sampler's `init_noise_sigma` (DDPM and Euler-a draw their step noise from
//!    the same generator afterwards, in diffusers' order);
//! 4. per step: `scale_model_input`, UNet, `uncond + g·(cond - uncond)`, sampler step;
//! 5. VAE decode of `latents / scaling_factor`, `(x·0.5 + 0.5).clamp(0, 1)`, `(x·255).round()`
//!    to u8 (diffusers' `numpy_to_pil`).
//!
//! `TextToImage` owns the parts loaded from a pipeline folder; `generate_with` takes borrowed
//! `Parts`, so the trainer can render validation images with its in-memory student UNet.
//!
//! Note: seeding is through LibTorch's *global* generator (tch exposes no generator objects), so a
//! caller with its own random stream (the trainer) must reseed it after generating.
//!
//! `generate_batch` runs several compatible requests as one UNet call per step (`sdkd serve
//! --max-batch`); each keeps its own random sequence on that one generator by saving its state
//! after the request's draws and putting it back before the next (`aten_extra::cpu_rng_state`).
pub use crate::models::pipeline_dir::UnetSource;
use crate::lora::{fuse_into, Component, LoraSet, ScaledLora, Targets};
use crate::models::embeddings::guidance_scale_embedding;
use crate::models::unet::AddedCond;
use crate::models::unet_config::TIME_IDS;
use crate::models::{
    AutoencoderKL, ClipTextEncoder, ClipTextModel, ClipTokenizer, PipelineDir, UNet,
    UNet2DConditionModel, Vae,
};
use crate::schedulers::{randn, NoiseSchedule, Sampler, SchedulerKind};
use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use std::path::Path;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// One text-to-image call. Defaults are those of docs/serve.md (UniPC, 20 steps, 7.5).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None` is diffusers' default: the empty string as the unconditional prompt.
    pub negative_prompt: Option<String>,
    pub scheduler: SchedulerKind,
    pub steps: usize,
    /// Classifier-free guidance is on when > 1 (as diffusers).
    pub guidance_scale: f64,
    /// A concrete seed (see `resolve_seed` for -1 = random).
    pub seed: u64,
    /// Pixels; `None`: the UNet's `sample_size` × the VAE's downscale factor (diffusers' default).
    pub width: Option<i64>,
    pub height: Option<i64>,
    /// Images drawn together in one batch from one seed (diffusers' `num_images_per_prompt`).
    pub samples: usize,
    /// `guidance_rescale` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    /// Flawed", section 3.4): 0 is off.
    pub guidance_rescale: f64,
    /// SDXL's micro-conditioning, (height, width) in pixels: `original_size` and `target_size`
    /// default to the image size, `crop` (top, left) to (0, 0). Only SDXL UNets read them.
    pub original_size: Option<(i64, i64)>,
    pub crop: (i64, i64),
    pub target_size: Option<(i64, i64)>,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        GenerateRequest {
            prompt: String::new(),
            negative_prompt: None,
            scheduler: SchedulerKind::Unipc,
            steps: 20,
            guidance_scale: 7.5,
            seed: 0,
            width: None,
            height: None,
            samples: 1,
            guidance_rescale: 0.0,
            original_size: None,
            crop: (0, 0),
            target_size: None,
        }
    }
}

impl GenerateRequest {
    /// Checks what does not depend on the model (sizes are checked in `image_size`).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.steps >= 1, "steps = {}: must be at least 1", self.steps);
        ensure!(self.samples >= 1, "samples = {}: must be at least 1", self.samples);
        ensure!(
            self.guidance_scale.is_finite() && self.guidance_scale >= 0.0,
            "guidance_scale = {}: must be a finite number >= 0",
            self.guidance_scale
        );
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                ensure!(v > 0 && v % 8 == 0, "{name} = {v}: must be a positive multiple of 8");
            }
        }
        ensure!(
            self.guidance_rescale.is_finite() && (0.0..=1.0).contains(&self.guidance_rescale),
            "guidance_rescale = {}: must be between 0 and 1",
            self.guidance_rescale
        );
        for (name, size) in [("original_size", self.original_size), ("target_size", self.target_size)] {
            if let Some((h, w)) = size {
                ensure!(
                    [h, w].iter().all(|&v| v > 0 && v % 8 == 0 && v <= MAX_MICRO_SIZE),
                    "{name} = {h}x{w} (height x width): each must be a positive multiple of 8 up to {MAX_MICRO_SIZE}"
                );
            }
        }
        let (top, left) = self.crop;
        ensure!(
            (0..=MAX_MICRO_SIZE).contains(&top) && (0..=MAX_MICRO_SIZE).contains(&left),
            "crop = {top},{left} (top, left): each must be between 0 and {MAX_MICRO_SIZE}"
        );
        Ok(())
    }

    /// SDXL's six time ids: original size, crop top-left, target size, as diffusers'
    /// `_get_add_time_ids` orders them, for an image of `width`x`height`.
    pub fn time_ids(&self, width: i64, height: i64) -> [i64; 6] {
        let (oh, ow) = self.original_size.unwrap_or((height, width));
        let (th, tw) = self.target_size.unwrap_or((height, width));
        [oh, ow, self.crop.0, self.crop.1, th, tw]
    }

    pub fn do_classifier_free_guidance(&self) -> bool {
        self.guidance_scale > 1.0
    }

    /// The PNG text chunks that record how an image of `width`x`height` from `model` was made
    /// (what `sdkd generate` and `sdkd serve` write; callers append their own).
    pub fn png_text(&self, width: i64, height: i64, model: String) -> Vec<(&'static str, String)> {
        let pair = |(a, b): (i64, i64)| format!("{a},{b}");
        let mut extra = vec![];
        if self.guidance_rescale > 0.0 {
            extra.push(("guidance_rescale", self.guidance_rescale.to_string()));
        }
        if let Some(s) = self.original_size {
            extra.push(("original_size", pair(s)));
        }
        if self.crop != (0, 0) {
            extra.push(("crop", pair(self.crop)));
        }
        if let Some(s) = self.target_size {
            extra.push(("target_size", pair(s)));
        }
        let mut text = vec![
            ("prompt", self.prompt.clone()),
            ("negative_prompt", self.negative_prompt.clone().unwrap_or_default()),
            ("seed", self.seed.to_string()),
            ("scheduler", self.scheduler.name().to_string()),
            ("steps", self.steps.to_string()),
            ("guidance_scale", self.guidance_scale.to_string()),
            ("width", width.to_string()),
            ("height", height.to_string()),
            ("model", model),
        ];
        text.extend(extra);
        text
    }
}

/// The largest original or target size and crop offset a request may state (16384 px: well past
/// the 4096 px SDXL's training metadata reaches).
pub const MAX_MICRO_SIZE: i64 = 16384;

/// `seed` as given on the command line: -1 draws a random one (in 0..2^32, short enough to type
/// back), any other value must be >= 0.
pub fn resolve_seed(seed: i64) -> Result<u64> {
    match seed {
        -1 => {
            use std::hash::{BuildHasher, Hasher};
            // std's RandomState is seeded from the OS; mix in the time for good measure
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
            );
            Ok(h.finish() >> 32)
        }
        s if s >= 0 => Ok(s as u64),
        s => bail!("seed = {s}: must be >= 0, or -1 for a random seed"),
    }
}

/// Borrowed parts of a Stable Diffusion pipeline: what `generate_with` needs.
#[derive(Clone, Copy)]
pub struct Parts<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub text_encoder: &'a ClipTextModel,
    pub vae: &'a AutoencoderKL,
    pub unet: &'a UNet2DConditionModel,
    pub schedule: &'a Arc<NoiseSchedule>,
    /// SDXL's second text encoder and its settings; `None` for SD-1.x/2.x.
    pub xl: Option<XlParts<'a>>,
}

/// What an SDXL pipeline adds to SD's parts (diffusers' `StableDiffusionXLPipeline`).
#[derive(Clone, Copy)]
pub struct XlParts<'a> {
    pub tokenizer_2: &'a ClipTokenizer,
    pub text_encoder_2: &'a ClipTextModel,
    /// model_index.json's `force_zeros_for_empty_prompt`: zeros, not the empty prompt's
    /// embeddings, as the unconditional input when no negative prompt is given.
    pub force_zeros_for_empty_prompt: bool,
}

impl Parts<'_> {
    /// (width, height) of the request, or diffusers' default from the UNet and VAE configs;
    /// errors name the value that is not a multiple of 8.
    pub fn image_size(&self, req: &GenerateRequest) -> Result<(i64, i64)> {
        let f = self.vae.config.downscale_factor();
        let default = self.unet.config.sample_size.map(|s| s * f);
        let pick = |name: &str, v: Option<i64>| -> Result<i64> {
            let v = match v.or(default) {
                Some(v) => v,
                None => bail!("{name}: the UNet config has no sample_size, so give the {name} explicitly"),
            };
            ensure!(v > 0 && v % 8 == 0, "{name} = {v}: must be a positive multiple of 8");
            ensure!(v % f == 0, "{name} = {v}: must be a multiple of the VAE's downscale factor {f}");
            Ok(v)
        };
        Ok((pick("width", req.width)?, pick("height", req.height)?))
    }

    /// The parts of the prompt and negative prompt that CLIP's token limit cuts off, as
    /// (`prompt` or `negative_prompt`, the dropped text): diffusers warns with them.
    pub fn truncated_prompts(&self, req: &GenerateRequest) -> Vec<(&'static str, String)> {
        let texts = [("prompt", Some(req.prompt.as_str())), ("negative_prompt", req.negative_prompt.as_deref())];
        texts.into_iter().filter_map(|(name, t)| Some((name, self.tokenizer.truncated_part(t?)?))).collect()
    }

    /// Refuses a size whose largest activations the device cannot hold, before anything is
    /// allocated: LibTorch's failed allocation would otherwise end the process in a panic. The
    /// estimate is a floor: the VAE decoder's full-resolution feature maps (its second-widest
    /// decoder channels), three alive at once. The CPU is bounded by the memory available now,
    /// an accelerator by a trial allocation of that size.
    pub fn check_memory(&self, samples: usize, width: i64, height: i64) -> Result<()> {
        let channels = self.vae.config.block_out_channels.iter().take(2).max().copied().unwrap_or(1);
        let elt = self.vae.kind().elt_size_in_bytes() as f64;
        let bytes = samples as f64 * channels as f64 * width as f64 * height as f64 * elt * 3.0;
        let device = self.vae.device();
        ensure!(
            crate::memory::device_can_hold(device, bytes),
            "width = {width}, height = {height} ({samples} image(s)): decoding needs at least {:.1} GiB, more than {device:?} can allocate; ask for a smaller size",
            bytes / (1u64 << 30) as f64
        );
        Ok(())
    }

    /// The text encoder's output for one prompt, (1, 77, hidden), as the UNet wants it, and for
    /// SDXL the pooled embedding (1, projection_dim): `encode_prompt` of diffusers'
    /// `StableDiffusionXLPipeline` for one prompt (the same text for both encoders): both
    /// encoders' penultimate hidden states concatenated, `text_embeds` of the second.
    fn encode_prompt(&self, text: &str) -> (Tensor, Option<Tensor>) {
        let ids = self.tokenizer.encode_batch(&[text], Device::Cpu);
        let Some(xl) = &self.xl else { return (self.text_encoder.prompt_embeds(&ids, 0), None) };
        let (h1, _) = self.text_encoder.penultimate_and_pooled(&ids, 0);
        let ids2 = xl.tokenizer_2.encode_batch(&[text], Device::Cpu);
        let (h2, pooled) = xl.text_encoder_2.penultimate_and_pooled(&ids2, 0);
        let pooled = pooled.expect("text_encoder_2 is loaded with its projection");
        let h2 = h2.to_device(h1.device()).to_kind(h1.kind());
        (Tensor::cat(&[h1, h2], -1), Some(pooled))
    }

    /// The unconditional embeddings: `negative`'s, or with none given and
    /// `force_zeros_for_empty_prompt` zeros shaped like `cond`'s (SDXL), else the empty prompt's.
    fn encode_negative(&self, negative: Option<&str>, cond: &(Tensor, Option<Tensor>)) -> (Tensor, Option<Tensor>) {
        match (negative, &self.xl) {
            (None, Some(xl)) if xl.force_zeros_for_empty_prompt => (cond.0.zeros_like(), cond.1.as_ref().map(Tensor::zeros_like)),
            _ => self.encode_prompt(negative.unwrap_or("")),
        }
    }
}

/// Runs the pipeline on `parts`; `on_step(done, total)` is called after each step.
/// Returns `req.samples` images of (width, height).
pub fn generate_with(
    parts: &Parts<'_>,
    req: &GenerateRequest,
    on_step: &mut dyn FnMut(usize, usize),
) -> Result<Vec<RgbImage>> {
    generate_until(parts, req, on_step, &|| None)
}

/// A generation that `generate_until`'s `stop` ended early: why, and after how many steps.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cancelled after {done} of {total} steps: {cause}")]
pub struct Cancelled {
    pub cause: String,
    pub done: usize,
    pub total: usize,
}

/// `generate_with`, asking `stop` before each denoising step and before decoding: a cause from
/// it ends the generation there with a `Cancelled` error (the server's cancellation token).
pub fn generate_until(
    parts: &Parts<'_>,
    req: &GenerateRequest,
    on_step: &mut dyn FnMut(usize, usize),
    stop: &dyn Fn() -> Option<String>,
) -> Result<Vec<RgbImage>> {
    let mut result = None;
    generate_batch(parts, &[BatchMember { req, stop, noise: None }], on_step, &mut |_, r| result = Some(r));
    result.expect("generate_batch settles every member")
}

/// One request of a batch (`generate_batch`) and its cancellation token.
pub struct BatchMember<'a> {
    pub req: &'a GenerateRequest,
    pub stop: &'a dyn Fn() -> Option<String>,
    /// The initial noise, (samples, 4, h/f, w/f) on the CPU, instead of drawing it from `req.seed`
    /// (diffusers' `latents=` argument; `sdkd eval --seeding consecutive` draws it from one
    /// generator for the whole run). Step noise still comes from `req.seed`'s generator.
    pub noise: Option<&'a Tensor>,
}

impl GenerateRequest {
    /// Whether `self` and `other` can share one batched UNet call: the same image size, steps and
    /// scheduler (so one timestep per step for all), guidance on or off alike and the same
    /// samples (so each request has the same rows in the batch; the guidance scale itself, the
    /// prompts and the seeds may differ).
    pub fn batches_with(&self, other: &GenerateRequest) -> bool {
        let shape = |r: &GenerateRequest| (r.width, r.height, r.steps, r.scheduler, r.samples, r.do_classifier_free_guidance());
        shape(self) == shape(other)
    }

    /// The UNet batch rows of this request: samples, twice with guidance.
    pub fn unet_rows(&self) -> i64 {
        self.samples as i64 * if self.do_classifier_free_guidance() { 2 } else { 1 }
    }
}

impl Parts<'_> {
    /// Whether `req` runs with classifier-free guidance on this UNet: a guidance scale above 1,
    /// and no guidance embedding (a `time_cond_proj_dim` UNet is guided through it instead, as
    /// diffusers' `do_classifier_free_guidance` says).
    pub fn guided(&self, req: &GenerateRequest) -> bool {
        req.do_classifier_free_guidance() && self.unet.config.time_cond_proj_dim.is_none()
    }

    /// Whether a batch of requests like `req` gives each the pixels of its own unbatched call on
    /// the CPU (measured on LibTorch 2.13's CPU kernels, docs/serve.md): the time path is exact
    /// by construction (`predict_stacked`); a convolution keeps each image's values whatever the
    /// batch once a request brings 2 or more rows (alone, one row runs another algorithm: guidance
    /// off with one sample); the other GEMMs keep a request's rows exact when it brings 12 or
    /// more, or a multiple of 4. The fewest are in the deepest stage, `unet_rows` × its latent
    /// area / 4^(stages - 1): only tiny images on deep UNets fall short (SD-1.5 at 64x64 with
    /// guidance: 2). Requests that fail this run one at a time.
    pub fn batches_exactly(&self, req: &GenerateRequest) -> bool {
        if req.unet_rows() < 2 || self.unet.needs_added_cond() {
            return false;
        }
        let Ok((width, height)) = self.image_size(req) else { return false };
        let f = self.vae.config.downscale_factor();
        let (mut h, mut w) = (height / f, width / f);
        for _ in 1..self.unet.config.block_out_channels.len() {
            (h, w) = ((h + 1) / 2, (w + 1) / 2); // a stride-2 convolution with padding 1
        }
        let rows = req.unet_rows() * h * w;
        rows >= 12 || rows % 4 == 0
    }
}

/// diffusers' `rescale_noise_cfg`: the guided prediction rescaled to the text prediction's
/// standard deviation per image, mixed with it by `guidance_rescale`.
fn rescale_noise_cfg(guided: &Tensor, text: &Tensor, guidance_rescale: f64) -> Tensor {
    let dims: &[i64] = &[1, 2, 3];
    let std_text = text.std_dim(dims, true, true);
    let std_cfg = guided.std_dim(dims, true, true);
    let rescaled = guided * (std_text / std_cfg);
    rescaled * guidance_rescale + guided * (1.0 - guidance_rescale)
}

/// One batch member's state while it denoises.
struct Denoising<'a> {
    index: usize,
    member: &'a BatchMember<'a>,
    context: Tensor,
    /// SDXL's pooled embeddings and time ids, and a guidance-embedding UNet's condition.
    added: AddedCond,
    sampler: Box<dyn Sampler>,
    latents: Tensor,
    /// LibTorch's CPU generator as this request left it: DDPM and Euler ancestral draw their step
    /// noise from it, so each request continues its own seeded sequence, whatever the batch.
    rng: Tensor,
}

/// Generates the compatible requests of `members` (`GenerateRequest::batches_with`) together:
/// one UNet call per step on all of them, stacked request after request (`predict_stacked`).
/// Each request keeps its own prompt, guidance scale, seed, sampler and random sequence, so on
/// the CPU its images equal those it gets alone. `done(i, result)` settles member i once: as soon
/// as it fails its checks, when its `stop` gives a cause (it leaves the batch, the others go on),
/// or with its images after decoding. `on_step` reports the batch's steps.
pub fn generate_batch(
    parts: &Parts<'_>,
    members: &[BatchMember<'_>],
    on_step: &mut dyn FnMut(usize, usize),
    done: &mut dyn FnMut(usize, Result<Vec<RgbImage>>),
) {
    let _no_grad = tch::no_grad_guard();
    if members.len() > 1 && parts.unet.needs_added_cond() {
        // Each request's pooled embedding and time ids condition the time path, which
        // `predict_stacked` computes on one request's rows: such requests run one at a time.
        for (index, member) in members.iter().enumerate() {
            generate_batch(parts, std::slice::from_ref(member), on_step, &mut |_, r| done(index, r));
        }
        return;
    }
    let mut active = vec![];
    for (index, member) in members.iter().enumerate() {
        match start_denoising(parts, index, member, members[0].req) {
            Ok(d) => active.push(d),
            Err(e) => done(index, Err(e)),
        }
    }
    let unet = parts.unet;
    let (device, unet_kind) = (unet.device(), unet.kind());
    let Some(first) = active.first() else { return };
    let total = first.sampler.num_inference_steps();
    let cfg = parts.guided(first.member.req);
    let rows = first.member.req.samples as i64 * if cfg { 2 } else { 1 };
    for i in 0..=total {
        active.retain(|d| match (d.member.stop)() {
            Some(cause) => {
                done(d.index, Err(Cancelled { cause, done: i, total }.into()));
                false
            }
            None => true,
        });
        if active.is_empty() {
            return;
        }
        if i == total {
            break;
        }
        let inputs: Vec<Tensor> = active
            .iter()
            .map(|d| {
                let input = if cfg { Tensor::cat(&[&d.latents, &d.latents], 0) } else { d.latents.shallow_clone() };
                d.sampler.scale_model_input(&input, i)
            })
            .collect();
        let input = if inputs.len() == 1 { inputs[0].shallow_clone() } else { Tensor::cat(&inputs, 0) };
        let context = if active.len() == 1 {
            active[0].context.shallow_clone()
        } else {
            Tensor::cat(&active.iter().map(|d| &d.context).collect::<Vec<_>>(), 0)
        };
        let t = active[0].sampler.timestep_tensor(i, device);
        let pred = unet.predict_stacked(&input.to_kind(unet_kind), &t, &context, &active[0].added, rows).to_kind(Kind::Float);
        let mut failed = vec![];
        for (j, d) in active.iter_mut().enumerate() {
            let pred = pred.narrow(0, j as i64 * rows, rows);
            let req = d.member.req;
            let pred = if cfg {
                let halves = pred.chunk(2, 0);
                let (uncond, text) = (&halves[0], &halves[1]);
                let guided = uncond + (text - uncond) * req.guidance_scale;
                if req.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, text, req.guidance_rescale)
                } else {
                    guided
                }
            } else {
                pred
            };
            let stepped = crate::aten_extra::set_cpu_rng_state(&d.rng).map(|()| d.sampler.step(&pred, i, &d.latents));
            match stepped.and_then(|latents| Ok((latents, crate::aten_extra::cpu_rng_state()?))) {
                Ok((latents, rng)) => (d.latents, d.rng) = (latents, rng),
                Err(e) => failed.push((d.index, e)),
            }
        }
        for (index, e) in failed {
            active.retain(|d| d.index != index);
            done(index, Err(e));
        }
        on_step(i + 1, total);
    }

    // 5: decode and quantise as diffusers' image processor does, one request at a time
    let vae = parts.vae;
    for d in active {
        // a UNet with NaN weights (or one that overflows in fp16) would decode to a flat image
        if d.latents.isfinite().all().int64_value(&[]) == 0 {
            done(d.index, Err(anyhow::anyhow!("the denoised latents hold NaN or infinite values after {total} steps: the UNet's weights or its arithmetic (--dtype) are not finite; no image made")));
            continue;
        }
        let z = (&d.latents / vae.config.scaling_factor).to_device(vae.device()).to_kind(vae.kind());
        let images = vae.decode(&z).to_kind(Kind::Float).to_device(Device::Cpu); // (n, 3, H, W)
        done(d.index, Ok(to_rgb_images(&images)));
    }
}

/// Steps 1-3 for one member: its checks (and that it batches with `first`), prompt embeddings,
/// sampler and seeded initial latents.
fn start_denoising<'a>(parts: &Parts<'_>, index: usize, member: &'a BatchMember<'a>, first: &GenerateRequest) -> Result<Denoising<'a>> {
    let req = member.req;
    req.validate()?;
    ensure!(req.batches_with(first), "request {index} does not batch with the first one (size, steps, scheduler, samples and guidance on/off must agree)");
    let (width, height) = parts.image_size(req)?;
    parts.check_memory(req.samples, width, height)?;
    let unet = parts.unet;
    let (device, unet_kind) = (unet.device(), unet.kind());
    let n = req.samples as i64;

    // 1-2: prompt embeddings, repeated per sample, [uncond; cond] with guidance
    let per_sample = |e: Tensor| -> Tensor {
        let (_, seq, dim) = e.size3().expect("prompt embeddings are (1, seq, dim)");
        e.repeat([1, n, 1]).view([n, seq, dim])
    };
    let per_sample_pooled = |e: Tensor| -> Tensor { e.repeat([1, n]).view([n, -1]) };
    let cond = parts.encode_prompt(&req.prompt);
    let uncond = parts.guided(req).then(|| parts.encode_negative(req.negative_prompt.as_deref(), &cond));
    let (context, pooled) = match uncond {
        Some(uncond) => (
            Tensor::cat(&[per_sample(uncond.0), per_sample(cond.0)], 0),
            cond.1.zip(uncond.1).map(|(c, u)| Tensor::cat(&[per_sample_pooled(u), per_sample_pooled(c)], 0)),
        ),
        None => (per_sample(cond.0), cond.1.map(per_sample_pooled)),
    };
    let context = context.to_device(device).to_kind(unet_kind); // (b, 77, cross_attention_dim)
    let rows = n * if parts.guided(req) { 2 } else { 1 };
    let mut added = AddedCond::default();
    if unet.needs_text_time() {
        let Some(pooled) = pooled else { bail!("the UNet is an SDXL UNet (addition_embed_type \"text_time\") but the pipeline has no text_encoder_2") };
        added.text_embeds = Some(pooled.to_device(device).to_kind(unet_kind)); // (b, projection_dim)
        // diffusers makes them in the prompt embeddings' dtype
        let ids = Tensor::from_slice(&req.time_ids(width, height)).to_kind(unet_kind).to_device(device);
        added.time_ids = Some(ids.view([1, 6]).repeat([rows, 1])); // (b, 6)
    }
    if let Some(dim) = unet.config.time_cond_proj_dim {
        // diffusers embeds w = guidance_scale - 1 (the LCM convention), for every row
        let w = Tensor::from_slice(&[(req.guidance_scale - 1.0) as f32]);
        added.timestep_cond = Some(guidance_scale_embedding(&w, dim).repeat([rows, 1]).to_device(device).to_kind(unet_kind));
    }

    // 3: the sampler and the initial latents from the seed
    let sampler = req.scheduler.build(parts.schedule, req.steps)?;
    let f = parts.vae.config.downscale_factor();
    let shape = [n, unet.config.in_channels, height / f, width / f];
    tch::manual_seed(req.seed as i64); // the same bits as torch's manual_seed(u64)
    let noise = match member.noise {
        Some(noise) => {
            ensure!(noise.size() == shape, "request {index}: initial noise of shape {:?}, expected {shape:?}", noise.size());
            noise.to_kind(Kind::Float).to_device(device)
        }
        None => randn(&shape, Kind::Float, device),
    };
    let latents = noise * sampler.init_noise_sigma();
    let rng = crate::aten_extra::cpu_rng_state()?;
    Ok(Denoising { index, member, context, added, sampler, latents, rng })
}

/// A validation grid's rows: one per UNet of `unets` (run on `parts`' other parts), one image per
/// prompt, each made with `req` and that prompt.
pub fn prompt_rows(parts: &Parts<'_>, unets: &[&UNet2DConditionModel], prompts: &[String], req: &GenerateRequest) -> Result<Vec<Vec<RgbImage>>> {
    let mut rows = vec![];
    for &unet in unets {
        let mut row = vec![];
        for prompt in prompts {
            let req = GenerateRequest { prompt: prompt.clone(), ..req.clone() };
            row.extend(generate_with(&Parts { unet, ..*parts }, &req, &mut |_, _| {})?);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// (n, 3, H, W) decoder output in [-1, 1] -> RGB images, rounded as diffusers' `numpy_to_pil`.
pub fn to_rgb_images(images: &Tensor) -> Vec<RgbImage> {
    let (n, c, h, w) = images.size4().expect("images must be (n, 3, H, W)");
    assert_eq!(c, 3, "images must have 3 channels, got {c}");
    let x = (images.to_kind(Kind::Float) * 0.5 + 0.5).clamp(0.0, 1.0);
    let x = (x * 255.0).round().to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous(); // (n, H, W, 3)
    (0..n)
        .map(|i| {
            let bytes = Vec::<u8>::try_from(&x.get(i).view(-1)).expect("u8 image to bytes");
            RgbImage::from_raw(w as u32, h as u32, bytes).expect("image buffer of the right size")
        })
        .collect()
}

/// A Stable Diffusion pipeline loaded once: tokenizer, text encoder, VAE, UNet and the noise
/// schedule of its `scheduler_config.json` (every sampler is configured from it).
pub struct TextToImage {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    pub vae: Vae,
    pub unet: UNet,
    pub schedule: Arc<NoiseSchedule>,
    /// SDXL's second tokenizer and text encoder.
    pub xl: Option<XlEncoder>,
}

/// SDXL's second text encoder, owned (`XlParts` borrows it).
pub struct XlEncoder {
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextEncoder,
    pub force_zeros_for_empty_prompt: bool,
}

impl TextToImage {
    /// Loads the pipeline folder or single file `model_dir` on `device`, with `unet` replacing its UNet when
    /// given. The UNet and text encoders run in `kind`; the VAE decodes in fp32 unless its
    /// config sets `force_upcast: false` (as diffusers: SD's VAEs overflow fp16, SDXL's fp16-fix
    /// VAE does not). An SDXL pipeline (`StableDiffusionXLPipeline`) also loads `tokenizer_2`
    /// and `text_encoder_2`.
    pub fn load(model_dir: &Path, unet: Option<&UnetSource>, device: Device, kind: Kind) -> Result<Self> {
        let pipe = PipelineDir::open(model_dir)?;
        let config = pipe.scheduler_config()?;
        let schedule = Arc::new(
            NoiseSchedule::new(config).with_context(|| format!("pipeline {}: scheduler config", model_dir.display()))?,
        );
        let unet = match unet {
            Some(source) => source.load(device, kind)?,
            None => pipe.load_unet(device, kind)?,
        };
        let vae_kind = if pipe.vae_config()?.force_upcast { Kind::Float } else { kind };
        let xl = if pipe.is_xl() {
            Some(XlEncoder {
                tokenizer_2: pipe.load_tokenizer_2()?,
                text_encoder_2: pipe.load_text_encoder_2(device, kind)?,
                force_zeros_for_empty_prompt: pipe.force_zeros_for_empty_prompt()?,
            })
        } else {
            None
        };
        let t2i = TextToImage {
            tokenizer: pipe.load_tokenizer()?,
            text_encoder: pipe.load_text_encoder(device, kind)?,
            vae: pipe.load_vae(device, vae_kind)?,
            unet,
            schedule,
            xl,
        };
        t2i.check_compatible(&t2i.unet.model).with_context(|| format!("pipeline {}", model_dir.display()))?;
        Ok(t2i)
    }

    /// `load`, then each LoRA fused into the UNet and text encoders at its scale (the one way
    /// generate, serve and eval load a pipeline with LoRAs).
    pub fn load_with_loras(model_dir: &Path, unet: Option<&UnetSource>, loras: &[ScaledLora], device: Device, kind: Kind) -> Result<Self> {
        let t2i = Self::load(model_dir, unet, device, kind)?;
        t2i.fuse_loras(loras)?;
        Ok(t2i)
    }

    /// The layers a LoRA may adapt: the UNet's and both text encoders'.
    pub fn lora_targets(&self) -> Targets {
        let targets = Targets::new(&self.unet.model.config, &self.unet.vs.variables()).with(Component::TextEncoder, &self.text_encoder.vs.variables());
        match &self.xl {
            Some(xl) => targets.with(Component::TextEncoder2, &xl.text_encoder_2.vs.variables()),
            None => targets,
        }
    }

    /// Fuses each LoRA into the weights (`W += scale · alpha/r · B·A`, diffusers' `fuse_lora`),
    /// in the order given. Every file is read and checked against this pipeline before any
    /// weight changes, so a refused file leaves the pipeline as it was.
    pub fn fuse_loras(&self, loras: &[ScaledLora]) -> Result<()> {
        if loras.is_empty() {
            return Ok(());
        }
        let targets = self.lora_targets();
        let sets: Vec<LoraSet> = loras.iter().map(|l| LoraSet::read(&l.path, &targets)).collect::<Result<_>>()?;
        for (lora, set) in loras.iter().zip(&sets) {
            let what = || format!("LoRA file {}", lora.path.display());
            fuse_into(&self.unet.vs.variables(), set, Component::Unet, lora.scale).with_context(what)?;
            fuse_into(&self.text_encoder.vs.variables(), set, Component::TextEncoder, lora.scale).with_context(what)?;
            if let Some(xl) = &self.xl {
                fuse_into(&xl.text_encoder_2.vs.variables(), set, Component::TextEncoder2, lora.scale).with_context(what)?;
            }
        }
        Ok(())
    }

    /// Checks that `unet` fits this pipeline's text encoder and VAE (a swapped-in UNet must).
    pub fn check_compatible(&self, unet: &UNet2DConditionModel) -> Result<()> {
        let (c, latent) = (&unet.config, self.vae.model.config.latent_channels);
        let hidden = self.text_encoder.model.config.hidden_size;
        match &self.xl {
            None => {
                ensure!(
                    c.cross_attention_dim == hidden,
                    "the UNet's cross_attention_dim {} differs from the text encoder's hidden_size {hidden}",
                    c.cross_attention_dim
                );
                ensure!(
                    c.addition_embed.is_none(),
                    "the UNet is an SDXL UNet (addition_embed_type \"text_time\"), but the pipeline is not an SDXL pipeline (model_index.json \"_class_name\": StableDiffusionXLPipeline, with text_encoder_2)"
                );
            }
            Some(xl) => {
                let c2 = &xl.text_encoder_2.model.config;
                ensure!(
                    c.cross_attention_dim == hidden + c2.hidden_size,
                    "the UNet's cross_attention_dim {} differs from the text encoders' hidden sizes {hidden} + {} together",
                    c.cross_attention_dim,
                    c2.hidden_size
                );
                let Some(e) = c.addition_embed else {
                    bail!("the pipeline is an SDXL pipeline but its UNet has no addition_embed_type \"text_time\" (the pooled embedding and time ids)")
                };
                ensure!(
                    e.input_dim == c2.projection_dim + TIME_IDS * e.time_embed_dim,
                    "the UNet's projection_class_embeddings_input_dim {} is not text_encoder_2's projection_dim {} + {TIME_IDS} time ids x addition_time_embed_dim {} (the SDXL refiner's UNet takes 5 time ids: not supported)",
                    e.input_dim,
                    c2.projection_dim,
                    e.time_embed_dim
                );
            }
        }
        ensure!(
            c.in_channels == latent && c.out_channels == latent,
            "the UNet's in/out channels {}/{} differ from the VAE's latent_channels {latent}",
            c.in_channels,
            c.out_channels
        );
        Ok(())
    }

    /// The borrowed parts, with this pipeline's UNet. Replace `unet` to render with another one:
    /// `generate_with(&Parts { unet: &student.model, ..t2i.parts() }, &req, &mut |_, _| {})`.
    pub fn parts(&self) -> Parts<'_> {
        Parts {
            tokenizer: &self.tokenizer,
            text_encoder: &self.text_encoder.model,
            vae: &self.vae.model,
            unet: &self.unet.model,
            schedule: &self.schedule,
            xl: self.xl.as_ref().map(|x| XlParts {
                tokenizer_2: &x.tokenizer_2,
                text_encoder_2: &x.text_encoder_2.model,
                force_zeros_for_empty_prompt: x.force_zeros_for_empty_prompt,
            }),
        }
    }

    pub fn generate(&self, req: &GenerateRequest) -> Result<Vec<RgbImage>> {
        generate_with(&self.parts(), req, &mut |_, _| {})
    }

    /// `generate` reporting each step to `on_step(done, total)`.
    pub fn generate_with_progress(
        &self,
        req: &GenerateRequest,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<RgbImage>> {
        generate_with(&self.parts(), req, on_step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds() {
        assert_eq!(resolve_seed(0).unwrap(), 0);
        assert_eq!(resolve_seed(2313248373).unwrap(), 2313248373);
        assert!(resolve_seed(-1).unwrap() < 1 << 32);
        let e = resolve_seed(-2).unwrap_err().to_string();
        assert!(e.contains("-2"), "{e}");
    }

    #[test]
    fn request_checks_name_the_value() {
        let req = GenerateRequest { width: Some(30), ..Default::default() };
        let e = req.validate().unwrap_err().to_string();
        assert!(e.contains("width") && e.contains("30"), "{e}");
        let req = GenerateRequest { height: Some(0), ..Default::default() };
        assert!(req.validate().unwrap_err().to_string().contains("height"));
        let req = GenerateRequest { guidance_scale: f64::NAN, ..Default::default() };
        assert!(req.validate().unwrap_err().to_string().contains("guidance_scale"));
        assert!(GenerateRequest::default().validate().is_ok());
    }

    #[test]
    fn quantisation_clamps_and_rounds() {
        // channels [-1.5, -1], [0, 1], [2, 0.001] -> (x·0.5 + 0.5).clamp(0, 1)·255 rounded
        let x = Tensor::from_slice(&[-1.5f32, -1.0, 0.0, 1.0, 2.0, 0.001]).view([1, 3, 1, 2]);
        let img = &to_rgb_images(&x)[0];
        assert_eq!(img.get_pixel(0, 0).0, [0, 128, 255]); // 127.5 rounds to even 128
        assert_eq!(img.get_pixel(1, 0).0, [0, 255, 128]); // 127.6275
        let y = Tensor::from_slice(&[-0.004f32; 3]).view([1, 3, 1, 1]);
        assert_eq!(to_rgb_images(&y)[0].get_pixel(0, 0).0, [127; 3]); // 126.99
    }
}
