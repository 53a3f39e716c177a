//! The adapters a `lora:` run trains, as a [`LoraSet`]: what `sdkd export --lora` and a run's
//! `final/` write in the diffusers or kohya layout.
use super::{Adapter, Component, LoraSet};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use tch::Tensor;

impl LoraSet {
    /// The UNet adapters of a training run, by PEFT's parameter names as the run holds them
    /// (`<module>.lora_A.weight`, `<module>.lora_B.weight`: `UNet::trainable`, a checkpoint's
    /// `lora.safetensors`), every one with `alpha`.
    pub fn from_trained(named: &[(String, Tensor)], alpha: f64) -> Result<LoraSet> {
        let mut halves: BTreeMap<&str, [Option<&Tensor>; 2]> = BTreeMap::new();
        for (name, t) in named {
            let (module, half) = match (name.strip_suffix(".lora_A.weight"), name.strip_suffix(".lora_B.weight")) {
                (Some(m), _) => (m, 0),
                (_, Some(m)) => (m, 1),
                _ => bail!("{name} is not a LoRA adapter weight (<module>.lora_A.weight or .lora_B.weight)"),
            };
            halves.entry(module).or_default()[half] = Some(t);
        }
        let mut set = LoraSet::new();
        for (module, [a, b]) in halves {
            let (Some(a), Some(b)) = (a, b) else { bail!("adapter {module} lacks its lora_{} weight", if a.is_none() { "A" } else { "B" }) };
            let adapter = Adapter::new(a.detach().copy(), b.detach().copy(), alpha);
            adapter.check().map_err(|e| anyhow::anyhow!("adapter {module}: {e}"))?;
            set.insert(Component::Unet, module, adapter);
        }
        if set.is_empty() {
            bail!("no adapters");
        }
        Ok(set)
    }
}
