//! The images an evaluation scores, generated as BK-SDM's `generate.py` makes them (PNDM, 25
//! steps, guidance 7.5, 512², no negative prompt, one generator seeded 1234), several prompts per
//! UNet call through `pipeline::generate_batch`, with seeds that do not depend on the batch size:
//!
//! - `per-image`: image k is diffusers' image with `torch.Generator("cpu").manual_seed(seed + k)`;
//! - `consecutive`: one CPU generator seeded `seed` drawn for the whole run, image k's initial
//!   noise being its k-th `(1, 4, h, w)` draw, as BK-SDM's script at batch size 1 (LibTorch's CPU
//!   `randn` of `(B, 4, h, w)` equals B consecutive `(1, 4, h, w)` draws when 4·h·w is a multiple
//!   of 16, its vectorised normal kernel's chunk, as every size here is: tests/eval_generate.rs).
//!
//! Images are `images/<index>.png` (six digits), each written to a temp file and renamed, so an
//! image present is complete: a rerun keeps them and makes the missing ones, the same images as an
//! uninterrupted run (`consecutive` draws the skipped indices' noise again, which is cheap).
use crate::fs_safe;
use crate::pipeline::{generate_batch, BatchMember, GenerateRequest, Parts};
use crate::png_meta::write_png;
use crate::schedulers::{randn, SchedulerKind};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Seeding {
    /// One generator seeded `seed`, drawn consecutively for the whole run (BK-SDM).
    Consecutive,
    /// Image k from its own generator seeded `seed + k`.
    PerImage,
}

impl Seeding {
    pub fn name(self) -> &'static str {
        match self {
            Seeding::Consecutive => "consecutive",
            Seeding::PerImage => "per-image",
        }
    }

    /// Whether images drawn with `scheduler` stay batch-invariant under this seeding: one
    /// generator's consecutive draws cannot also feed a stochastic sampler's step noise in the
    /// unbatched order.
    pub fn allows(self, scheduler: SchedulerKind) -> bool {
        !(self == Seeding::Consecutive && scheduler.draws_step_noise())
    }
}

/// What decides the images (not the batch size: it changes no pixel on the CPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub scheduler: SchedulerKind,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    pub seeding: Seeding,
    pub resolution: i64,
}

impl Generation {
    /// Image `index`'s request for `prompt`.
    pub fn request(&self, prompt: &str, index: usize) -> Result<GenerateRequest> {
        let seed = match self.seeding {
            Seeding::PerImage => self.seed + index as u64,
            Seeding::Consecutive => self.seed,
        };
        Ok(GenerateRequest {
            prompt: prompt.to_string(),
            negative_prompt: None,
            scheduler: self.scheduler,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed,
            width: Some(self.resolution),
            height: Some(self.resolution),
            samples: 1,
            ..GenerateRequest::default()
        })
    }

    /// Refuses what batching could not reproduce (`Seeding::allows`).
    pub fn validate(&self) -> Result<()> {
        let s = self.scheduler;
        if !self.seeding.allows(s) {
            bail!("--scheduler {s} draws step noise, which --seeding consecutive cannot keep batch-invariant: use --seeding per-image");
        }
        self.request("", 0)?.validate()
    }
}

/// Image `index`'s file name in the images folder.
pub fn image_name(index: usize) -> String {
    format!("{index:06}.png")
}

/// What `generate_missing` did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub kept: usize,
    pub generated: usize,
    /// Wall seconds of the generation (prompt encoding, denoising, decoding, writing).
    pub seconds: f64,
}

