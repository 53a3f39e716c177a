//! The layers of a model a LoRA may adapt, with their weight shapes: what a file is checked
//! against, and how kohya's underscore names are resolved to diffusers' module paths.
use super::{Adapter, Component, Entry};
use crate::models::single_file::unet_module_ldm_names;
use crate::models::unet_config::UNetConfig;
use anyhow::{bail, Result};
use std::collections::{BTreeMap, HashMap};
use tch::Tensor;

/// The linear and conv layers of a pipeline's UNet and text encoders, by diffusers module path.
#[derive(Debug, Default)]
pub struct Targets {
    modules: BTreeMap<Component, BTreeMap<String, Vec<i64>>>,
    /// `(component, kohya name without its prefix)` -> module path: diffusers' path with `_` for
    /// `.`, and for the UNet also its SGM/LDM name so spelled (sd-scripts' SDXL names).
    kohya: HashMap<(Component, String), String>,
    /// Other spellings of a module path -> the path: a text encoder's layers without
    /// `text_model.` (transformers 5 flattened `CLIPTextModel`, and diffusers then saves LoRAs so).
    aliases: HashMap<(Component, String), String>,
}

/// transformers' `CLIPTextModel` wrapper module, which transformers 5 dropped.
const TEXT_MODEL: &str = "text_model.";

/// A module's name in kohya's keys: sd-scripts' `lora_name.replace(".", "_")`.
pub(super) fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// The layers of a model (its named weights, as `VarStore::variables` gives them) a LoRA can
/// adapt: weights of 2 (linear) or 4 (conv) dimensions, the text encoders' embedding tables left
/// out (PEFT's LoRA of an embedding is another layer type).
fn adaptable(weights: &HashMap<String, Tensor>) -> BTreeMap<String, Vec<i64>> {
    weights
        .iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let dims = t.dim();
            ((dims == 2 || dims == 4) && !module.contains(".embeddings.")).then(|| (module.to_string(), t.size()))
        })
        .collect()
}

impl Targets {
    /// The UNet's layers (`unet`: its weights by diffusers name, e.g. `vs.variables()`;
    /// `config`: its layout).
    pub fn new(config: &UNetConfig, unet: &HashMap<String, Tensor>) -> Targets {
        let mut t = Targets::default();
        let modules = adaptable(unet);
        for (module, ldm) in unet_module_ldm_names(config, modules.keys().map(String::as_str)) {
            t.kohya.insert((Component::Unet, underscored(&ldm)), module);
        }
        t.add(Component::Unet, modules);
        t
    }

    /// Adds a text encoder's layers (transformers' names: `text_model.encoder.layers.0.self_attn.q_proj`).
    pub fn with(mut self, component: Component, encoder: &HashMap<String, Tensor>) -> Targets {
        self.add(component, adaptable(encoder));
        self
    }

    fn add(&mut self, component: Component, modules: BTreeMap<String, Vec<i64>>) {
        for module in modules.keys() {
            self.kohya.insert((component, underscored(module)), module.clone());
            if let Some(flat) = module.strip_prefix(TEXT_MODEL).filter(|_| component != Component::Unet) {
                self.kohya.insert((component, underscored(flat)), module.clone());
                self.aliases.insert((component, flat.to_string()), module.clone());
            }
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

    /// The module path `path` stands for and its weight shape, or an error saying what is missing.
    fn layer(&self, component: Component, path: &str) -> Result<(String, &[i64])> {
        let Some(modules) = self.modules.get(&component) else {
            bail!("the model has no {} to apply it to", component.name())
        };
        let path = self.aliases.get(&(component, path.to_string())).map_or(path, String::as_str);
        match modules.get(path) {
            Some(shape) => Ok((path.to_string(), shape)),
            None => bail!("the {} has no layer {path} (a LoRA made for another architecture?)", component.name()),
        }
    }

    /// The entry's adapter checked against its layer (it exists, its shapes and values are sound,
    /// B·A has the weight's shape), a 1×1-conv adapter of a linear layer or a linear adapter of a
    /// 1×1 conv reshaped to the layer's kind (diffusers' SD-2 UNets use linear `proj_in`/`proj_out`
    /// where SD-1's are 1×1 convs, and LoRAs cross between them).
    pub(super) fn fit(&self, entry: Entry) -> Result<(String, Adapter)> {
        let (path, weight) = self.layer(entry.component, &entry.path)?;
        let weight = weight.to_vec();
        let adapter = entry.adapter;
        let alpha = adapter.alpha;
        adapter.check()?;
        let made = adapter.weight_shape();
        if made == weight {
            return Ok((path, adapter));
        }
        let (d, u) = (adapter.down.size(), adapter.up.size());
        let one_by_one = |s: &[i64]| s.len() == 4 && s[2] == 1 && s[3] == 1;
        if weight.len() == 2 && one_by_one(&made) && made[..2] == weight[..] {
            return Ok((path, Adapter::new(adapter.down.reshape([d[0], d[1]]), adapter.up.reshape([u[0], u[1]]), alpha)));
        }
        if one_by_one(&weight) && made.len() == 2 && made[..] == weight[..2] {
            return Ok((path, Adapter::new(adapter.down.reshape([d[0], d[1], 1, 1]), adapter.up.reshape([u[0], u[1], 1, 1]), alpha)));
        }
        bail!(
            "A {d:?} and B {u:?} make a {made:?} weight, but the {}'s layer {path} has weight {weight:?}",
            entry.component.name()
        )
    }
}
