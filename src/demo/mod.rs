//! The demo's embedded teacher pipeline. No pretrained weights are reachable, so `sdkd demo`
//! makes its own Stable Diffusion pipeline folder from the synthetic dataset: a BPE tokenizer
//! over the captions' words, a frozen random CLIP text encoder, a small VAE trained here on the
//! images, SD-1.5's DDPM schedule with v-prediction and a randomly initialised SD-1.x-shaped UNet that the demo
//! then trains. The folder is an ordinary diffusers `StableDiffusionPipeline` folder: sdkd's
//! `PipelineDir` and diffusers' `from_pretrained` both load it. With `DemoFamily::Sdxl` it is a
//! `StableDiffusionXLPipeline` folder: a second tokenizer and a second frozen random text
//! encoder with a projection (the pooled embedding), and an SDXL-shaped UNet.
pub mod caption_score;
pub mod lcm_stage;
pub mod parts;
pub mod run;
pub mod tokenizer;
pub mod vae_train;

pub use parts::{DemoFamily, DEMO_RESOLUTION};
pub use tokenizer::DemoVocab;
pub use vae_train::{VaeTrainOptions, VaeTrainStats};

use crate::models::clip::ClipTextEncoder;
use crate::models::weights::{named_tensors, save};
use crate::models::{Init, UNet, Vae};
use crate::pipeline::to_rgb_images;
use anyhow::{bail, Context, Result};
use image::RgbImage;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// How the demo teacher is made.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoTeacherOptions {
    pub family: DemoFamily,
    /// Seeds every random part: text encoder, UNet and VAE init, VAE batches and noise.
    pub seed: u64,
    /// VAE training (its `seed` is replaced by one derived from `seed`).
    pub vae: VaeTrainOptions,
    /// How many images at the end of the dataset are kept out of VAE training to measure it.
    pub held_out: usize,
    /// How many held-out images the reconstruction grid shows.
    pub grid_images: usize,
    pub device: Device,
}

impl Default for DemoTeacherOptions {
    fn default() -> Self {
        DemoTeacherOptions { family: DemoFamily::Sd, seed: 0, vae: VaeTrainOptions::default(), held_out: 64, grid_images: 8, device: Device::Cpu }
    }
}

/// What `build_demo_teacher` wrote and measured.
#[derive(Debug)]
pub struct DemoTeacherReport {
    pub dir: PathBuf,
    /// Image side in pixels, and latent side.
    pub resolution: u32,
    pub latent_size: i64,
    pub vocab: DemoVocab,
    pub unet_params: i64,
    pub vae_params: i64,
    /// Both text encoders' parameters for SDXL.
    pub text_encoder_params: i64,
    pub vae_stats: VaeTrainStats,
    /// Reconstruction PSNR (dB, decoding the posterior mean) on the training images and on the
    /// held-out ones.
    pub psnr_train: f64,
    pub psnr_held_out: f64,
    /// Std of the unscaled latents, and the `scaling_factor` (its inverse) written to the config.
    pub latent_std: f64,
    pub scaling_factor: f64,
    /// Held-out originals (top row) over their reconstructions (bottom row), 4× enlarged.
    pub grid: RgbImage,
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
}

