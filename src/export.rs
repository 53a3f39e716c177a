//! Writing what sdkd makes as diffusers folders: a UNet folder (config.json +
//! diffusion_pytorch_model.safetensors) or a whole pipeline folder (the teacher's other parts
//! beside the new unet/). Each is written by `fs_safe::write_dir` (complete or absent after a
//! crash) and carries its marker, so a later `--overwrite` knows sdkd made it.
use crate::fs_safe::{self, Marker, Purpose};
use crate::models::{weights, UNetConfig};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A diffusers UNet folder.
    Unet,
    /// A whole StableDiffusionPipeline folder: the teacher's parts with the new unet/.
    Pipeline,
}

impl ExportFormat {
    /// The folder marker's purpose for this format.
    pub fn purpose(self) -> Purpose {
        match self {
            ExportFormat::Unet => Purpose::Unet,
            ExportFormat::Pipeline => Purpose::Pipeline,
        }
    }
}

/// Writes the files of a diffusers UNet folder into `dir` (which must exist).
pub fn fill_unet_dir(dir: &Path, config: &UNetConfig, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    let json = serde_json::to_string_pretty(&config.to_json())?;
    fs::write(dir.join("config.json"), json + "\n").with_context(|| format!("writing {}/config.json", dir.display()))?;
    weights::save(&dir.join("diffusion_pytorch_model.safetensors"), tensors, kind)
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
/// (atomically; the caller applies the overwrite rule).
pub fn write_pipeline_dir(
    dest: &Path,
    teacher_pipeline: &Path,
    config: &UNetConfig,
    tensors: &[(String, Tensor)],
    kind: Option<Kind>,
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
        fill_unet_dir(&unet, config, tensors, kind)
    })
}
