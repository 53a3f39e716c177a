//! Writing what sdkd makes as diffusers folders: a UNet folder (config.json +
//! diffusion_pytorch_model.safetensors) or a whole pipeline folder (the teacher's other parts
//! beside the new unet/). Every folder is written to a temp dir, fsynced, then renamed into place,
//! so a crash leaves either the old folder or the new one, never half of one.
use crate::models::{weights, UNetConfig};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// A diffusers UNet folder.
    Unet,
    /// A whole StableDiffusionPipeline folder: the teacher's parts with the new unet/.
    Pipeline,
}

fn fsync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            fsync_tree(&path)?;
        } else {
            fs::File::open(&path)?.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        }
    }
    fs::File::open(dir)?.sync_all().with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    dest.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// Fills a fresh temp dir beside `dest` with `fill`, syncs it, and renames it to `dest`
/// (replacing an existing `dest` only once the new one is complete).
pub fn atomic_dir(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let tmp = sibling(dest, "tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let filled = fill(&tmp).and_then(|_| fsync_tree(&tmp));
    if let Err(e) = filled {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(dest, "old");
    if dest.exists() {
        fs::rename(dest, &old).with_context(|| format!("moving aside {}", dest.display()))?;
    }
    fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Writes the files of a diffusers UNet folder into `dir` (which must exist).
pub fn fill_unet_dir(dir: &Path, config: &UNetConfig, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    let json = serde_json::to_string_pretty(&config.to_json())?;
    fs::write(dir.join("config.json"), json + "\n").with_context(|| format!("writing {}/config.json", dir.display()))?;
    weights::save(&dir.join("diffusion_pytorch_model.safetensors"), tensors, kind)
}

/// Writes a diffusers UNet folder at `dest`, atomically.
pub fn write_unet_dir(dest: &Path, config: &UNetConfig, tensors: &[(String, Tensor)], kind: Option<Kind>) -> Result<()> {
    atomic_dir(dest, |tmp| fill_unet_dir(tmp, config, tensors, kind))
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
/// the given UNet as unet/, so `StableDiffusionPipeline.from_pretrained(dest)` loads it.
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
    atomic_dir(dest, |tmp| {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_the_old_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out");
        atomic_dir(&dest, |d| Ok(fs::write(d.join("a"), "1")?)).unwrap();
        let e = atomic_dir(&dest, |d| {
            fs::write(d.join("a"), "2")?;
            bail!("disk full")
        });
        assert!(e.is_err());
        assert_eq!(fs::read_to_string(dest.join("a")).unwrap(), "1");
        let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        atomic_dir(&dest, |d| Ok(fs::write(d.join("b"), "3")?)).unwrap();
        assert!(!dest.join("a").exists() && dest.join("b").exists());
    }
}
