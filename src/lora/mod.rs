//! LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) as
//! diffusers, PEFT, kohya's sd-scripts, ComfyUI and AUTOMATIC1111 store them.
//!
//! A [`LoraSet`] holds adapters keyed by the component (`unet`, `text_encoder`,
//! `text_encoder_2`) and the diffusers module path of the layer each adapts
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`). Each [`Adapter`] has a down
//! matrix A (`[r, in]`, or `[r, in, kh, kw]` for a conv: PEFT's k×k down conv), an up matrix B
//! (`[out, r]`, or `[out, r, 1, 1]`: the 1×1 up conv) and alpha; the layer's weight becomes
//! `W + scale · alpha/r · B·A` (PEFT's scaling; a file without alpha means alpha = r).
//!
//! Two file layouts, told apart by their keys ([`Layout`]):
//! - diffusers/PEFT (`pytorch_lora_weights.safetensors`, what `save_lora_weights` writes and
//!   `load_lora_weights` reads): `unet.<path>.lora_A.weight` / `.lora_B.weight`,
//!   `text_encoder.` / `text_encoder_2.` for the encoders; alpha in the header's
//!   `lora_adapter_metadata` (PEFT's `LoraConfig` as JSON, each field prefixed by its component).
//! - kohya (sd-scripts' `networks/lora.py`, what A1111 and ComfyUI read):
//!   `lora_unet_<path with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the text
//!   encoders as `lora_te_` (SD-1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL). sd-scripts trains
//!   SD-1.x/2.x on a UNet with diffusers' names but SDXL on one with SGM's (`input_blocks.4.1`), so
//!   an SDXL file's UNet keys are SGM names; both spellings are read for any UNet, as ComfyUI does.
//!
//! Training adapters (`lora:` in the run YAML, `config`) live inside the UNet's layers while a run
//! trains (`models::adapter`); `sdkd export --lora` turns a checkpoint's into a [`LoraSet`].
//!
//! Reading checks every key against the model it is for ([`Targets`]) before anything is
//! applied: a key of another architecture, a shape that does not fit, a NaN, or a file mixing the
//! layouts is refused naming the file and the first such key.
mod adapter;
pub mod config;
mod diffusers;
mod fuse;
mod kohya;
mod layout;
mod scaled;
mod targets;
mod trained;

pub use adapter::Adapter;
pub use fuse::{fuse_into, fuse_unet_files};
pub use layout::Layout;
pub use scaled::ScaledLora;
pub use targets::Targets;

use crate::models::unet_config::UNetConfig;
use crate::models::weights::MappedFile;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// The file name diffusers' `save_lora_weights` writes and `load_lora_weights` looks for.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";

/// The model part an adapter belongs to, named as diffusers' pipeline attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];

    /// diffusers' name, the prefix of its keys in the diffusers layout.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Adapters for some layers of a pipeline's UNet and text encoders.
#[derive(Debug, Default)]
pub struct LoraSet {
    adapters: BTreeMap<Component, BTreeMap<String, Adapter>>,
}

impl LoraSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the adapter of `component`'s layer `path` (a diffusers module path,
    /// without `.weight`).
    pub fn insert(&mut self, component: Component, path: impl Into<String>, adapter: Adapter) {
        self.adapters.entry(component).or_default().insert(path.into(), adapter);
    }

    pub fn get(&self, component: Component, path: &str) -> Option<&Adapter> {
        self.adapters.get(&component)?.get(path)
    }

    /// The adapters of one component, by module path.
    pub fn component(&self, component: Component) -> impl Iterator<Item = (&str, &Adapter)> {
        self.adapters.get(&component).into_iter().flat_map(|m| m.iter().map(|(p, a)| (p.as_str(), a)))
    }

    /// Every adapter, by component then module path.
    pub fn iter(&self) -> impl Iterator<Item = (Component, &str, &Adapter)> {
        self.adapters.iter().flat_map(|(c, m)| m.iter().map(move |(p, a)| (*c, p.as_str(), a)))
    }

    pub fn len(&self) -> usize {
        self.adapters.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of values in all the A and B matrices.
    pub fn parameters(&self) -> i64 {
        self.iter().map(|(_, _, a)| a.parameters()).sum()
    }

    /// Reads a LoRA `.safetensors` file of either layout for the model `targets` describes. Every
    /// key is checked (layout, layer, shape, finite values) before the set is returned, so a
    /// file is used whole or not at all.
    pub fn read(path: &Path, targets: &Targets) -> Result<LoraSet> {
        let what = || format!("LoRA file {}", path.display());
        if path.is_dir() {
            bail!("{}: is a folder; give the .safetensors file (diffusers writes {DIFFUSERS_FILE})", what());
        }
        let file = MappedFile::open(path).with_context(what)?;
        let st = file.parse()?;
        let metadata = file.metadata()?;
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        if names.is_empty() {
            bail!("{}: holds no tensors", what());
        }
        let layout = Layout::detect(&names).with_context(what)?;
        let entries = match layout {
            Layout::Diffusers => diffusers::parse(&st, &names, &metadata),
            Layout::Kohya => kohya::parse(&st, &names, targets),
        }
        .with_context(what)?;
        let mut set = LoraSet::new();
        for entry in entries {
            let (key, component) = (entry.key.clone(), entry.component);
            let (module, adapter) = targets.fit(entry).with_context(|| format!("{}: key {key}", what()))?;
            set.insert(component, module, adapter);
        }
        Ok(set)
    }

    /// Writes the set as one `.safetensors` file in `layout`, atomically (complete or absent
    /// after a crash). `unet` is the config of the UNet the adapters are for: kohya's layout names
    /// an SDXL UNet's layers by their SGM names. The tensors keep their dtype.
    pub fn write(&self, path: &Path, layout: Layout, unet: &UNetConfig) -> Result<()> {
        if self.is_empty() {
            bail!("{}: no adapters to write", path.display());
        }
        for (component, module, adapter) in self.iter() {
            adapter.check().with_context(|| format!("writing {}: {} {module}", path.display(), component.name()))?;
        }
        let (tensors, metadata) = match layout {
            Layout::Diffusers => diffusers::tensors(self)?,
            Layout::Kohya => kohya::tensors(self, unet)?,
        };
        crate::fs_safe::write_file_with(path, |tmp| crate::models::weights::save_with_metadata(tmp, &tensors, None, &metadata))
    }
}

/// One adapter as a file stores it, before it is checked against the model.
pub(crate) struct Entry {
    /// The file's key of the down matrix (what an error names).
    pub key: String,
    pub component: Component,
    pub path: String,
    pub adapter: Adapter,
}

#[cfg(test)]
mod tests;
