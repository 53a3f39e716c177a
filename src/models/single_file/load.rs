//! A single file's weights into sdkd's models: every model tensor must be in the file with its
//! shape, and every file key of the part must be used.
use super::super::clip::ClipTextEncoder;
use super::super::layers::Init;
use super::super::unet::UNet;
use super::super::vae::Vae;
use super::names::{ema_name, open_clip_map, text_map, unet_map, vae_map, NameMap, Transform};
use super::{SingleFile, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, XL_OPEN_CLIP_PREFIX};
use anyhow::{anyhow, bail, Result};
use std::collections::{BTreeSet, HashMap};
use tch::{Device, Kind, Tensor};

impl SingleFile {
    /// Copies the tensors of one part into `vars`: every model tensor must be in the file with
    /// its shape, and the file's keys of that part (but `ignore`d ones) must all be used.
    fn load_part(
        &self,
        vars: &HashMap<String, Tensor>,
        map: &NameMap,
        prefix: &str,
        part_prefix: &str,
        ignore: &dyn Fn(&str) -> bool,
        ema: bool,
    ) -> Result<()> {
        let file = self.file();
        let mut used = BTreeSet::new();
        self.state.read(|get| {
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            for name in names {
                let var = &vars[name];
                let (ldm, transform) = map.ldm(name).ok_or_else(|| anyhow!("{file}: no LDM name for {name} (sdkd bug)"))?;
                let key = format!("{prefix}{ldm}");
                let source = if ema { ema_name(&key) } else { key.clone() };
                let shape = self.state.shape(&source).ok_or_else(|| anyhow!("{file}: missing key {source} (diffusers' {name})"))?.to_vec();
                let want = var.size();
                let t = get(&source)?;
                let t = match transform {
                    Transform::Same => t,
                    Transform::Conv1x1 if shape.len() == 4 && shape[2..] == [1, 1] => t.reshape(&shape[..2]),
                    Transform::Conv1x1 => t,
                    Transform::QkvPart(i) => {
                        if shape.is_empty() || shape[0] != 3 * want[0] {
                            bail!("{file}: key {source}: shape {shape:?} is not three of {want:?} (fused q, k, v)");
                        }
                        t.narrow(0, i as i64 * want[0], want[0])
                    }
                    Transform::Transposed if shape.len() == 2 => t.tr(),
                    Transform::Transposed => bail!("{file}: key {source}: shape {shape:?} is not a matrix"),
                };
                if t.size() != want {
                    bail!("{file}: key {source}: shape {shape:?} in the file, but the model ({name}) needs {want:?}");
                }
                if var.is_floating_point() && !t.is_floating_point() {
                    bail!("{file}: key {source}: stored as {:?}, not floating point", t.kind());
                }
                tch::no_grad(|| var.shallow_clone().copy_(&t));
                used.insert(key);
            }
            Ok(())
        })?;
        let unexpected: Vec<String> =
            self.state.with_prefix(part_prefix).filter(|k| !used.contains(*k) && !ignore(k)).map(str::to_string).collect();
        if !unexpected.is_empty() {
            bail!(
                "{file}: {} unexpected key(s) for the model its shapes describe: {}",
                unexpected.len(),
                crate::fs_safe::list_some(&unexpected)
            );
        }
        Ok(())
    }

    pub fn load_unet(&self, device: Device, kind: Kind) -> Result<UNet> {
        let config = self.unet_config()?;
        let unet = UNet::build(&config, device, kind, Init::Empty);
        self.load_part(&unet.vs.variables(), &unet_map(&config), UNET_PREFIX, UNET_PREFIX, &|_| false, self.options.use_ema)?;
        Ok(unet)
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<Vae> {
        let config = self.vae_config()?;
        let vae = Vae::build(&config, device, kind, Init::Empty);
        let map = vae_map(&config);
        // LDM's VAE training loss (`first_stage_model.loss.*`, in a few files) is not the VAE.
        let ignore = |k: &str| k.starts_with("first_stage_model.loss.");
        self.load_part(&vae.vs.variables(), &map, VAE_PREFIX, VAE_PREFIX, &ignore, false)?;
        Ok(vae)
    }

    pub fn load_text_encoder(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        let config = self.text_encoder_config()?;
        let enc = ClipTextEncoder::build(&config, device, kind, Init::Empty);
        let map = text_map(&config, self.family, &self.sd1_text_prefix);
        let last = format!("{OPEN_CLIP_PREFIX}transformer.resblocks.{}.", config.num_hidden_layers);
        let ignore = |k: &str| {
            k.ends_with("embeddings.position_ids")
                || k == "cond_stage_model.model.text_projection"
                || k == "cond_stage_model.model.logit_scale"
                || k == "cond_stage_model.model.attn_mask"
                || k.starts_with(&last)
        };
        self.load_part(&enc.vs.variables(), &map, "", self.text_prefix(), &ignore, false)?;
        Ok(enc)
    }

    /// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection).
    pub fn load_text_encoder_2(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        let config = self.text_encoder_2_config()?;
        let enc = ClipTextEncoder::build(&config, device, kind, Init::Empty);
        let map = open_clip_map(&config, XL_OPEN_CLIP_PREFIX);
        // open_clip's contrastive temperature and causal mask buffer are not transformers' model
        let ignore = |k: &str| k == format!("{XL_OPEN_CLIP_PREFIX}logit_scale") || k == format!("{XL_OPEN_CLIP_PREFIX}attn_mask");
        self.load_part(&enc.vs.variables(), &map, "", XL_OPEN_CLIP_PREFIX, &ignore, false)?;
        Ok(enc)
    }
}
