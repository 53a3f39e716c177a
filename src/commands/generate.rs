//! `sdkd generate`: text to image with a pipeline folder, optionally with another UNet (a pruned
//! or distilled student). Writes PNGs whose text chunks record how they were made (prompt,
//! negative_prompt, seed, scheduler, steps, guidance_scale, size, model, unet).
//!
//! Defaults are those of `sdkd serve` (docs/serve.md): UniPC, 20 steps, guidance 7.5, a random seed (-1),
//! the size diffusers picks (the UNet's sample_size × the VAE's downscale factor).
use crate::runtime::{DeviceChoice, Precision};
use crate::lora::ScaledLora;
use crate::pipeline::{resolve_seed, GenerateRequest, TextToImage, UnetSource};
use crate::png_meta::write_png;
use crate::schedulers::SchedulerKind;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The model to run: a pipeline folder, optionally with another UNet (`generate` and `serve`).
#[derive(Args, Debug)]
pub struct PipelineArgs {
    /// A diffusers Stable Diffusion pipeline folder, or a single-file checkpoint (LDM layout), or
    /// a hub id (`org/name[@revision]`, `org/name/file.safetensors`).
    #[arg(long)]
    pub model: PathBuf,
    /// A UNet to use instead of the pipeline's: a UNet folder (from prune or export), a pipeline
    /// folder, a training checkpoint folder (unet/config.json + student.safetensors), or a run's
    /// final/ folder (unet/).
    #[arg(long)]
    pub unet: Option<PathBuf>,
    /// With --unet: the EMA weights (a checkpoint's ema.safetensors, a run's final/unet_ema/).
    #[arg(long)]
    pub ema: bool,
    /// A LoRA to fuse into the UNet and text encoders, FILE[:SCALE] (scale 1 when not given);
    /// repeatable, fused in order. Both layouts: diffusers/PEFT (pytorch_lora_weights.safetensors)
    /// and kohya's (A1111, ComfyUI). See docs/lora.md.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<PathBuf>,
    /// The dtype the UNet and text encoder run in (fp16/bf16 for GPUs; the VAE decodes in fp32).
    /// Only fp32 reproduces diffusers' fp32 images exactly.
    #[arg(long, value_enum, default_value = "fp32")]
    pub dtype: Precision,
}

impl PipelineArgs {
    /// The --lora arguments parsed (a scale that is not a number is refused naming it).
    pub fn loras(&self) -> Result<Vec<ScaledLora>> {
        self.loras.iter().map(|l| ScaledLora::parse(l).context("--lora")).collect()
    }

    /// Loads the pipeline (with the --unet swapped in and the --lora files fused) on `device`;
    /// also returns where the UNet came from when it is not the pipeline's.
    pub fn load(&self, device: tch::Device) -> Result<(TextToImage, Option<UnetSource>)> {
        use crate::hub::{local, Want};
        let loras = self.loras()?;
        let unet = self.unet.as_deref().map(|p| UnetSource::resolve(&local(p, Want::Unet)?, self.ema)).transpose()?;
        let t2i = TextToImage::load_with_loras(&local(&self.model, Want::Pipeline)?, unet.as_ref(), &loras, device, self.dtype.kind())?;
        Ok((t2i, unet))
    }

