//! kohya's layout (sd-scripts' `networks/lora.py`; A1111 and ComfyUI read it):
//! `<prefix><module with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`, the prefix
//! `lora_unet_`, `lora_te_` (SD-1.x/2.x's text encoder) or `lora_te1_` / `lora_te2_` (SDXL's).
//! sd-scripts names an SD-1.x/2.x UNet's modules as diffusers does and an SDXL UNet's by SGM's
//! names (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); diffusers' converter
//! (`_maybe_map_sgm_blocks_to_diffusers`) and ComfyUI read both, and so does this reader.
use super::targets::underscored;
use super::{Adapter, Component, Entry, LoraSet, Targets};
use crate::models::single_file::unet_module_ldm_names;
use crate::models::unet_config::UNetConfig;
use crate::models::weights::view_to_tensor;
use anyhow::{anyhow, bail, ensure, Context, Result};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// The component of a kohya prefix (the longer prefixes first: `lora_te_` is not `lora_te1_`).
const PREFIXES: [(&str, Component); 4] = [
    ("lora_unet_", Component::Unet),
    ("lora_te1_", Component::TextEncoder),
    ("lora_te2_", Component::TextEncoder2),
    ("lora_te_", Component::TextEncoder),
];

#[derive(Default)]
struct Parts {
    down: Option<(String, Tensor)>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

fn split(key: &str) -> Result<(Component, &str, &str)> {
    let (component, rest) = PREFIXES
        .iter()
        .find_map(|(p, c)| key.strip_prefix(p).map(|r| (*c, r)))
        .ok_or_else(|| anyhow!("key {key}: not a kohya LoRA key"))?;
    let (name, suffix) = rest.split_once('.').ok_or_else(|| anyhow!("key {key}: no .lora_down.weight/.lora_up.weight/.alpha suffix"))?;
    Ok((component, name, suffix))
}

/// The scalar of a `.alpha` tensor.
fn alpha_value(t: &Tensor, key: &str) -> Result<f64> {
    ensure!(t.numel() == 1, "key {key}: alpha has shape {:?}, not one number", t.size());
    let v = t.to_kind(Kind::Double).reshape([1]).double_value(&[0]);
    ensure!(v.is_finite(), "key {key}: alpha is {v}");
    Ok(v)
}

/// The adapters of a kohya-layout file, their modules found in `targets`.
pub(super) fn parse(st: &SafeTensors<'_>, names: &[String], targets: &Targets) -> Result<Vec<Entry>> {
    let mut modules: BTreeMap<(Component, String), Parts> = BTreeMap::new();
    for key in names {
        let (component, name, suffix) = split(key)?;
        let tensor = view_to_tensor(&st.tensor(key)?).with_context(|| format!("key {key}"))?;
        let parts = modules.entry((component, name.to_string())).or_default();
        match suffix {
            "lora_down.weight" => parts.down = Some((key.clone(), tensor)),
            "lora_up.weight" => parts.up = Some(tensor),
            "alpha" => parts.alpha = Some(alpha_value(&tensor, key)?),
            _ => bail!("key {key}: only lora_down.weight, lora_up.weight and alpha are read (not LyCORIS' LoHa/LoKr/LoCon-Tucker or DoRA)"),
        }
    }
    let mut entries = vec![];
    for ((component, name), parts) in modules {
        let prefix = PREFIXES.iter().find(|(_, c)| *c == component).map_or("", |p| p.0);
        let Some((key, down)) = parts.down else { bail!("{prefix}{name}: has no lora_down.weight") };
        let up = parts.up.ok_or_else(|| anyhow!("key {key}: has no partner {prefix}{name}.lora_up.weight"))?;
        let Some(path) = targets.kohya_module(component, &name) else {
            if !targets.has(component) {
                bail!("key {key}: the model has no {} to apply it to", component.name());
            }
            bail!("key {key}: the {} has no layer named {name} (diffusers' or SGM's module names with _ for .; a LoRA made for another architecture?)", component.name());
        };
        let rank = down.size().first().copied().unwrap_or(0);
        // sd-scripts: `alpha = lora_dim` when the network was made without one
        let alpha = parts.alpha.unwrap_or(rank as f64);
        entries.push(Entry { key, component, path: path.to_string(), adapter: Adapter::new(down, up, alpha) });
    }
    Ok(entries)
}

/// The tensors (and sd-scripts' `ss_network_*` header entries) of `set` in kohya's layout for a
/// UNet of `unet`'s layout: SGM names and `lora_te1_`/`lora_te2_` when it is an SDXL UNet
/// (`addition_embed_type: "text_time"`), diffusers' names and `lora_te_` otherwise.
pub(super) fn tensors(set: &LoraSet, unet: &UNetConfig) -> Result<(Vec<(String, Tensor)>, BTreeMap<String, String>)> {
    let xl = unet.addition_embed.is_some();
    let sgm = if xl { unet_module_ldm_names(unet, set.component(Component::Unet).map(|(p, _)| p)) } else { BTreeMap::new() };
    let mut tensors = vec![];
    for (component, path, a) in set.iter() {
        let name = match component {
            Component::Unet if xl => {
                let ldm = sgm.get(path).ok_or_else(|| anyhow!("the UNet's module {path} has no SGM name"))?;
                format!("lora_unet_{}", underscored(ldm))
            }
            Component::Unet => format!("lora_unet_{}", underscored(path)),
            Component::TextEncoder if xl => format!("lora_te1_{}", underscored(path)),
            Component::TextEncoder => format!("lora_te_{}", underscored(path)),
            Component::TextEncoder2 => format!("lora_te2_{}", underscored(path)),
        };
        tensors.push((format!("{name}.lora_down.weight"), a.down.shallow_clone()));
        tensors.push((format!("{name}.lora_up.weight"), a.up.shallow_clone()));
        tensors.push((format!("{name}.alpha"), Tensor::from(a.alpha as f32)));
    }
    let first = set.iter().next().map(|(_, _, a)| a);
    let mut metadata = BTreeMap::from([("ss_network_module".to_string(), "networks.lora".to_string())]);
    if let Some(a) = first.filter(|f| set.iter().all(|(_, _, a)| a.rank() == f.rank() && a.alpha == f.alpha)) {
        metadata.insert("ss_network_dim".into(), a.rank().to_string());
        metadata.insert("ss_network_alpha".into(), (a.alpha as f32).to_string());
    }
    Ok((tensors, metadata))
}
