//! The teacher's frozen VAE and text encoder(s) as one [`SampleEncoder`]: what `sdkd preprocess`
//! writes into a latent cache, and what `train` runs per batch when it reads raw images. Both
//! paths then draw latents the same way ([`LatentScale::draw`]), so a cache changes nothing but
//! speed. An SDXL teacher encodes captions as `StableDiffusionXLPipeline.encode_prompt` does:
//! both encoders' penultimate hidden states concatenated, and text_encoder_2's pooled projection.
use crate::data::{Encoded, SampleEncoder};
use crate::models::{ClipTextEncoder, ClipTokenizer, PipelineDir, Vae};
use crate::pipeline::XlEncoder;
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

/// Captions as the UNet is conditioned on them.
pub struct TextEmbeds {
    /// (b, 77, cross_attention_dim).
    pub context: Tensor,
    /// (b, projection_dim): SDXL's pooled embedding; None for SD-1.x/2.x.
    pub pooled: Option<Tensor>,
}

/// What stands for "no caption": the unconditional input of the teacher's classifier-free
/// guidance in LCD, and what `data.caption_dropout` replaces a caption by (`data.dropped_caption`).
pub enum Unconditional {
    /// Zeros for the text embedding and the pooled embedding, as SDXL was trained (SGM's
    /// conditioner zeroes dropped conditioning) and diffusers' `train_lcm_distill_sdxl_wds.py`
    /// makes its unconditional embeddings.
    Zeros,
    /// The teacher's encoding of the empty prompt, (1, ...): SD-1.x/2.x's.
    Embeds(TextEmbeds),
}

impl Unconditional {
    pub fn shallow_clone(&self) -> Unconditional {
        match self {
            Unconditional::Zeros => Unconditional::Zeros,
            Unconditional::Embeds(e) => Unconditional::Embeds(TextEmbeds { context: e.context.shallow_clone(), pooled: e.pooled.as_ref().map(Tensor::shallow_clone) }),
        }
    }
}

pub struct TeacherEncoder {
    pub vae: Vae,
    pub text_encoder: ClipTextEncoder,
    pub tokenizer: ClipTokenizer,
    /// SDXL's second tokenizer and text encoder.
    pub xl: Option<XlEncoder>,
    device: Device,
    source: String,
}

impl TeacherEncoder {
    pub fn load(pipeline: &PipelineDir, device: Device, kind: Kind) -> Result<TeacherEncoder> {
        let mut vae = pipeline.load_vae(device, kind)?;
        vae.vs.freeze();
        let mut text_encoder = pipeline.load_text_encoder(device, kind)?;
        text_encoder.vs.freeze();
        let xl = match pipeline.is_xl() {
            true => {
                let mut text_encoder_2 = pipeline.load_text_encoder_2(device, kind)?;
                text_encoder_2.vs.freeze();
                let force_zeros_for_empty_prompt = pipeline.force_zeros_for_empty_prompt()?;
                Some(XlEncoder { tokenizer_2: pipeline.load_tokenizer_2()?, text_encoder_2, force_zeros_for_empty_prompt })
            }
            false => None,
        };
        Ok(TeacherEncoder { vae, text_encoder, tokenizer: pipeline.load_tokenizer()?, xl, device, source: pipeline.root().display().to_string() })
    }

    pub fn latent_scale(&self) -> LatentScale {
        let c = &self.vae.model.config;
        LatentScale { scale: c.scaling_factor, shift: c.shift_factor.unwrap_or(0.0) }
    }

    /// (b, 77, hidden): what the UNet cross-attends to (`encode_prompts`' context).
    pub fn encode_text<S: AsRef<str>>(&self, captions: &[S]) -> Tensor {
        self.encode_prompts(captions).context
    }

    /// SD: the text encoder's last hidden state. SDXL: both encoders' penultimate hidden states
    /// concatenated and text_encoder_2's `text_embeds`, as `StableDiffusionXLPipeline.encode_prompt`.
    pub fn encode_prompts<S: AsRef<str>>(&self, captions: &[S]) -> TextEmbeds {
        let ids = self.tokenizer.encode_batch(captions, self.device);
        tch::no_grad(|| {
            let Some(xl) = &self.xl else { return TextEmbeds { context: self.text_encoder.model.prompt_embeds(&ids, 0), pooled: None } };
            let (h1, _) = self.text_encoder.model.penultimate_and_pooled(&ids, 0);
            let ids2 = xl.tokenizer_2.encode_batch(captions, self.device);
            let (h2, pooled) = xl.text_encoder_2.model.penultimate_and_pooled(&ids2, 0);
            let h2 = h2.to_kind(h1.kind());
            TextEmbeds { context: Tensor::cat(&[h1, h2], -1), pooled: Some(pooled.expect("text_encoder_2 is loaded with its projection")) }
        })
    }

    /// The pipeline's parts for sampling with `unet` (validation grids).
    pub fn parts<'a>(&'a self, unet: &'a crate::models::UNet2DConditionModel, schedule: &'a std::sync::Arc<crate::schedulers::NoiseSchedule>) -> crate::pipeline::Parts<'a> {
        crate::pipeline::Parts {
            tokenizer: &self.tokenizer,
            text_encoder: &self.text_encoder.model,
            vae: &self.vae.model,
            unet,
            schedule,
            xl: self.xl.as_ref().map(|x| crate::pipeline::XlParts {
                tokenizer_2: &x.tokenizer_2,
                text_encoder_2: &x.text_encoder_2.model,
                force_zeros_for_empty_prompt: x.force_zeros_for_empty_prompt,
            }),
        }
    }
}

impl SampleEncoder for TeacherEncoder {
    fn encode(&self, images: &Tensor, captions: &[String]) -> Result<Encoded> {
        let kind = crate::models::weights::var_kind(&self.vae.vs);
        let posterior = tch::no_grad(|| self.vae.model.encode(&images.to_device(self.device).to_kind(kind)));
        let text = self.encode_prompts(captions);
        Ok(Encoded {
            latent_mean: posterior.mean.to_kind(Kind::Float),
            latent_std: posterior.std.to_kind(Kind::Float),
            text_embeddings: text.context.to_kind(Kind::Float),
            pooled_embeddings: text.pooled.map(|p| p.to_kind(Kind::Float)),
        })
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.latent_scale();
        json!({"teacher": self.source, "vae_scaling_factor": s.scale, "vae_shift_factor": s.shift})
    }
}
