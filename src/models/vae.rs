//! diffusers' `AutoencoderKL`, the Stable Diffusion VAE: `Encoder` (DownEncoderBlock2D stages, a
//! mid block with one group-normed self-attention), the diagonal Gaussian posterior, and the
//! `Decoder` (UpDecoderBlock2D stages). Old checkpoints name the mid-block attention
//! `query/key/value/proj_attn`; they are renamed to `to_q/to_k/to_v/to_out.0` on load, as
//! diffusers does.
use super::layers::{count_params, Builder, Conv2d, GroupNorm, Init, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use super::unet_blocks::{Downsample2D, Upsample2D};
use super::weights;
use crate::json_config::{self, check_size, MAX_WIDTH};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// `vae/config.json` (diffusers' `AutoencoderKL`), with the constructor's defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// One `DownEncoderBlock2D` / `UpDecoderBlock2D` per entry.
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    /// Old configs write `[512, 512]`; the first entry counts.
    #[serde(default, deserialize_with = "first_if_list")]
    pub sample_size: Option<i64>,
    /// Latents are `(z - shift_factor) * scaling_factor` for the UNet.
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    /// The VAE overflows in fp16 at high resolution; pipelines run it in fp32 when set.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

fn first_if_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrList {
        One(i64),
        List(Vec<i64>),
    }
    Ok(match IntOrList::deserialize(d)? {
        IntOrList::One(v) => Some(v),
        IntOrList::List(v) => v.first().copied(),
    })
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: Some(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// Reads `config.json`, or `<dir>/config.json` when given a folder.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = json_config::config_file(path, "config.json");
        let obj = json_config::read_object(&file, "VAE config", str::to_string)?;
        Self::from_object(&obj).with_context(|| format!("VAE config {}", file.display()))
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        Self::from_object(json_config::object(value)?)
    }

    fn from_object(obj: &Map<String, Value>) -> Result<Self> {
        if let Some(class) = obj.get("_class_name").and_then(Value::as_str) {
            if class != "AutoencoderKL" {
                bail!("key \"_class_name\": {class:?} is not supported (only AutoencoderKL)");
            }
        }
        let defaults = [("act_fn", json!("silu")), ("latents_mean", Value::Null), ("latents_std", Value::Null)];
        json_config::check_defaults(obj, &defaults, "sdkd")?;
        let c: VaeConfig = json_config::typed(obj)?;
        let n = c.block_out_channels.len();
        for (key, want) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            // diffusers' default is the one-block tuple.
            let types: Vec<String> = json_config::field(obj, key)?.unwrap_or_else(|| vec![want.to_string()]);
            if let Some(other) = types.iter().find(|t| *t != want) {
                bail!("key {key:?}: block type {other:?} is not supported (only {want})");
            }
            if types.len() != n {
                bail!("key {key:?}: {} blocks but block_out_channels has {n}", types.len());
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        check_size("block_out_channels", self.block_out_channels.len() as i64, 1, 8)?;
        check_size("norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)?;
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            check_size(&format!("block_out_channels[{i}]"), ch, 1, MAX_WIDTH)?;
            if ch % self.norm_num_groups != 0 {
                bail!("key \"block_out_channels\": block {i} has {ch} channels, not a positive multiple of norm_num_groups {}", self.norm_num_groups);
            }
        }
        for (key, v) in [("in_channels", self.in_channels), ("out_channels", self.out_channels), ("latent_channels", self.latent_channels)] {
            check_size(key, v, 1, MAX_WIDTH)?;
        }
        check_size("layers_per_block", self.layers_per_block, 1, 64)?;
        if self.scaling_factor == 0.0 {
            bail!("key \"scaling_factor\": must not be 0");
        }
        Ok(())
    }

    /// How many pixels one latent covers per side (`2^(blocks - 1)`, 8 for SD).
    pub fn downscale_factor(&self) -> i64 {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn to_json(&self) -> Value {
        let n = self.block_out_channels.len();
        let mut m = serde_json::to_value(self).expect("a VaeConfig serializes to JSON");
        m["_class_name"] = json!("AutoencoderKL");
        m["_diffusers_version"] = json!("0.42.1");
        m["act_fn"] = json!("silu");
        m["down_block_types"] = json!(vec!["DownEncoderBlock2D"; n]);
        m["up_block_types"] = json!(vec!["UpDecoderBlock2D"; n]);
        m
    }
}

/// The mid block's spatial self-attention (diffusers' `Attention` with `norm_num_groups`,
/// `residual_connection` and biased projections): one head as wide as the block.
#[derive(Debug)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn new(b: Builder, channels: i64, groups: i64) -> Self {
        VaeAttention {
            group_norm: GroupNorm::new(b.pp("group_norm"), groups, channels, 1e-6),
            to_q: Linear::new(b.pp("to_q"), channels, channels, true),
            to_k: Linear::new(b.pp("to_k"), channels, channels, true),
            to_v: Linear::new(b.pp("to_v"), channels, channels, true),
            to_out: Linear::new(b.pp("to_out").pp(0), channels, channels, true),
        }
    }

    /// `x`: (b, c, h, w).
    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, c, h, w) = x.size4().expect("VAE attention input must be (b, c, h, w)");
        let tokens = self.group_norm.forward(x).view([b, c, h * w]).transpose(1, 2); // (b, hw, c)
        let heads = |t: Tensor| t.unsqueeze(1); // (b, 1, hw, c)
        let q = heads(self.to_q.forward(&tokens));
        let k = heads(self.to_k.forward(&tokens));
        let v = heads(self.to_v.forward(&tokens));
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false).squeeze_dim(1);
        let out = self.to_out.forward(&out).transpose(1, 2).reshape([b, c, h, w]);
        out + x
    }
}

