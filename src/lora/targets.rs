//! The layers of a model a LoRA may adapt, with their weight shapes: what a file is checked
//! against, and how kohya's underscore names are resolved to diffusers' module paths.
use super::{Adapter, Component, Entry};
use crate::models::single_file::unet_module_ldm_names;
use crate::models::unet_config::UNetConfig;
use anyhow::{bail, Result};
use std::collections::{BTreeMap, HashMap};
use tch::nn::VarStore;

/// The linear and conv layers of a pipeline's UNet and text encoders, by diffusers module path.
#[derive(Debug, Default)]
pub struct Targets {
    modules: BTreeMap<Component, BTreeMap<String, Vec<i64>>>,
    /// `(component, kohya name without its prefix)` -> module path: diffusers' path with `_` for
    /// `.`, and for the UNet also its SGM/LDM name so spelled (sd-scripts' SDXL names).
    kohya: HashMap<(Component, String), String>,
}

/// A module's name in kohya's keys: sd-scripts' `lora_name.replace(".", "_")`.
pub(super) fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// The layers of `vs` a LoRA can adapt: weights of 2 (linear) or 4 (conv) dimensions, the
/// text encoders' embedding tables left out (PEFT's LoRA of an embedding is another layer type).
fn adaptable(vs: &VarStore) -> BTreeMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let dims = t.dim();
            ((dims == 2 || dims == 4) && !module.contains(".embeddings.")).then(|| (module.to_string(), t.size()))
        })
        .collect()
}

impl Targets {
    /// The UNet's layers (`unet` holds its weights, diffusers-named, `config` its layout).
    pub fn new(config: &UNetConfig, unet: &VarStore) -> Targets {
        let mut t = Targets::default();
        let modules = adaptable(unet);
        for (module, ldm) in unet_module_ldm_names(config, modules.keys().map(String::as_str)) {
            t.kohya.insert((Component::Unet, underscored(&ldm)), module);
        }
        t.add(Component::Unet, modules);
        t
    }

    /// Adds a text encoder's layers (transformers' names: `text_model.encoder.layers.0.self_attn.q_proj`).
    pub fn with(mut self, component: Component, encoder: &VarStore) -> Targets {
        self.add(component, adaptable(encoder));
        self
    }

    fn add(&mut self, component: Component, modules: BTreeMap<String, Vec<i64>>) {
        for module in modules.keys() {
            self.kohya.insert((component, underscored(module)), module.clone());
        }
        self.modules.insert(component, modules);
    }

    pub fn has(&self, component: Component) -> bool {
        self.modules.contains_key(&component)
    }

    /// The module a kohya name (prefix stripped) stands for.
    pub(super) fn kohya_module(&self, component: Component, name: &str) -> Option<&str> {
        self.kohya.get(&(component, name.to_string())).map(String::as_str)
    }

    /// The weight shape of `component`'s layer `path`, or an error saying what is missing.
    fn shape(&self, component: Component, path: &str) -> Result<&[i64]> {
        let Some(modules) = self.modules.get(&component) else {
            bail!("the model has no {} to apply it to", component.name())
        };
        match modules.get(path) {
            Some(shape) => Ok(shape),
            None => bail!("the {} has no layer {path} (a LoRA made for another architecture?)", component.name()),
        }
    }

    /// The entry's adapter checked against its layer (it exists, its shapes and values are sound,
    /// B·A has the weight's shape), a 1×1-conv adapter of a linear layer or a linear adapter of a
    /// 1×1 conv reshaped to the layer's kind (diffusers' SD-2 UNets use linear `proj_in`/`proj_out`
    /// where SD-1's are 1×1 convs, and LoRAs cross between them).
    pub(super) fn fit(&self, entry: Entry) -> Result<Adapter> {
        let weight = self.shape(entry.component, &entry.path)?.to_vec();
        let adapter = entry.adapter;
        let alpha = adapter.alpha;
        adapter.check()?;
        let made = adapter.weight_shape();
        if made == weight {
            return Ok(adapter);
        }
        let (d, u) = (adapter.down.size(), adapter.up.size());
        let one_by_one = |s: &[i64]| s.len() == 4 && s[2] == 1 && s[3] == 1;
        if weight.len() == 2 && one_by_one(&made) && made[..2] == weight[..] {
            return Ok(Adapter::new(adapter.down.reshape([d[0], d[1]]), adapter.up.reshape([u[0], u[1]]), alpha));
        }
        if one_by_one(&weight) && made.len() == 2 && made[..] == weight[..2] {
            return Ok(Adapter::new(adapter.down.reshape([d[0], d[1], 1, 1]), adapter.up.reshape([u[0], u[1], 1, 1]), alpha));
        }
        bail!(
            "A {d:?} and B {u:?} make a {made:?} weight, but the {}'s layer {} has weight {weight:?}",
            entry.component.name(),
            entry.path
        )
    }
}
