//! The diffusers configs of a single file's UNet, VAE and text encoder, from its shapes (and
//! its sidecar `.yaml` for what shapes cannot tell).
use super::super::clip::{Activation, ClipTextConfig};
use super::super::unet_config::{Depth, DownBlockKind, MidBlockKind, TextTimeEmbed, UNetConfig, UpBlockKind};
use super::super::vae::VaeConfig;
use super::{Family, SingleFile, UNET_PREFIX, VAE_PREFIX, XL_OPEN_CLIP_PREFIX};
use anyhow::{bail, Context, Result};

/// What to do when the defaults the weights cannot override do not fit.
const CONFIG_HINT: &str = " (with the norm groups, 32, that LDM and SGM hard-code; for a model whose norm groups or heads \
differ, convert it once with `sdkd convert --from <file> --config <a diffusers folder of the model> --to <folder>`)";

/// SDXL's `addition_time_embed_dim` (SGM's `ConcatTimestepEmbedderND` outdim), used when the
/// file has no second text encoder to size the pooled part of `label_emb`.
const XL_TIME_EMBED_DIM: i64 = 256;

impl SingleFile {
    /// `epsilon` or `v_prediction`: the flag, else the sidecar's `parameterization`, else
    /// epsilon for SD-1.x; an SD-2.x file (512-base is epsilon, 768-v is v) with neither is
    /// refused rather than guessed.
    pub fn prediction_type(&self) -> Result<String> {
        if let Some(p) = &self.options.prediction_type {
            return Ok(p.clone());
        }
        if let Some(sidecar) = &self.yaml {
            let path = &sidecar.path;
            return match sidecar.model_param("parameterization").and_then(serde_yaml::Value::as_str) {
                None | Some("eps") => Ok("epsilon".into()),
                Some("v") => Ok("v_prediction".into()),
                Some(other) => bail!("{}: key model.params.parameterization: {other:?} is not supported (\"eps\" or \"v\")", path.display()),
            };
        }
        match self.family {
            Family::Sd1 | Family::Sdxl => Ok("epsilon".into()),
            Family::Sd2 => bail!(
                "{}: an SD-2.x checkpoint (OpenCLIP text encoder, 1024-wide context): whether it predicts v (768-v models) or \
                 noise (512-base) cannot be seen in the weights, and sdkd does not guess; put the model's LDM config beside it \
                 as {} (with parameterization: \"v\" for a v model), or convert it once with \
                 `sdkd convert --from <file> --to <folder> --prediction-type v_prediction|epsilon`",
                self.file(),
                self.state.path().with_extension("yaml").display()
            ),
        }
    }

