//! Fusing adapters into a model's weights: `W += scale · alpha/r · B·A`, so generation with a
//! LoRA costs nothing per step (diffusers' `fuse_lora`).
use super::{Component, LoraSet};
use anyhow::{anyhow, ensure, Result};
use tch::nn::VarStore;
use tch::Kind;

/// Adds `scale ·` the delta of each of `set`'s `component` adapters to the weight it adapts in
/// `vs`. In fp32 this is PEFT's merge bit for bit (`weight.data += get_delta_weight()`); a half
/// precision weight gets the fp32 sum rounded once. Checks every layer before changing any, so an
/// error leaves `vs` as it was; `LoraSet::read` has already checked the file against the model.
pub fn fuse_into(vs: &VarStore, set: &LoraSet, component: Component, scale: f64) -> Result<usize> {
    let vars = vs.variables();
    let mut pairs = vec![];
    for (path, adapter) in set.component(component) {
        let weight = vars.get(&format!("{path}.weight")).ok_or_else(|| anyhow!("the {} has no layer {path}", component.name()))?;
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
