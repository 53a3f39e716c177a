//! The two LoRA file layouts and how a file's keys tell which one it is.
use anyhow::{bail, Result};

/// How a LoRA file names its tensors (see the module docs of `lora`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// diffusers/PEFT: `unet.<path>.lora_A.weight`, alpha in the `lora_adapter_metadata` header.
    Diffusers,
    /// kohya's sd-scripts (A1111, ComfyUI): `lora_unet_<path_with_underscores>.lora_down.weight`.
    Kohya,
}

/// kohya's prefixes: sd-scripts' `LORA_PREFIX_UNET`, `LORA_PREFIX_TEXT_ENCODER` and SDXL's two.
pub(super) const KOHYA_PREFIXES: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Diffusers => "diffusers",
            Layout::Kohya => "kohya",
        }
    }

    fn of_key(key: &str) -> Option<Layout> {
        if KOHYA_PREFIXES.iter().any(|p| key.starts_with(p)) {
            Some(Layout::Kohya)
        } else if key.contains(".lora_A.") || key.contains(".lora_B.") {
            Some(Layout::Diffusers)
        } else {
            None
        }
    }

    /// The layout of a file with these keys; a key of neither layout, or keys of both, are
    /// refused naming the key.
    pub fn detect(keys: &[String]) -> Result<Layout> {
        let mut first: [Option<&str>; 2] = [None, None];
        for key in keys {
            match Layout::of_key(key) {
                Some(Layout::Diffusers) => _ = first[0].get_or_insert(key),
                Some(Layout::Kohya) => _ = first[1].get_or_insert(key),
                None if key.ends_with(".lora.down.weight") || key.ends_with("_lora.down.weight") => {
                    bail!("key {key}: diffusers' old attention-processor LoRA layout is not read; load it in diffusers and save it again with save_lora_weights")
                }
                None => bail!(
                    "key {key} is in neither LoRA layout (diffusers/PEFT: unet.<module>.lora_A.weight; kohya: lora_unet_<module>.lora_down.weight)"
                ),
            }
        }
        match first {
            [Some(d), Some(k)] => bail!("mixes two LoRA layouts: diffusers/PEFT (key {d}) and kohya (key {k})"),
            [Some(_), None] => Ok(Layout::Diffusers),
            _ => Ok(Layout::Kohya),
        }
    }
}