    /// How the model is described (PNG text, serve's log): the pipeline, the --unet, the LoRAs.
    pub fn lora_text(&self) -> Result<Option<String>> {
        let loras = self.loras()?;
        Ok((!loras.is_empty()).then(|| describe_loras(&loras)))
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from (default: the empty prompt, as diffusers).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// ddpm, ddim, euler, euler_a, dpmpp_2m, unipc or pndm (also diffusers' class names).
    #[arg(long, default_value = "unipc")]
    pub scheduler: SchedulerKind,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale; guidance is off at 1 or below.
    #[arg(long, default_value_t = 7.5)]
    pub guidance_scale: f64,
    /// -1 draws a random seed and prints it. On the CPU, seed S gives diffusers' image with
    /// `torch.Generator("cpu").manual_seed(S)`.
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub seed: i64,
    /// Pixels, a multiple of 8 (default: the UNet's sample_size × the VAE's factor).
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub height: Option<i64>,
    /// Images from one seed, 1 to 4: `out.png` becomes out-0.png, out-1.png, ...
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// A .png file, or a folder (created) that gets image-0.png, image-1.png, ...
    #[arg(long)]
    pub out: PathBuf,
    /// Replace PNGs at the output paths that an earlier `sdkd generate` wrote (any other file
    /// there is refused, with or without it).
    #[arg(long)]
    pub overwrite: bool,
    /// diffusers' `guidance_rescale` (0 to 1; 0 is off): the guided prediction pulled back to the
    /// text prediction's standard deviation, against over-exposure.
    #[arg(long, default_value_t = 0.0)]
    pub guidance_rescale: f64,
    /// SDXL micro-conditioning: the size the model is told the training image had, as
    /// HEIGHT,WIDTH in pixels (diffusers' `original_size`; default: the output size).
    #[arg(long, value_parser = parse_pair)]
    pub original_size: Option<(i64, i64)>,
    /// SDXL: the crop's top-left corner as TOP,LEFT in pixels (`crops_coords_top_left`; default 0,0).
    #[arg(long, value_parser = parse_pair)]
    pub crop: Option<(i64, i64)>,
    /// SDXL: the target size as HEIGHT,WIDTH (`target_size`; default: the output size).
    #[arg(long, value_parser = parse_pair)]
    pub target_size: Option<(i64, i64)>,
    /// auto, cpu, cuda or cuda:N. The seed reproduces diffusers' images on any device (the noise
    /// is drawn on the CPU), up to the device's arithmetic.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// `file:scale, file:scale` as the PNG text and logs record the LoRAs.
pub fn describe_loras(loras: &[ScaledLora]) -> String {
    loras.iter().map(|l| format!("{}:{}", l.path.display(), l.scale)).collect::<Vec<_>>().join(", ")
}

/// `A,B` as two integers (`--original-size 1024,768`).
fn parse_pair(s: &str) -> Result<(i64, i64), String> {
    let parse = |v: &str| v.trim().parse::<i64>().map_err(|_| format!("{s:?}: expected two integers as A,B (e.g. 1024,1024)"));
    match s.split_once(',') {
        Some((a, b)) => Ok((parse(a)?, parse(b)?)),
        None => Err(format!("{s:?}: expected two integers as A,B (e.g. 1024,1024)")),
    }
}

/// Where the `samples` images go: `out` itself for one image to a .png path, numbered siblings
/// for several, `image-<i>.png` inside `out` when it is a folder.
pub fn output_paths(out: &Path, samples: usize) -> Result<Vec<PathBuf>> {
    let ext = out.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") if !out.is_dir() => {
            if samples == 1 {
                return Ok(vec![out.to_path_buf()]);
            }
            let stem = out.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            Ok((0..samples).map(|i| out.with_file_name(format!("{stem}-{i}.png"))).collect())
        }
        Some(other) if !out.is_dir() => {
            bail!("--out {}: .{other} is not supported; give a .png file or a folder", out.display())
        }
        _ => {
            if out.exists() && !out.is_dir() {
                bail!("--out {}: exists and is not a folder", out.display());
            }
            Ok((0..samples).map(|i| out.join(format!("image-{i}.png"))).collect())
        }
    }
}

/// Whether the PNG at `path` is one `sdkd generate` wrote (its `Software` text chunk).
fn written_by_generate(path: &Path) -> bool {
    crate::png_meta::read_png_text(path).is_ok_and(|t| t.iter().any(|(k, v)| k == "Software" && v.starts_with("sdkd ")))
}

/// The overwrite rule for every output path (before anything is loaded): a new name, or an image
/// an earlier `sdkd generate` wrote with `--overwrite`.
pub fn check_outputs(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for path in paths {
        crate::fs_safe::check_file_replaceable(path, || written_by_generate(path), overwrite, "--out")?;
    }
    Ok(())
}

