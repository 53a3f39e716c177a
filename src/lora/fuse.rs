//! Fusing adapters into a model's weights: `W += scale · alpha/r · B·A`, so generation with a
//! LoRA costs nothing per step (diffusers' `fuse_lora`).
use super::{Component, LoraSet, ScaledLora, Targets};
use crate::models::unet_config::UNetConfig;
use anyhow::{anyhow, ensure, Context, Result};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Adds `scale ·` the delta of each of `set`'s `component` adapters to the weight it adapts in
/// `weights` (a model's tensors by name, `VarStore::variables()` or a file's, changed in place). In fp32 this is PEFT's merge bit for bit (`weight.data += get_delta_weight()`); a half
/// precision weight gets the fp32 sum rounded once. Checks every layer before changing any, so an
/// error leaves the weights as they were; `LoraSet::read` has already checked the file against the model.
pub fn fuse_into(weights: &HashMap<String, Tensor>, set: &LoraSet, component: Component, scale: f64) -> Result<usize> {
    let mut pairs = vec![];
    for (path, adapter) in set.component(component) {
        let weight = weights.get(&format!("{path}.weight")).ok_or_else(|| anyhow!("the {} has no layer {path}", component.name()))?;
        ensure!(
            weight.size() == adapter.weight_shape(),
            "{} {path}: the adapter makes a {:?} weight, the layer's is {:?}",
            component.name(),
            adapter.weight_shape(),
            weight.size()
        );
        pairs.push((weight, adapter));
    }
    let _no_grad = tch::no_grad_guard();
    for (weight, adapter) in &pairs {
        let delta = adapter.delta(scale, weight.device());
        let mut w = weight.shallow_clone();
        if w.kind() == Kind::Float {
            let _ = w.g_add_(&delta);
        } else {
            let merged = w.to_kind(Kind::Float) + delta;
            w.copy_(&merged);
        }
    }
    Ok(pairs.len())
}

/// Fuses LoRA files into a UNet's tensors (`sdkd export --fuse`), in place and in order: every
/// file is read and checked against the UNet first, so a refused one changes nothing. A file with
/// text-encoder adapters is refused (only the UNet is written; `--lora` at generation fuses those).
pub fn fuse_unet_files(config: &UNetConfig, tensors: &[(String, Tensor)], loras: &[ScaledLora]) -> Result<()> {
    let weights: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let targets = Targets::new(config, &weights);
    let sets: Vec<LoraSet> = loras
        .iter()
        .map(|l| LoraSet::read(&l.path, &targets).context("export --fuse merges UNet adapters only; text-encoder adapters are fused at generation (--lora)"))
        .collect::<Result<_>>()?;
    for (lora, set) in loras.iter().zip(&sets) {
        fuse_into(&weights, set, Component::Unet, lora.scale).with_context(|| format!("LoRA file {}", lora.path.display()))?;
    }
    Ok(())
}
