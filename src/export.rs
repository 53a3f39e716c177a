//! Writing what sdkd makes: a diffusers UNet folder (config.json +
//! diffusion_pytorch_model.safetensors), a whole pipeline folder (the teacher's other parts
//! beside the new unet/), or a single file in the LDM layout (`models::single_file`) for
//! ComfyUI, A1111 and sd.cpp. Each is written through `fs_safe` (complete or absent after a
//! crash) and carries its mark (a folder's marker, a single file's header key), so a later
//! `--overwrite` knows sdkd made it.
use crate::fs_safe::{self, Marker, Purpose};
use crate::models::{single_file, weights, ClipTokenizer, PipelineClass, PipelineDir, UNetConfig};
use crate::schedulers::config::LcmGrid;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A diffusers UNet folder.
    Unet,
    /// A whole StableDiffusionPipeline folder: the teacher's parts with the new unet/.
    Pipeline,
    /// One .safetensors file in the LDM layout with the teacher's VAE and text encoder (and a
    /// .yaml of the UNet's LDM config beside it).
    #[serde(rename = "single-file")]
    #[value(name = "single-file")]
    SingleFile,
}

impl ExportFormat {
    /// The folder marker's purpose for this format.
    pub fn purpose(self) -> Purpose {
        match self {
            ExportFormat::Unet => Purpose::Unet,
            ExportFormat::Pipeline | ExportFormat::SingleFile => Purpose::Pipeline,
        }
    }
}

/// Writes the files of a diffusers UNet folder into `dir` (which must exist).
pub fn fill_unet_dir(dir: &Path, config: &UNetConfig, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    let json = serde_json::to_string_pretty(&config.to_json())?;
    fs::write(dir.join("config.json"), json + "\n").with_context(|| format!("writing {}/config.json", dir.display()))?;
    weights::save(&dir.join("diffusion_pytorch_model.safetensors"), tensors, kind)
}


/// Makes the pipeline folder `dir` sample its UNet as an LCM student when the UNet has a guidance
/// embedding (`time_cond_proj_dim`): `scheduler/scheduler_config.json` becomes an `LCMScheduler`
/// config on the same noise schedule (`SchedulerConfig::to_lcm_json` on the distillation's
/// `grid`: the run's `lcm.num_ddim_timesteps` and `lcm.timestep_scaling`) and `model_index.json` names that class, so diffusers'
/// `StableDiffusionPipeline`/`StableDiffusionXLPipeline.from_pretrained(dir)` samples it as
/// diffusers' LCM pipelines do. Any other UNet leaves the folder as it is.
pub fn lcm_scheduler_for(dir: &Path, unet: &UNetConfig, grid: LcmGrid) -> Result<()> {
    if unet.time_cond_proj_dim.is_none() {
        return Ok(());
    }
    let file = dir.join("scheduler").join("scheduler_config.json");
    let config = crate::schedulers::SchedulerConfig::from_path(&file)?;
    let lcm = config.to_lcm_json(grid);
    lcm_config_checked(&lcm)?;
    fs::write(&file, serde_json::to_string_pretty(&lcm)? + "\n").with_context(|| format!("writing {}", file.display()))?;
    let index_file = dir.join("model_index.json");
    let text = fs::read_to_string(&index_file).with_context(|| format!("reading {}", index_file.display()))?;
    let mut index: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index_file.display()))?;
    index["scheduler"] = serde_json::json!(["diffusers", crate::schedulers::SchedulerKind::Lcm.diffusers_class()]);
    fs::write(&index_file, serde_json::to_string_pretty(&index)? + "\n").with_context(|| format!("writing {}", index_file.display()))
}

/// The LCM config sdkd writes must be one its own sampler runs.
fn lcm_config_checked(lcm: &serde_json::Value) -> Result<()> {
    crate::schedulers::SchedulerConfig::from_json(lcm)?.check_supported(crate::schedulers::SchedulerKind::Lcm)
}

