//! The diffusers configs of a single file's UNet, VAE and text encoder, from its shapes (and
//! its sidecar `.yaml` for what shapes cannot tell).
use super::super::clip::{Activation, ClipTextConfig};
use super::super::unet_config::{DownBlockKind, MidBlockKind, UNetConfig, UpBlockKind};
use super::super::vae::VaeConfig;
use super::{Family, SingleFile, UNET_PREFIX, VAE_PREFIX};
use anyhow::{bail, Context, Result};

impl SingleFile {
    /// `epsilon` or `v_prediction`: the flag, else the sidecar's `parameterization`, else
    /// epsilon for SD-1.x; an SD-2.x file (512-base is epsilon, 768-v is v) with neither is
    /// refused rather than guessed.
    pub fn prediction_type(&self) -> Result<String> {
        if let Some(p) = &self.options.prediction_type {
            return Ok(p.clone());
        }
        if let Some((path, _)) = &self.yaml {
            return match self.model_param("parameterization").and_then(serde_yaml::Value::as_str) {
                None | Some("eps") => Ok("epsilon".into()),
                Some("v") => Ok("v_prediction".into()),
                Some(other) => bail!("{}: key model.params.parameterization: {other:?} is not supported (\"eps\" or \"v\")", path.display()),
            };
        }
        match self.family {
            Family::Sd1 => Ok("epsilon".into()),
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
        let file = self.file();
        let key = |rest: &str| format!("{UNET_PREFIX}{rest}");
        let has = |rest: &str| self.state.has_prefix(&key(rest));
        let conv_in = self.shape(&key("input_blocks.0.0.weight"))?.to_vec();
        let out = self.shape(&key("out.2.weight"))?.to_vec();
        let mut c = UNetConfig::default();
        c.in_channels = conv_in[1];
        c.out_channels = out[0];
        let mut stages: Vec<(i64, i64, bool)> = vec![]; // (channels, layers, cross-attention)
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
                cur = (cur.0, 0, false);
            } else {
                let ch = self.shape(&key(&format!("{b}0.out_layers.3.weight")))?[0];
                let attn = has(&format!("{b}1."));
                if cur.1 > 0 && (ch != cur.0 || attn != cur.2) {
                    bail!("{file}: key {}: a stage changes width or attention between its blocks (not a UNet2DConditionModel)", key(&b));
                }
                cur = (ch, cur.1 + 1, attn);
                if attn {
                    if has(&format!("{b}1.transformer_blocks.1.")) {
                        bail!("{file}: key {}transformer_blocks.1: transformer depth above 1 is not supported", key(&format!("{b}1.")));
                    }
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
        c.mid_block = has("middle_block.").then_some(MidBlockKind::CrossAttn);
        // The up path: up block i mirrors stage n-1-i with one more resnet; an upsampler ends it.
        let mut up_types = vec![];
        let mut k = 0;
        for i in 0..n {
            let want = c.layers_per_block[n - 1 - i] + 1;
            let mut attn = None;
            for j in 0..want {
                let b = format!("output_blocks.{k}.");
                if !has(&b) {
                    bail!("{file}: key {}: missing; up block {i} needs {want} blocks to mirror input stage {}", key(&b), n - 1 - i);
                }
                let a = has(&format!("{b}1.proj_in."));
                attn.get_or_insert(a);
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
        c.cross_attention_dim = context.unwrap_or(768);
        c.use_linear_projection = linear.unwrap_or(false);
        // Heads are not in the weights: LDM's config gives num_head_channels (SD-2: 64) or
        // num_heads (SD-1: 8).
        let head_channels = self.unet_param("num_head_channels").filter(|&h| h > 0);
        let heads = self.unet_param("num_heads").filter(|&h| h > 0);
        c.num_heads = match (head_channels, heads, self.family) {
            (Some(h), _, _) => c.block_out_channels.iter().map(|ch| ch / h).collect(),
            (None, Some(h), _) => vec![h; n],
            (None, None, Family::Sd1) => vec![8; n],
            (None, None, Family::Sd2) => c.block_out_channels.iter().map(|ch| ch / 64).collect(),
        };
        if let Some(i) = c.block_out_channels.iter().zip(&c.num_heads).position(|(ch, &h)| h <= 0 || ch % h != 0) {
            bail!(
                "{file}: the attention heads cannot be seen in the weights, and {}'s default does not fit stage {i} ({} channels): \
                 put the model's LDM config beside it as {} (num_head_channels or num_heads)",
                self.family.name(),
                c.block_out_channels[i],
                self.state.path().with_extension("yaml").display()
            );
        }
        let v = self.prediction_type().map(|p| p == "v_prediction").unwrap_or(false);
        // diffusers' SD-2.1 768-v config upcasts attention (fp16 overflows there).
        c.upcast_attention = self.family == Family::Sd2 && v;
        c.sample_size = Some(self.unet_param("image_size").unwrap_or(if self.family == Family::Sd2 && v { 96 } else { 64 }));
        c.validate().with_context(|| format!("{file}: the UNet its shapes describe"))?;
        Ok(c)
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
            sample_size: Some(if self.family == Family::Sd2 { 768 } else { 512 }),
            scaling_factor: self.model_param("scale_factor").and_then(serde_yaml::Value::as_f64).unwrap_or(0.18215),
            use_quant_conv: self.state.has_prefix(&key("quant_conv.")),
            use_post_quant_conv: self.state.has_prefix(&key("post_quant_conv.")),
            mid_block_add_attention: self.state.has_prefix(&key("encoder.mid.attn_1.")),
            ..VaeConfig::default()
        };
        c.validate().with_context(|| format!("{}: the VAE its shapes describe", self.file()))?;
        Ok(c)
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        let p = self.text_prefix();
        self.check_has(p, "text encoder (cond_stage_model)")?;
        let c = match self.family {
            Family::Sd1 => {
                let t = &self.sd1_text_prefix;
                let tok = self.shape(&format!("{t}embeddings.token_embedding.weight"))?.to_vec();
                let mut layers = 0;
                while self.state.has_prefix(&format!("{t}encoder.layers.{layers}.")) {
                    layers += 1;
                }
                ClipTextConfig {
                    vocab_size: tok[0],
                    hidden_size: tok[1],
                    intermediate_size: self.shape(&format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
                    num_hidden_layers: layers,
                    num_attention_heads: (tok[1] / 64).max(1),
                    max_position_embeddings: self.shape(&format!("{t}embeddings.position_embedding.weight"))?[0],
                    hidden_act: Activation::QuickGelu,
                    ..ClipTextConfig::default()
                }
            }
            Family::Sd2 => {
                let tok = self.shape(&format!("{p}token_embedding.weight"))?.to_vec();
                let mut layers = 0;
                while self.state.has_prefix(&format!("{p}transformer.resblocks.{layers}.")) {
                    layers += 1;
                }
                if layers < 2 {
                    bail!("{}: key {p}transformer.resblocks: {layers} layers; SD-2 uses the penultimate of at least 2", self.file());
                }
                ClipTextConfig {
                    vocab_size: tok[0],
                    hidden_size: tok[1],
                    intermediate_size: self.shape(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
                    // SD-2 conditions on the penultimate layer: the last is not part of the model.
                    num_hidden_layers: layers - 1,
                    num_attention_heads: (tok[1] / 64).max(1),
                    max_position_embeddings: self.shape(&format!("{p}positional_embedding"))?[0],
                    hidden_act: Activation::Gelu,
                    ..ClipTextConfig::default()
                }
            }
        };
        c.validate().with_context(|| format!("{}: the text encoder its shapes describe", self.file()))?;
        Ok(c)
    }

}