fn part_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes a complete diffusers `StableDiffusionPipeline` folder (`StableDiffusionXLPipeline` for
/// `opts.family` SDXL) into `out_dir` (created, or overwritten if it holds an earlier pipeline):
/// tokenizer/ and text_encoder/ (seeded random, frozen; SDXL adds tokenizer_2/ and
/// text_encoder_2/), vae/ (trained on the imagefolder `data_dir`, whose images must be square and of one
/// size), scheduler/ (DDPM), unet/ (seeded random: the demo trains it). The same options and
/// data give the same files.
pub fn build_demo_teacher(out_dir: &Path, data_dir: &Path, opts: &DemoTeacherOptions) -> Result<DemoTeacherReport> {
    if out_dir.exists() {
        let non_empty = std::fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))?.next().is_some();
        if non_empty && !out_dir.join("model_index.json").is_file() {
            bail!("{} is not empty and holds no earlier pipeline (model_index.json): choose an empty or new folder", out_dir.display());
        }
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let (images, _captions) = vae_train::load_images(data_dir)?;
    let n = images.size()[0] as usize;
    let resolution = images.size()[2] as u32;
    let held_out = opts.held_out.min(n / 4);
    if n - held_out == 0 {
        bail!("{}: {n} images are too few to train the demo VAE", data_dir.display());
    }
    let train = images.narrow(0, 0, (n - held_out) as i64);
    let test = images.narrow(0, (n - held_out) as i64, held_out as i64);

    // tokenizer and text encoder
    let vocab = tokenizer::write_demo_tokenizer(&out_dir.join("tokenizer"))?;
    let te_config = parts::text_encoder_config(vocab.vocab_size as i64, vocab.eos_id);
    tch::manual_seed(opts.seed as i64);
    let text_encoder = ClipTextEncoder::build(&te_config, opts.device, Kind::Float, Init::Torch);
    let dir = part_dir(out_dir, "text_encoder")?;
    write_json(&dir.join("config.json"), &parts::text_encoder_json(&te_config, vocab.bos_id, vocab.eos_id))?;
    save(&dir.join("model.safetensors"), &named_tensors(&text_encoder.vs), None)?;
    let mut text_encoder_params = text_encoder.num_params();
    if opts.family == DemoFamily::Sdxl {
        tokenizer::write_demo_tokenizer(&out_dir.join("tokenizer_2"))?;
        let config = parts::text_encoder_2_config(vocab.vocab_size as i64, vocab.eos_id);
        tch::manual_seed(opts.seed as i64 + 5);
        let text_encoder_2 = ClipTextEncoder::build(&config, opts.device, Kind::Float, Init::Torch);
        let dir = part_dir(out_dir, "text_encoder_2")?;
        write_json(&dir.join("config.json"), &parts::text_encoder_json(&config, vocab.bos_id, vocab.eos_id))?;
        save(&dir.join("model.safetensors"), &named_tensors(&text_encoder_2.vs), None)?;
        text_encoder_params += text_encoder_2.num_params();
    }

    // VAE
    let mut vae_config = parts::vae_config(resolution);
    let factor = vae_config.downscale_factor();
    if resolution as i64 % (factor * 8) != 0 {
        bail!("{}: images of {resolution}px do not give latents the UNet's downsamplings divide", data_dir.display());
    }
    let latent_size = resolution as i64 / factor;
    tch::manual_seed(opts.seed as i64 + 2);
    let vae = Vae::build(&vae_config, opts.device, Kind::Float, Init::Torch);
    let vae_opts = VaeTrainOptions { seed: opts.seed.wrapping_add(3), ..opts.vae.clone() };
    let vae_stats = vae_train::train_vae(&vae, &train, &vae_opts)?;
    let rec_train = vae_train::reconstruct(&vae, &train);
    let psnr_train = vae_train::psnr(&rec_train, &train);
    let (psnr_held_out, grid) = if held_out > 0 {
        let rec = vae_train::reconstruct(&vae, &test);
        let k = opts.grid_images.min(held_out) as i64;
        let rows = [to_rgb_images(&test.narrow(0, 0, k).to_device(Device::Cpu)), to_rgb_images(&rec.narrow(0, 0, k).to_device(Device::Cpu))];
        let grid = crate::grid::grid(&crate::grid::enlarged(&rows, 4));
        (vae_train::psnr(&rec, &test), grid)
    } else {
        (f64::NAN, RgbImage::new(1, 1))
    };
    let latent_std = vae_train::latent_std(&vae, &train, opts.seed.wrapping_add(4));
    vae_config.scaling_factor = 1.0 / latent_std;
    let dir = part_dir(out_dir, "vae")?;
    write_json(&dir.join("config.json"), &vae_config.to_json())?;
    save(&dir.join("diffusion_pytorch_model.safetensors"), &named_tensors(&vae.vs), None)?;

    // scheduler and UNet
    let dir = part_dir(out_dir, "scheduler")?;
    let scheduler = parts::scheduler_json();
    write_json(&dir.join("scheduler_config.json"), &scheduler)?;
    let unet_config = parts::unet_config(opts.family, latent_size);
    tch::manual_seed(opts.seed as i64 + 1);
    let unet = UNet::build(&unet_config, opts.device, Kind::Float, Init::Torch);
    let dir = part_dir(out_dir, "unet")?;
    write_json(&dir.join("config.json"), &unet_config.to_json())?;
    save(&dir.join("diffusion_pytorch_model.safetensors"), &named_tensors(&unet.vs), None)?;

    write_json(&out_dir.join("model_index.json"), &parts::pipeline_class(opts.family).model_index_json(scheduler["_class_name"].as_str().expect("parts::scheduler_json names its class")))?;
    Ok(DemoTeacherReport {
        dir: out_dir.to_path_buf(),
        resolution,
        latent_size,
        vocab,
        unet_params: unet.num_params(),
        vae_params: vae.num_params(),
        text_encoder_params,
        vae_stats,
        psnr_train,
        psnr_held_out,
        latent_std,
        scaling_factor: 1.0 / latent_std,
        grid,
    })
}

/// Cosine similarity of two tensors, flattened.
pub fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.flatten(0, -1).to_kind(Kind::Double), b.flatten(0, -1).to_kind(Kind::Double));
    let dot = (&a * &b).sum(Kind::Double).double_value(&[]);
    dot / (a.norm().double_value(&[]) * b.norm().double_value(&[])).max(1e-30)
}