/// Makes the images of `prompts` missing from `dir` (`image_name`), `batch_size` per UNet call;
/// `text` is written into every PNG beside its prompt, seed and index. `progress(done, total)`
/// after each batch.
pub fn generate_missing(
    parts: &Parts<'_>,
    prompts: &[String],
    g: &Generation,
    batch_size: usize,
    dir: &Path,
    text: &[(&'static str, String)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Outcome> {
    g.validate()?;
    std::fs::create_dir_all(dir)?;
    fs_safe::clean_stale(dir)?;
    let path = |k: usize| dir.join(image_name(k));
    let missing: Vec<usize> = (0..prompts.len()).filter(|&k| !path(k).is_file()).collect();
    let mut outcome = Outcome { kept: prompts.len() - missing.len(), ..Default::default() };
    if missing.is_empty() {
        return Ok(outcome);
    }
    let start = std::time::Instant::now();
    let first = g.request(&prompts[missing[0]], missing[0])?;
    let (width, height) = parts.image_size(&first)?;
    // a batch that would change pixels on the CPU (a tiny latent on a deep UNet) runs one by one
    let batch_size = if parts.batches_exactly(&first) { batch_size.max(1) } else { 1 };
    let f = parts.vae.config.downscale_factor();
    let shape = [1, parts.unet.config.in_channels, height / f, width / f];

    // consecutive: the run's generator, advanced past every index, made or kept
    let mut stream = None;
    if g.seeding == Seeding::Consecutive {
        tch::manual_seed(g.seed as i64);
        stream = Some(crate::aten_extra::cpu_rng_state()?);
    }
    let mut draw = |n: usize| -> Result<Vec<Tensor>> {
        let Some(state) = stream.as_mut() else { return Ok(vec![]) };
        crate::aten_extra::set_cpu_rng_state(state)?;
        let drawn = (0..n).map(|_| randn(&shape, Kind::Float, tch::Device::Cpu)).collect();
        *state = crate::aten_extra::cpu_rng_state()?;
        Ok(drawn)
    };
    let mut drawn = 0; // indices below this have had their draw
    let mut noise: std::collections::HashMap<usize, Tensor> = Default::default();
    for batch in missing.chunks(batch_size) {
        if g.seeding == Seeding::Consecutive {
            let upto = batch[batch.len() - 1] + 1;
            for (k, n) in (drawn..upto).zip(draw(upto - drawn)?) {
                if batch.contains(&k) {
                    noise.insert(k, n);
                }
            }
            drawn = upto;
        }
        let reqs: Vec<GenerateRequest> = batch.iter().map(|&k| g.request(&prompts[k], k)).collect::<Result<_>>()?;
        let never = || None;
        let members: Vec<BatchMember> = batch
            .iter()
            .zip(&reqs)
            .map(|(k, req)| BatchMember { req, stop: &never, noise: noise.get(k) })
            .collect();
        let mut results: Vec<Option<Result<Vec<image::RgbImage>>>> = batch.iter().map(|_| None).collect();
        generate_batch(parts, &members, &mut |_, _| {}, &mut |i, r| results[i] = Some(r));
        drop(members);
        for ((&k, req), r) in batch.iter().zip(&reqs).zip(results) {
            let image = r.unwrap_or_else(|| bail!("image {k} was never settled"))?.remove(0);
            let mut chunks = req.png_text(width, height, String::new());
            chunks.retain(|(key, _)| *key != "model");
            chunks.extend(text.iter().cloned());
            chunks.push(("index", k.to_string()));
            chunks.push(("seeding", g.seeding.name().to_string()));
            let target: PathBuf = path(k);
            fs_safe::write_file_with(&target, |tmp| write_png(tmp, &image, &chunks))?;
            outcome.generated += 1;
        }
        noise.clear();
        progress(outcome.kept + outcome.generated, prompts.len());
    }
    outcome.seconds = start.elapsed().as_secs_f64();
    Ok(outcome)
}

/// Copies of `paths` in `dir` resized to `size`² with Pillow's BICUBIC (BK-SDM scores its 512²
/// images at 256²: `img.resize((256, 256), Image.BICUBIC)`, no crop); those already there are
/// kept. Returns the copies' paths.
pub fn resized(paths: &[PathBuf], dir: &Path, size: u32) -> Result<Vec<PathBuf>> {
    use crate::data::transform::{resize, Filter};
    std::fs::create_dir_all(dir)?;
    fs_safe::clean_stale(dir)?;
    let mut out = vec![];
    for p in paths {
        let target = dir.join(p.file_name().expect("image paths have names"));
        if !target.is_file() {
            let img = image::open(p).map_err(|e| anyhow::anyhow!("decoding {}: {e}", p.display()))?.to_rgb8();
            let small = resize(&img, (size, size), Filter::Bicubic);
            fs_safe::write_file_with(&target, |tmp| write_png(tmp, &small, &[]))?;
        }
        out.push(target);
    }
    Ok(out)
}