    /// The UNet's diffusers config, from the shapes under `model.diffusion_model.`.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        if let Some(dir) = self.config_dir("unet") {
            return UNetConfig::from_path(&dir).with_context(|| format!("--config: {}", dir.display()));
        }
        let file = self.file();
        let key = |rest: &str| format!("{UNET_PREFIX}{rest}");
        let has = |rest: &str| self.state.has_prefix(&key(rest));
        let conv_in = self.shape(&key("input_blocks.0.0.weight"))?.to_vec();
        let out = self.shape(&key("out.2.weight"))?.to_vec();
        let mut c = UNetConfig::default();
        c.in_channels = conv_in[1];
        c.out_channels = out[0];
        // the transformer blocks of a spatial transformer (0: none)
        let depth = |b: &str| (0..).take_while(|d| has(&format!("{b}1.transformer_blocks.{d}."))).count() as i64;
        let mut stages: Vec<(i64, i64, bool)> = vec![]; // (channels, layers, cross-attention)
        let mut down_depths: Vec<Vec<i64>> = vec![vec![]];
        let mut cur: (i64, i64, bool) = (conv_in[0], 0, false);
        let mut k = 1;
        let mut context = None;
        let mut linear = None;
        loop {
            let b = format!("input_blocks.{k}.");
            if !has(&b) {
                break;
            }
            if has(&format!("{b}0.op.")) {
                stages.push(cur);
                down_depths.push(vec![]);
                cur = (cur.0, 0, false);
            } else {
                let ch = self.shape(&key(&format!("{b}0.out_layers.3.weight")))?[0];
                let attn = has(&format!("{b}1."));
                if cur.1 > 0 && (ch != cur.0 || attn != cur.2) {
                    bail!("{file}: key {}: a stage changes width or attention between its blocks (not a UNet2DConditionModel)", key(&b));
                }
                cur = (ch, cur.1 + 1, attn);
                down_depths.last_mut().expect("one per stage").push(depth(&b));
                if attn {
                    let to_k = self.shape(&key(&format!("{b}1.transformer_blocks.0.attn2.to_k.weight")))?;
                    context.get_or_insert(to_k[1]);
                    linear.get_or_insert(self.shape(&key(&format!("{b}1.proj_in.weight")))?.len() == 2);
                }
            }
            k += 1;
        }
        self.check_contiguous("input_blocks", k)?; // a gap first: it also ends the stage early
        if cur.1 == 0 {
            bail!("{file}: key {}: the last input stage has no resnet", key(&format!("input_blocks.{}", k - 1)));
        }
        stages.push(cur);
        let n = stages.len();
        c.block_out_channels = stages.iter().map(|s| s.0).collect();
        c.layers_per_block = stages.iter().map(|s| s.1).collect();
        c.down_block_types = stages.iter().map(|s| if s.2 { DownBlockKind::CrossAttn } else { DownBlockKind::Plain }).collect();
        // UNetMidBlock2DCrossAttn (resnet, transformer, resnet), UNetMidBlock2D (one resnet, as
        // diffusers builds SSD-1B's) or none
        let mid_depth = depth("middle_block.");
        c.mid_block = match (mid_depth > 0, has("middle_block.")) {
            (true, _) => Some(MidBlockKind::CrossAttn),
            (false, true) => Some(MidBlockKind::Plain),
            (false, false) => None,
        };
        // The up path: up block i mirrors stage n-1-i with one more resnet; an upsampler ends it.
        let mut up_types = vec![];
        let mut up_depths: Vec<Vec<i64>> = vec![];
        let mut k = 0;
        for i in 0..n {
            let want = c.layers_per_block[n - 1 - i] + 1;
            let mut attn = None;
            up_depths.push(vec![]);
            for j in 0..want {
                let b = format!("output_blocks.{k}.");
                if !has(&b) {
                    bail!("{file}: key {}: missing; up block {i} needs {want} blocks to mirror input stage {}", key(&b), n - 1 - i);
                }
                let a = has(&format!("{b}1.proj_in."));
                attn.get_or_insert(a);
                up_depths[i].push(depth(&b));
                let upsampler = has(&format!("{b}1.conv.")) || has(&format!("{b}2.conv."));
                if upsampler != (j + 1 == want && i + 1 < n) {
                    bail!("{file}: key {}: an upsampler where the input side has no stage boundary (or none where it has one)", key(&b));
                }
                k += 1;
            }
            up_types.push(if attn == Some(true) { UpBlockKind::CrossAttn } else { UpBlockKind::Plain });
        }
        if has(&format!("output_blocks.{k}.")) {
            bail!("{file}: key {}: more output blocks than the input blocks mirror", key(&format!("output_blocks.{k}")));
        }
        self.check_contiguous("output_blocks", k)?;
        c.up_block_types = up_types;
        self.set_depths(&mut c, &down_depths, &up_depths, mid_depth)?;
        c.addition_embed = self.text_time()?;
        c.cross_attention_dim = context.unwrap_or(768);
        c.use_linear_projection = linear.unwrap_or(false);
        c.num_heads = self.heads(&c.block_out_channels)?;
        let v = self.prediction_type().map(|p| p == "v_prediction").unwrap_or(false);
        // diffusers' SD-2.1 768-v config upcasts attention (fp16 overflows there).
        c.upcast_attention = self.family == Family::Sd2 && v;
        let default_size = match self.family {
            Family::Sdxl => 128,
            Family::Sd2 if v => 96,
            _ => 64,
        };
        c.sample_size = Some(self.yaml.as_ref().and_then(|y| y.unet_param("image_size")).unwrap_or(default_size));
        c.validate().with_context(|| format!("{file}: the UNet its shapes describe{CONFIG_HINT}"))?;
        Ok(c)
    }

    /// Heads per stage, which are not in the weights: LDM's config gives num_head_channels (SD-2,
    /// SDXL: 64) or num_heads (SD-1: 8).
    fn heads(&self, channels: &[i64]) -> Result<Vec<i64>> {
        let n = channels.len();
        let head_channels = self.yaml.as_ref().and_then(|y| y.unet_param("num_head_channels")).filter(|&h| h > 0);
        let heads = self.yaml.as_ref().and_then(|y| y.unet_param("num_heads")).filter(|&h| h > 0);
        let per_stage: Vec<i64> = match (head_channels, heads, self.family) {
            (Some(h), _, _) => channels.iter().map(|ch| ch / h).collect(),
            (None, Some(h), _) => vec![h; n],
            (None, None, Family::Sd1) => vec![8; n],
            (None, None, Family::Sd2 | Family::Sdxl) => channels.iter().map(|ch| ch / 64).collect(),
        };
        if let Some(i) = channels.iter().zip(&per_stage).position(|(ch, &h)| h <= 0 || ch % h != 0) {
            bail!(
                "{}: the attention heads cannot be seen in the weights, and {}'s default does not fit stage {i} ({} channels): \
                 put the model's LDM config beside it as {} (num_head_channels or num_heads), or convert it once with \
                 `sdkd convert --from <file> --config <a diffusers folder of the model> --to <folder>`",
                self.file(),
                self.family.name(),
                channels[i],
                self.state.path().with_extension("yaml").display()
            );
        }
        Ok(per_stage)
    }

    /// `transformer_layers_per_block` (and its reverse for the decoder, when the decoder's depths
    /// are not the encoder's mirrored) from the counted depths; left empty when every spatial
    /// transformer has one block (SD-1.x/2.x), so their configs stay as they were.
    fn set_depths(&self, c: &mut UNetConfig, down: &[Vec<i64>], up: &[Vec<i64>], mid: i64) -> Result<()> {
        let n = c.num_stages();
        let attn_depths = down.iter().chain(up).flatten().filter(|&&d| d > 0);
        if attn_depths.clone().all(|&d| d == 1) && mid <= 1 {
            return Ok(());
        }
        let depth = |v: &[i64], plain: i64| -> Depth {
            match v.first() {
                None | Some(0) => Depth::Uniform(plain),
                Some(&d0) if v.iter().all(|&d| d == d0) => Depth::Uniform(d0),
                _ => Depth::PerLayer(v.to_vec()),
            }
        };
        // diffusers gives the mid block the last stage's depth: a plain last stage carries it
        let mid_or_1 = if mid > 0 { mid } else { 1 };
        c.transformer_layers_per_block = (0..n).map(|i| depth(&down[i], if i + 1 == n { mid_or_1 } else { 1 })).collect();
        if mid > 0 && c.down_depth(n - 1, 0) != mid {
            bail!(
                "{}: key {UNET_PREFIX}middle_block.1: {mid} transformer blocks, but the last input stage has {}: diffusers gives the \
                 mid block the last stage's depth",
                self.file(),
                c.down_depth(n - 1, 0)
            );
        }
        let mirrored = (0..n).all(|i| up[i].iter().all(|&d| d == 0 || d == c.down_depth(n - 1 - i, 0)));
        let per_layer = c.transformer_layers_per_block.iter().any(|d| matches!(d, Depth::PerLayer(_)));
        if !mirrored || per_layer {
            c.reverse_transformer_layers_per_block = Some((0..n).map(|i| depth(&up[i], 1)).collect());
        }
        Ok(())
    }

    /// SDXL's micro-conditioning (`label_emb.0.0` = `add_embedding.linear_1`): its input is the
    /// pooled width (the bigG projection's, when the file has it) plus 6 sinusoidal time ids.
    fn text_time(&self) -> Result<Option<TextTimeEmbed>> {
        let key = format!("{UNET_PREFIX}label_emb.0.0.weight");
        let Some(shape) = self.state.shape(&key) else { return Ok(None) };
        if shape.len() != 2 {
            bail!("{}: key {key}: shape {shape:?} is not a linear weight", self.file());
        }
        let input_dim = shape[1];
        let pooled = self.state.shape(&format!("{XL_OPEN_CLIP_PREFIX}text_projection")).and_then(|s| s.get(1).copied());
        let time_embed_dim = match pooled {
            Some(p) if input_dim > p && (input_dim - p) % 6 == 0 => (input_dim - p) / 6,
            Some(p) => bail!(
                "{}: key {key}: input width {input_dim} is not the pooled text embedding ({p}) plus 6 time ids",
                self.file()
            ),
            None => XL_TIME_EMBED_DIM,
        };
        if input_dim <= 6 * time_embed_dim {
            bail!("{}: key {key}: input width {input_dim} leaves no room for a pooled embedding beside 6 × {time_embed_dim} time features", self.file());
        }
        Ok(Some(TextTimeEmbed { time_embed_dim, input_dim }))
    }

    /// Refuses numbered blocks beyond a gap (loaders that count blocks stop at the first one).
    fn check_contiguous(&self, list: &str, end: usize) -> Result<()> {
        let prefix = format!("{UNET_PREFIX}{list}.");
        for name in self.state.with_prefix(&prefix) {
            let idx: Option<usize> = name[prefix.len()..].split('.').next().and_then(|i| i.parse().ok());
            if idx.is_some_and(|i| i >= end) {
                bail!("{}: key {name}: the {list} numbering has a gap at {end}", self.file());
            }
        }
        Ok(())
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        self.check_has(VAE_PREFIX, "VAE (first_stage_model)")?;
        if let Some(dir) = self.config_dir("vae") {
            return VaeConfig::from_path(&dir).with_context(|| format!("--config: {}", dir.display()));
        }
        let key = |rest: &str| format!("{VAE_PREFIX}{rest}");
        let mut ch = vec![];
        while self.state.has_prefix(&key(&format!("encoder.down.{}.", ch.len()))) {
            ch.push(self.shape(&key(&format!("encoder.down.{}.block.0.conv1.weight", ch.len())))?[0]);
        }
        let mut layers = 0;
        while self.state.has_prefix(&key(&format!("encoder.down.0.block.{layers}."))) {
            layers += 1;
        }
        let c = VaeConfig {
            in_channels: self.shape(&key("encoder.conv_in.weight"))?[1],
            out_channels: self.shape(&key("decoder.conv_out.weight"))?[0],
            block_out_channels: ch,
            layers_per_block: layers,
            latent_channels: self.shape(&key("decoder.conv_in.weight"))?[1],
            norm_num_groups: 32,
            sample_size: Some(match self.family {
                Family::Sd1 => 512,
                Family::Sd2 => 768,
                Family::Sdxl => 1024,
            }),
            // SDXL's VAE: 0.13025 (its diffusers config); SD's: 0.18215
            scaling_factor: self.yaml.as_ref().and_then(|y| y.model_param("scale_factor")).and_then(serde_yaml::Value::as_f64).unwrap_or(if self.family == Family::Sdxl {
                0.13025
            } else {
                0.18215
            }),
            use_quant_conv: self.state.has_prefix(&key("quant_conv.")),
            use_post_quant_conv: self.state.has_prefix(&key("post_quant_conv.")),
            mid_block_add_attention: self.state.has_prefix(&key("encoder.mid.attn_1.")),
            ..VaeConfig::default()
        };
        c.validate().with_context(|| format!("{}: the VAE its shapes describe{CONFIG_HINT}", self.file()))?;
        Ok(c)
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        if let Some(dir) = self.config_dir("text_encoder") {
            return ClipTextConfig::from_path(&dir).with_context(|| format!("--config: {}", dir.display()));
        }
        let p = self.text_prefix();
        self.check_has(p, "text encoder (cond_stage_model or conditioner.embedders.0)")?;
        let c = match self.family {
            Family::Sd1 | Family::Sdxl => {
                let t = &self.sd1_text_prefix;
                let tok = self.shape(&format!("{t}embeddings.token_embedding.weight"))?.to_vec();
                ClipTextConfig {
                    vocab_size: tok[0],
                    hidden_size: tok[1],
                    intermediate_size: self.shape(&format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
                    num_hidden_layers: self.count_layers(&format!("{t}encoder.layers."))?,
                    num_attention_heads: (tok[1] / 64).max(1),
                    max_position_embeddings: self.shape(&format!("{t}embeddings.position_embedding.weight"))?[0],
                    hidden_act: Activation::QuickGelu,
                    ..ClipTextConfig::default()
                }
            }
            Family::Sd2 => {
                let mut c = self.open_clip_config(p)?;
                if c.num_hidden_layers < 2 {
                    bail!("{}: key {p}transformer.resblocks: {} layers; SD-2 uses the penultimate of at least 2", self.file(), c.num_hidden_layers);
                }
                // SD-2 conditions on the penultimate layer: the last is not part of the model.
                c.num_hidden_layers -= 1;
                c
            }
        };
        c.validate().with_context(|| format!("{}: the text encoder its shapes describe", self.file()))?;
        Ok(c)
    }

    /// SDXL's second text encoder: OpenCLIP ViT-bigG, every layer (the pooled embedding is the
    /// last layer's), and its projection.
    pub fn text_encoder_2_config(&self) -> Result<ClipTextConfig> {
        if let Some(dir) = self.config_dir("text_encoder_2") {
            let mut c = ClipTextConfig::from_path(&dir).with_context(|| format!("--config: {}", dir.display()))?;
            c.with_projection = true;
            return Ok(c);
        }
        let p = XL_OPEN_CLIP_PREFIX;
        self.check_has(p, "second text encoder (conditioner.embedders.1, OpenCLIP ViT-bigG)")?;
        let proj = self.shape(&format!("{p}text_projection"))?.to_vec();
        let mut c = self.open_clip_config(p)?;
        if proj.len() != 2 || proj[0] != c.hidden_size {
            bail!("{}: key {p}text_projection: shape {proj:?}, not (width {}, projection)", self.file(), c.hidden_size);
        }
        c.with_projection = true;
        c.projection_dim = proj[1];
        // SDXL's text_encoder_2 config: pool at the largest id (open_clip's argmax pooling)
        c.eos_token_id = 2;
        c.validate().with_context(|| format!("{}: the second text encoder its shapes describe", self.file()))?;
        Ok(c)
    }

    /// An OpenCLIP text tower's sizes under `p`, every layer counted.
    fn open_clip_config(&self, p: &str) -> Result<ClipTextConfig> {
        let tok = self.shape(&format!("{p}token_embedding.weight"))?.to_vec();
        Ok(ClipTextConfig {
            vocab_size: tok[0],
            hidden_size: tok[1],
            intermediate_size: self.shape(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
            num_hidden_layers: self.count_layers(&format!("{p}transformer.resblocks."))?,
            num_attention_heads: (tok[1] / 64).max(1),
            max_position_embeddings: self.shape(&format!("{p}positional_embedding"))?[0],
            hidden_act: Activation::Gelu,
            ..ClipTextConfig::default()
        })
    }

    /// The layers `{prefix}0.`, `{prefix}1.`, ... up to the first missing one; a layer numbered
    /// beyond it (a truncated or damaged tower) is refused, naming the missing layer.
    fn count_layers(&self, prefix: &str) -> Result<i64> {
        let mut n = 0;
        while self.state.has_prefix(&format!("{prefix}{n}.")) {
            n += 1;
        }
        let beyond = self.state.with_prefix(prefix).find(|k| k[prefix.len()..].split('.').next().and_then(|i| i.parse::<i64>().ok()).is_some_and(|i| i > n));
        if let Some(k) = beyond {
            bail!("{}: key {prefix}{n}.*: missing, but {k} exists: the text encoder's layers have a gap (a truncated or damaged file)", self.file());
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{names, SingleFileOptions, StateDict};
    use super::*;
    use crate::models::layers::Init;
    use crate::models::unet::UNet;
    use crate::models::weights;
    use std::path::Path;
    use tch::{Device, Kind};

    /// SDXL base's published UNet, written in SGM names (storage never touched) and read back
    /// with no sidecar and no `--config`: the shapes and SDXL's defaults give its config.
    #[test]
    fn sdxl_base_config_from_its_sgm_names() {
        let want = UNetConfig::from_path(Path::new("configs/reference/sdxl_unet_config.json")).unwrap();
        let unet = UNet::build(&want, Device::Cpu, Kind::Half, Init::Empty);
        let ldm = names::unet_to_ldm(&want, &weights::named_tensors(&unet.vs)).unwrap();
        assert!(ldm.iter().any(|(k, _)| k == "model.diffusion_model.label_emb.0.2.weight"));
        let state = StateDict::from_tensors(Path::new("sd_xl_base_1.0.safetensors"), ldm.into_iter().collect());
        let file = SingleFile::from_state(state, &SingleFileOptions::default()).unwrap();
        assert_eq!(file.family, Family::Sdxl);
        let got = file.unet_config().unwrap();
        assert_eq!(got.block_out_channels, want.block_out_channels);
        assert_eq!(got.layers_per_block, want.layers_per_block);
        assert_eq!((got.down_block_types.clone(), got.up_block_types.clone(), got.mid_block), (want.down_block_types.clone(), want.up_block_types.clone(), want.mid_block));
        assert_eq!(got.transformer_layers_per_block, want.transformer_layers_per_block);
        assert_eq!(got.reverse_transformer_layers_per_block, None);
        assert_eq!(got.addition_embed, want.addition_embed);
        assert_eq!((got.num_heads.clone(), got.cross_attention_dim, got.use_linear_projection, got.sample_size), (want.num_heads.clone(), 2048, true, Some(128)));
        assert_eq!(got.transformer_block_count(), 70);
        assert_eq!(UNet::build(&got, Device::Cpu, Kind::Half, Init::Empty).num_params(), 2_567_463_684);
    }

    /// The SDXL students pruned from SDXL base, written in SGM names (storage never touched), read
    /// back with no sidecar and no `--config`: the per-block transformer depths (SSD-1B's and
    /// Vega's asymmetric decoders), the mid block's kind (a resnet alone, none) and the published
    /// parameter counts come back from the shapes.
    #[test]
    fn sdxl_student_configs_from_their_sgm_names() {
        use crate::distill::student::StudentPlan;
        let teacher = UNetConfig::from_path(Path::new("configs/reference/sdxl_unet_config.json")).unwrap();
        for (preset, params) in [("ssd_1b", 1_331_334_404), ("vega", 745_225_604), ("koala_1b", 1_161_184_324), ("koala_700m", 782_822_724)] {
            let want = StudentPlan::resolve(preset, Some(&teacher)).unwrap().config;
            let unet = UNet::build(&want, Device::Cpu, Kind::Half, Init::Empty);
            let ldm = names::unet_to_ldm(&want, &weights::named_tensors(&unet.vs)).unwrap();
            let state = StateDict::from_tensors(Path::new("student.safetensors"), ldm.into_iter().collect());
            let got = SingleFile::from_state(state, &SingleFileOptions::default()).unwrap().unet_config().unwrap();
            assert_eq!((&got.layers_per_block, &got.transformer_layers_per_block), (&want.layers_per_block, &want.transformer_layers_per_block), "{preset}");
            assert_eq!(got.reverse_transformer_layers_per_block, want.reverse_transformer_layers_per_block, "{preset}");
            assert_eq!((got.mid_block, &got.up_block_types), (want.mid_block, &want.up_block_types), "{preset}");
            assert_eq!(UNet::build(&got, Device::Cpu, Kind::Half, Init::Empty).num_params(), params, "{preset}");
        }
    }
}