fn resnet_config(groups: i64) -> ResnetConfig {
    ResnetConfig { groups, eps: 1e-6, temb_channels: None, output_scale_factor: 1.0 }
}

/// diffusers' `UNetMidBlock2D` as the VAE uses it: resnet, attention (optional), resnet.
#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<VaeAttention>,
}

impl MidBlock {
    fn new(b: Builder, channels: i64, c: &VaeConfig) -> Self {
        let rc = resnet_config(c.norm_num_groups);
        MidBlock {
            resnets: (0..2).map(|i| ResnetBlock2D::new(b.pp("resnets").pp(i), channels, channels, &rc)).collect(),
            attention: c
                .mid_block_add_attention
                .then(|| VaeAttention::new(b.pp("attentions").pp(0), channels, c.norm_num_groups)),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(attn) = &self.attention {
            h = attn.forward(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}

/// `DownEncoderBlock2D` (resnets, then a stride-2 conv) and `UpDecoderBlock2D` (resnets, then
/// nearest ×2 and a conv): resnets plus an optional resampler.
#[derive(Debug)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

fn resnets(b: &Builder, in_ch: i64, out_ch: i64, layers: i64, groups: i64) -> Vec<ResnetBlock2D> {
    let rc = resnet_config(groups);
    (0..layers).map(|i| ResnetBlock2D::new(b.pp("resnets").pp(i), if i == 0 { in_ch } else { out_ch }, out_ch, &rc)).collect()
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(b: Builder, c: &VaeConfig) -> Self {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let down_blocks = (0..n)
            .map(|i| {
                let bb = b.pp("down_blocks").pp(i);
                EncoderBlock {
                    resnets: resnets(&bb, if i == 0 { ch[0] } else { ch[i - 1] }, ch[i], c.layers_per_block, c.norm_num_groups),
                    // the encoder's downsamplers pad right/bottom by one instead of both sides
                    downsampler: (i + 1 < n).then(|| Downsample2D::new(bb.pp("downsamplers").pp(0), ch[i], 0)),
                }
            })
            .collect();
        Encoder {
            conv_in: Conv2d::new(b.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1),
            down_blocks,
            mid_block: MidBlock::new(b.pp("mid_block"), ch[n - 1], c),
            conv_norm_out: GroupNorm::new(b.pp("conv_norm_out"), c.norm_num_groups, ch[n - 1], 1e-6),
            conv_out: Conv2d::new(b.pp("conv_out"), ch[n - 1], 2 * c.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
            }
        }
        h = self.mid_block.forward(&h);
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(b: Builder, c: &VaeConfig) -> Self {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let up_blocks = (0..n)
            .map(|i| {
                let bb = b.pp("up_blocks").pp(i);
                DecoderBlock {
                    resnets: resnets(&bb, if i == 0 { rev[0] } else { rev[i - 1] }, rev[i], c.layers_per_block + 1, c.norm_num_groups),
                    upsampler: (i + 1 < n).then(|| Upsample2D::new(bb.pp("upsamplers").pp(0), rev[i])),
                }
            })
            .collect();
        Decoder {
            conv_in: Conv2d::new(b.pp("conv_in"), c.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(b.pp("mid_block"), rev[0], c),
            up_blocks,
            conv_norm_out: GroupNorm::new(b.pp("conv_norm_out"), c.norm_num_groups, rev[n - 1], 1e-6),
            conv_out: Conv2d::new(b.pp("conv_out"), rev[n - 1], c.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None);
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None);
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The encoder's posterior: a Gaussian per latent element.
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// `moments`: (b, 2·latent_channels, h, w), mean then log-variance.
    pub fn new(moments: &Tensor) -> Self {
        let parts = moments.chunk(2, 1);
        let logvar = parts[1].clamp(-30.0, 20.0);
        let std = (&logvar * 0.5).exp();
        DiagonalGaussian { mean: parts[0].shallow_clone(), logvar, std }
    }

    /// The mean (diffusers' `mode()`).
    pub fn mode(&self) -> Tensor {
        self.mean.shallow_clone()
    }

    /// `mean + std · noise`, with `noise` shaped like the mean.
    pub fn sample(&self, noise: &Tensor) -> Tensor {
        assert_eq!(noise.size(), self.mean.size(), "posterior noise must be shaped like the latents");
        &self.mean + &self.std * noise.to_device(self.mean.device()).to_kind(self.mean.kind())
    }

    /// `sample` with the noise diffusers draws from `torch.Generator("cpu").manual_seed(seed)`:
    /// drawn on the CPU in the mean's dtype, then moved. This reseeds LibTorch's global CPU
    /// generator (tch exposes no generator objects).
    pub fn sample_seeded(&self, seed: u64) -> Tensor {
        tch::manual_seed(seed as i64);
        let noise = Tensor::randn(self.mean.size(), (self.mean.kind(), Device::Cpu));
        self.sample(&noise)
    }

    /// KL divergence to N(0, I) per sample: (b,).
    pub fn kl(&self) -> Tensor {
        let var = self.logvar.exp();
        (self.mean.square() + var - 1.0 - &self.logvar).sum_dim_intlist([1i64, 2, 3].as_slice(), false, None::<Kind>) * 0.5
    }
}

#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(b: Builder, config: &VaeConfig) -> Self {
        let c = config;
        let lc = c.latent_channels;
        AutoencoderKL {
            config: c.clone(),
            encoder: Encoder::new(b.pp("encoder"), c),
            decoder: Decoder::new(b.pp("decoder"), c),
            quant_conv: c.use_quant_conv.then(|| Conv2d::new(b.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)),
            post_quant_conv: c.use_post_quant_conv.then(|| Conv2d::new(b.pp("post_quant_conv"), lc, lc, 1, 1, 0)),
        }
    }

    /// `x`: (b, in_channels, H, W) images in [-1, 1] -> the posterior over (b, latent, H/f, W/f).
    pub fn encode(&self, x: &Tensor) -> DiagonalGaussian {
        let h = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&h),
            None => h,
        };
        DiagonalGaussian::new(&moments)
    }

    /// `z`: unscaled latents (b, latent, h, w) -> images (b, out_channels, h·f, w·f).
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    /// Device of the decoder's parameters (callers move latents there).
    pub fn device(&self) -> Device {
        self.decoder.conv_in.weight.device()
    }

    /// dtype of the decoder's parameters.
    pub fn kind(&self) -> Kind {
        self.decoder.conv_in.weight.kind()
    }

    /// diffusers' `forward(sample)`: decode the posterior mean.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.decode(&self.encode(x).mode())
    }

    /// What the UNet sees: `(z - shift_factor) · scaling_factor`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        (z - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// The inverse of `scale_latents`, before `decode`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }
}

/// The diffusers name of a VAE tensor saved under the legacy attention names.
pub fn modern_attention_name(name: &str) -> String {
    for (old, new) in [("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0")] {
        for leaf in ["weight", "bias"] {
            if let Some(prefix) = name.strip_suffix(&format!(".{old}.{leaf}")) {
                if prefix.contains("mid_block.attentions.") {
                    return format!("{prefix}.{new}.{leaf}");
                }
            }
        }
    }
    name.to_string()
}

/// A VAE with the var store that owns its parameters.
pub struct Vae {
    pub vs: nn::VarStore,
    pub model: AutoencoderKL,
}

impl Vae {
    pub fn build(config: &VaeConfig, device: Device, kind: Kind, init: Init) -> Self {
        let vs = nn::VarStore::new(device);
        let model = AutoencoderKL::new(Builder::new(&vs, kind, init), config);
        Vae { vs, model }
    }

    /// Loads a diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors), keeping
    /// `kind`; legacy attention names are accepted.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let config = VaeConfig::from_path(dir)?;
        let vae = Self::build(&config, device, kind, Init::Empty);
        let files = weights::weight_files(dir, "diffusion_pytorch_model")?;
        weights::load_strict_mapped(&vae.vs.variables(), &files, &|n| Some(modern_attention_name(n)))
            .with_context(|| format!("loading VAE {}", dir.display()))?;
        Ok(vae)
    }

    pub fn num_params(&self) -> i64 {
        count_params(self.vs.variables().values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_vae() -> VaeConfig {
        VaeConfig { block_out_channels: vec![128, 256, 512, 512], layers_per_block: 2, sample_size: Some(512), ..Default::default() }
    }

    #[test]
    fn sd_vae_counts() {
        // stabilityai/sd-vae-ft-mse / SD-1.5 vae: 83,653,863 parameters.
        assert_eq!(Vae::build(&sd_vae(), Device::Cpu, Kind::Float, Init::Empty).num_params(), 83_653_863);
    }

    #[test]
    fn legacy_names() {
        assert_eq!(modern_attention_name("encoder.mid_block.attentions.0.query.weight"), "encoder.mid_block.attentions.0.to_q.weight");
        assert_eq!(modern_attention_name("decoder.mid_block.attentions.0.proj_attn.bias"), "decoder.mid_block.attentions.0.to_out.0.bias");
        assert_eq!(modern_attention_name("decoder.conv_in.weight"), "decoder.conv_in.weight");
    }

    #[test]
    fn shapes_and_config_errors() {
        let c = VaeConfig { block_out_channels: vec![8, 16], norm_num_groups: 4, ..Default::default() };
        let vae = Vae::build(&c, Device::Cpu, Kind::Float, Init::Torch);
        let x = Tensor::randn([2, 3, 10, 6], (Kind::Float, Device::Cpu));
        let post = vae.model.encode(&x);
        assert_eq!(post.mean.size(), vec![2, 4, 5, 3]);
        assert_eq!(vae.model.decode(&post.mode()).size(), vec![2, 3, 10, 6]);
        assert_eq!(post.kl().size(), vec![2]);
        let e = VaeConfig::from_json(&json!({"down_block_types": ["AttnDownEncoderBlock2D"]})).unwrap_err().to_string();
        assert!(e.contains("down_block_types") && e.contains("AttnDownEncoderBlock2D"), "{e}");
        let e = VaeConfig::from_json(&json!({"block_out_channels": [64, 128]})).unwrap_err().to_string();
        assert!(e.contains("down_block_types"), "{e}");
    }
}