/// Writes a diffusers UNet folder at `dest`, atomically (the caller applies the overwrite rule).
pub fn write_unet_dir(dest: &Path, config: &UNetConfig, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    fs_safe::write_dir(dest, Some(&Marker::new(Purpose::Unet)), |tmp| fill_unet_dir(tmp, config, tensors, kind))
}

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst)?;
    for entry in fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}

/// Writes a whole pipeline folder at `dest`: every part of `teacher_pipeline` but its unet, and
/// the given UNet as unet/, so `StableDiffusionPipeline.from_pretrained(dest)` loads it
/// (atomically; the caller applies the overwrite rule). `lcm`: the grid an LCM student was
/// distilled on (`lcm_scheduler_for`; unused for other UNets).
pub fn write_pipeline_dir(
    dest: &Path,
    teacher_pipeline: &Path,
    config: &UNetConfig,
    tensors: &[(String, Tensor)],
    kind: Option<Kind>,
    lcm: LcmGrid,
) -> Result<()> {
    let index = teacher_pipeline.join("model_index.json");
    if !index.is_file() {
        bail!(
            "{} is not a pipeline folder (no model_index.json): --format pipeline needs the teacher's whole pipeline",
            teacher_pipeline.display()
        );
    }
    fs_safe::write_dir(dest, Some(&Marker::new(Purpose::Pipeline)), |tmp| {
        for entry in fs::read_dir(teacher_pipeline)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == "unet" || name.to_string_lossy().starts_with('.') {
                continue;
            }
            if entry.path().is_dir() {
                copy_tree(&entry.path(), &tmp.join(&name))?;
            } else {
                fs::copy(entry.path(), tmp.join(&name))?;
            }
        }
        let unet = tmp.join("unet");
        fs::create_dir_all(&unet)?;
        fill_unet_dir(&unet, config, tensors, kind)?;
        lcm_scheduler_for(tmp, config, lcm)
    })
}

/// The storage dtype a format gets when `--dtype` is not given: fp16 for a single file (what
/// the community's files are), fp32 for diffusers folders.
pub fn default_dtype(format: ExportFormat) -> crate::runtime::Precision {
    match format {
        ExportFormat::SingleFile => crate::runtime::Precision::Fp16,
        _ => crate::runtime::Precision::Fp32,
    }
}

/// Writes a student UNet beside the other parts of `teacher` (a pipeline folder or single
/// file) as a pipeline folder or a single file; `lcm` as in `write_pipeline_dir`.
#[allow(clippy::too_many_arguments)]
pub fn write_student(
    dest: &Path,
    format: ExportFormat,
    teacher: &Path,
    config: &UNetConfig,
    tensors: &[(String, Tensor)],
    kind: Option<Kind>,
    title: &str,
    lcm: LcmGrid,
) -> Result<()> {
    match format {
        ExportFormat::Unet => write_unet_dir(dest, config, tensors, kind),
        ExportFormat::Pipeline if teacher.is_dir() => write_pipeline_dir(dest, teacher, config, tensors, kind, lcm),
        ExportFormat::Pipeline => write_pipeline_from(dest, &PipelineDir::open(teacher)?, config, tensors, kind, lcm),
        ExportFormat::SingleFile if config.time_cond_proj_dim.is_some() => bail!(
            "the UNet has time_cond_proj_dim (an LCM student's guidance embedding, time_embedding.cond_proj), which the LDM single-file layout has no name for: export --format pipeline (docs/lcm.md)"
        ),
        ExportFormat::SingleFile => write_single_file(dest, &PipelineDir::open(teacher)?, config, tensors, kind, title),
    }
}

/// The header key that marks a single file as sdkd's (the overwrite rule reads it).
const SDKD_MARK: &str = "sdkd.purpose";

/// Whether `path` is a single file sdkd wrote.
pub fn is_sdkd_single_file(path: &Path) -> bool {
    weights::MappedFile::open(path).and_then(|f| f.metadata()).is_ok_and(|m| m.get(SDKD_MARK).is_some_and(|v| v == "single-file"))
}

