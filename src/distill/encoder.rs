//! The teacher's frozen VAE and text encoder as one [`SampleEncoder`]: what `sdkd preprocess`
//! writes into a latent cache, and what `train` runs per batch when it reads raw images. Both
//! paths then draw latents the same way ([`LatentScale::draw`]), so a cache changes nothing but
//! speed.
use crate::data::{Encoded, SampleEncoder};
use crate::models::{ClipTextEncoder, ClipTokenizer, PipelineDir, Vae};
use anyhow::{anyhow, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// How VAE latents become UNet inputs: `(z - shift) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentScale {
    pub scale: f64,
    pub shift: f64,
}

impl LatentScale {
    /// A latent sample `mean + std · ε` (ε from the current generator), scaled for the UNet.
    pub fn draw(&self, mean: &Tensor, std: &Tensor) -> Tensor {
        let eps = Tensor::randn(mean.size(), (Kind::Float, Device::Cpu)).to_device(mean.device());
        let z = mean.to_kind(Kind::Float) + std.to_kind(Kind::Float) * eps;
        (z - self.shift) * self.scale
    }

    /// Reads the scale an encoder recorded in a cache's `index.json`.
    pub fn from_description(d: &serde_json::Value) -> Result<LatentScale> {
        let scale = d["vae_scaling_factor"].as_f64().ok_or_else(|| anyhow!("the cache's encoder record has no vae_scaling_factor"))?;
        Ok(LatentScale { scale, shift: d["vae_shift_factor"].as_f64().unwrap_or(0.0) })
    }
}

pub struct TeacherEncoder {
    pub vae: Vae,
    pub text_encoder: ClipTextEncoder,
    pub tokenizer: ClipTokenizer,
    device: Device,
    source: String,
}

impl TeacherEncoder {
    pub fn load(pipeline: &PipelineDir, device: Device, kind: Kind) -> Result<TeacherEncoder> {
        if pipeline.is_xl() {
            anyhow::bail!(
                "pipeline {}: an SDXL pipeline cannot be a distillation teacher yet: the latent cache and training would need both text encoders and the pooled embedding (sdkd generate and inspect take it)",
                pipeline.root().display()
            );
        }
        let mut vae = pipeline.load_vae(device, kind)?;
        vae.vs.freeze();
        let mut text_encoder = pipeline.load_text_encoder(device, kind)?;
        text_encoder.vs.freeze();
        Ok(TeacherEncoder {
            vae,
            text_encoder,
            tokenizer: pipeline.load_tokenizer()?,
            device,
            source: pipeline.root().display().to_string(),
        })
    }

    pub fn latent_scale(&self) -> LatentScale {
        let c = &self.vae.model.config;
        LatentScale { scale: c.scaling_factor, shift: c.shift_factor.unwrap_or(0.0) }
    }

    /// (b, 77, hidden): the text encoder's last hidden state, as SD conditions on.
    pub fn encode_text<S: AsRef<str>>(&self, captions: &[S]) -> Tensor {
        let ids = self.tokenizer.encode_batch(captions, self.device);
        tch::no_grad(|| self.text_encoder.model.prompt_embeds(&ids, 0))
    }
}

impl SampleEncoder for TeacherEncoder {
    fn encode(&self, images: &Tensor, captions: &[String]) -> Result<Encoded> {
        let kind = crate::models::weights::var_kind(&self.vae.vs);
        let posterior = tch::no_grad(|| self.vae.model.encode(&images.to_device(self.device).to_kind(kind)));
        Ok(Encoded {
            latent_mean: posterior.mean.to_kind(Kind::Float),
            latent_std: posterior.std.to_kind(Kind::Float),
            text_embeddings: self.encode_text(captions).to_kind(Kind::Float),
        })
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.latent_scale();
        json!({"teacher": self.source, "vae_scaling_factor": s.scale, "vae_shift_factor": s.shift})
    }
}