fn progress_bar(steps: usize) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise} ({eta} left)")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix("denoising");
    bar
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    if !(1..=4).contains(&args.samples) {
        bail!("--samples {}: must be 1 to 4", args.samples);
    }
    let seed = resolve_seed(args.seed).context("--seed")?;
    let req = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        scheduler: args.scheduler,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        seed,
        width: args.width,
        height: args.height,
        samples: args.samples,
        guidance_rescale: args.guidance_rescale,
        original_size: args.original_size,
        crop: args.crop.unwrap_or((0, 0)),
        target_size: args.target_size,
    };
    // bad sizes and counts fail before anything is loaded
    req.validate()?;
    let paths = output_paths(&args.out, args.samples)?;
    check_outputs(&paths, args.overwrite)?;
    let device = args.device.resolve().context("--device")?;

    let (t2i, unet) = args.pipeline.load(device)?;
    if !t2i.unet.model.needs_text_time() {
        let given = [("--original-size", args.original_size.is_some()), ("--crop", args.crop.is_some()), ("--target-size", args.target_size.is_some())];
        if let Some((flag, _)) = given.iter().find(|(_, set)| *set) {
            bail!("{flag}: only SDXL UNets (addition_embed_type \"text_time\") read the micro-conditioning; {} has none", args.pipeline.model.display());
        }
    }
    if t2i.unet.model.config.time_cond_proj_dim.is_some() && req.negative_prompt.is_some() {
        eprintln!("note: --negative-prompt is not used: the UNet has time_cond_proj_dim, so --guidance-scale is embedded (w = g - 1) and there is no unconditional batch, as in diffusers (docs/lcm.md)");
    }
    let (width, height) = t2i.parts().image_size(&req)?;
    t2i.parts().check_memory(req.samples, width, height).context("--width/--height/--samples")?;
    for (name, dropped) in t2i.parts().truncated_prompts(&req) {
        let flag = if name == "prompt" { "--prompt" } else { "--negative-prompt" };
        eprintln!(
            "warning: {flag}: the following part was truncated because CLIP can only handle sequences up to {} tokens: {dropped:?}",
            t2i.tokenizer.model_max_length()
        );
    }
    let bar = progress_bar(req.steps);
    let images = t2i.generate_with_progress(&req, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();

    for dir in paths.iter().filter_map(|p| p.parent()).filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut text = req.png_text(width, height, args.pipeline.model.display().to_string());
    if let Some(u) = &unet {
        text.push(("unet", u.describe()));
    }
    text.extend(args.pipeline.lora_text()?.map(|l| ("lora", l)));
    if args.pipeline.dtype != Precision::Fp32 {
        text.push(("dtype", args.pipeline.dtype.name().to_string()));
    }
    text.push(("samples", req.samples.to_string()));
    text.push(("Software", format!("sdkd {}", env!("CARGO_PKG_VERSION"))));
    for (i, (image, path)) in images.iter().zip(&paths).enumerate() {
        let mut chunks = text.clone();
        chunks.push(("sample_index", i.to_string()));
        crate::fs_safe::write_file_with(path, |tmp| write_png(tmp, image, &chunks))?;
        println!("wrote {}", path.display());
    }
    let random = if args.seed == -1 { " (random)" } else { "" };
    println!(
        "seed {seed}{random}, {} {} steps, guidance {}, {width}x{height}",
        req.scheduler, req.steps, req.guidance_scale
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_number_files_or_fill_a_folder() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(output_paths(&p("a/out.png"), 1).unwrap(), vec![p("a/out.png")]);
        assert_eq!(output_paths(&p("a/out.PNG"), 2).unwrap(), vec![p("a/out-0.png"), p("a/out-1.png")]);
        assert_eq!(output_paths(&p("imgs"), 2).unwrap(), vec![p("imgs/image-0.png"), p("imgs/image-1.png")]);
        let e = output_paths(&p("out.jpg"), 1).unwrap_err().to_string();
        assert!(e.contains("out.jpg"), "{e}");
    }
}