/// The overwrite rule for a single file and its `.yaml` beside it.
pub fn check_single_file_replaceable(dest: &Path, overwrite: bool, flag: &str) -> Result<()> {
    if dest.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        bail!("{flag} {}: a single file is written as .safetensors; name it <name>.safetensors", dest.display());
    }
    fs_safe::check_file_replaceable(dest, || is_sdkd_single_file(dest), overwrite, flag)?;
    let yaml = dest.with_extension("yaml");
    let yaml_ours = || fs::read_to_string(&yaml).is_ok_and(|t| t.starts_with(YAML_HEADER));
    fs_safe::check_file_replaceable(&yaml, yaml_ours, overwrite || !dest.exists(), flag)
}

const YAML_HEADER: &str = "# The LDM config of this checkpoint's UNet, written by sdkd.";

/// Writes a self-contained single file in the LDM layout: `unet` (config and diffusers-named
/// tensors) as `model.diffusion_model.*`, with the VAE and text encoder of `pipeline`, stored
/// as `kind`, ModelSpec metadata in the header (what ComfyUI and A1111 show), and `<stem>.yaml`
/// beside it with the UNet's LDM config. Each file is written atomically; the caller applies the
/// overwrite rule (`check_single_file_replaceable`).
pub fn write_single_file(
    dest: &Path,
    pipeline: &PipelineDir,
    unet_config: &UNetConfig,
    unet_tensors: &[(String, Tensor)],
    kind: Option<Kind>,
    title: &str,
) -> Result<()> {
    let xl = pipeline.is_xl();
    if !xl && unet_config.addition_embed.is_some() {
        bail!("pipeline {}: a text_time UNet (SDXL's) beside a pipeline that is not SDXL's", pipeline.root().display());
    }
    let vae = pipeline.load_vae(Device::Cpu, Kind::Float)?;
    let text = pipeline.load_text_encoder(Device::Cpu, Kind::Float)?;
    let family = if xl { single_file::Family::Sdxl } else { single_file::family_of(&text.model.config) };
    let prediction = pipeline.scheduler_json()?["prediction_type"].as_str().unwrap_or("epsilon").to_string();
    let v = prediction == "v_prediction";
    if !matches!(prediction.as_str(), "epsilon" | "v_prediction") {
        bail!("pipeline {}: scheduler prediction_type {prediction:?}: an LDM single file records only epsilon or v", pipeline.root().display());
    }
    let mut tensors = single_file::unet_to_ldm(unet_config, unet_tensors)?;
    tensors.extend(single_file::vae_to_ldm(&vae.model.config, &weights::named_tensors(&vae.vs))?);
    tensors.extend(single_file::text_encoder_to_ldm(&text.model.config, family, &weights::named_tensors(&text.vs))?);
    if xl {
        let text_2 = pipeline.load_text_encoder_2(Device::Cpu, Kind::Float)?;
        tensors.extend(single_file::text_encoder_2_to_ldm(&text_2.model.config, &weights::named_tensors(&text_2.vs))?);
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let res = unet_config.sample_size.unwrap_or(64) * vae.model.config.downscale_factor();
    let architecture = match (family, v) {
        (single_file::Family::Sd1, _) => "stable-diffusion-v1",
        (single_file::Family::Sd2, true) => "stable-diffusion-v2-768-v",
        (single_file::Family::Sd2, false) => "stable-diffusion-v2-512",
        (single_file::Family::Sdxl, _) => "stable-diffusion-xl-v1-base",
    };
    let meta: BTreeMap<String, String> = [
        ("modelspec.sai_model_spec", "1.0.0".to_string()),
        ("modelspec.architecture", architecture.to_string()),
        ("modelspec.implementation", "https://github.com/Stability-AI/generative-models".to_string()),
        ("modelspec.title", title.to_string()),
        ("modelspec.resolution", format!("{res}x{res}")),
        ("modelspec.prediction_type", if v { "v" } else { "epsilon" }.to_string()),
        ("modelspec.description", format!("{title}, written by sdkd {}", env!("CARGO_PKG_VERSION"))),
        (SDKD_MARK, "single-file".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let yaml = single_file::ldm_yaml(unet_config, v, vae.model.config.scaling_factor);
    debug_assert!(yaml.starts_with(YAML_HEADER));
    fs_safe::write_file_with(dest, |tmp| weights::save_with_metadata(tmp, &tensors, kind, &meta))?;
    fs_safe::write_file(&dest.with_extension("yaml"), yaml.as_bytes())
}

/// Writes a diffusers pipeline folder at `dest` from any pipeline (a single file's parts are
/// converted; the tokenizer is the embedded CLIP one, the scheduler SD's), with `unet` as its
/// UNet, atomically (the caller applies the overwrite rule); `lcm` as in `write_pipeline_dir`.
pub fn write_pipeline_from(dest: &Path, pipeline: &PipelineDir, unet_config: &UNetConfig, unet_tensors: &[(String, Tensor)], kind: Option<Kind>, lcm: LcmGrid) -> Result<()> {
    let vae = pipeline.load_vae(Device::Cpu, Kind::Float)?;
    let text = pipeline.load_text_encoder(Device::Cpu, Kind::Float)?;
    let family = single_file::family_of(&text.model.config);
    let scheduler = pipeline.scheduler_json()?;
    let pad = match pipeline.single_file() {
        Some(f) => f.family.pad_token(),
        None => family.pad_token(),
    };
    // SDXL's second encoder and tokenizer (which pads with "!", as SDXL's tokenizer_2 does)
    let text_2 = if pipeline.is_xl() { Some(pipeline.load_text_encoder_2(Device::Cpu, Kind::Float)?) } else { None };
    fs_safe::write_dir(dest, Some(&Marker::new(Purpose::Pipeline)), |tmp| {
        let part = |name: &str| -> Result<std::path::PathBuf> {
            let d = tmp.join(name);
            fs::create_dir_all(&d)?;
            Ok(d)
        };
        let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).map(|s| s + "\n");
        fill_unet_dir(&part("unet")?, unet_config, unet_tensors, kind)?;
        let d = part("vae")?;
        fs::write(d.join("config.json"), json(&vae.model.config.to_json())?)?;
        weights::save(&d.join("diffusion_pytorch_model.safetensors"), &weights::named_tensors(&vae.vs), kind)?;
        let d = part("text_encoder")?;
        fs::write(d.join("config.json"), json(&text.model.config.to_json())?)?;
        weights::save(&d.join("model.safetensors"), &weights::named_tensors(&text.vs), kind)?;
        let d = part("tokenizer")?;
        for (name, content) in ClipTokenizer::embedded_files(pad)? {
            fs::write(d.join(name), content)?;
        }
        let d = part("scheduler")?;
        fs::write(d.join("scheduler_config.json"), json(&scheduler)?)?;
        let class = scheduler.get("_class_name").and_then(|c| c.as_str()).unwrap_or("PNDMScheduler");
        if let Some(text_2) = &text_2 {
            let d = part("text_encoder_2")?;
            fs::write(d.join("config.json"), json(&text_2.model.config.to_json())?)?;
            weights::save(&d.join("model.safetensors"), &weights::named_tensors(&text_2.vs), kind)?;
            let d = part("tokenizer_2")?;
            for (name, content) in ClipTokenizer::embedded_files("!")? {
                fs::write(d.join(name), content)?;
            }
            let index = PipelineClass::StableDiffusionXl { force_zeros_for_empty_prompt: pipeline.force_zeros_for_empty_prompt()? }.model_index_json(class);
            fs::write(tmp.join("model_index.json"), json(&index)?)?;
            return Ok(());
        }
        fs::write(tmp.join("model_index.json"), json(&PipelineClass::StableDiffusion.model_index_json(class))?)?;
        lcm_scheduler_for(tmp, unet_config, lcm)
    })
}
