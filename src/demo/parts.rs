//! The configs of the demo teacher's parts, sized so that the whole job (teacher from scratch,
//! distillation, a control run, generation) fits in minutes on two CPU cores:
//!
//! - images of 32² pixels (the synthetic scenes' shapes are 3-5 px across, positions are
//!   quadrants: both still read at this size);
//! - a VAE with two levels of 16 channels (downscale 2): 16×16×4 latents, 3072 -> 1024 numbers
//!   per image (SD compresses 48×; flat-colour scenes at 32 px leave little to spare);
//! - a CLIP text encoder of 2 layers, 64 wide, frozen with seeded random weights;
//! - an SD-1.x-shaped UNet (3 cross-attention stages + 1 plain, 2 layers per block, mid block),
//!   so the `bk_base` / `bk_small` / `bk_tiny` presets apply, 32-64 channels wide;
//! - the SD-1.5 DDPM noise schedule.
//!
//! `--family sdxl` makes an SDXL pipeline instead: a second text encoder with a projection (the
//! pooled embedding), and an SDXL-shaped UNet (`text_time` conditioning on the six time ids, a
//! plain stage then two cross-attention stages) that the SDXL student presets apply to.
use crate::models::clip::{Activation, ClipTextConfig};
use crate::models::unet_config::{Depth, DownBlockKind, MidBlockKind, TextTimeEmbed, UNetConfig, UpBlockKind, TIME_IDS};
use crate::models::{PipelineClass, VaeConfig};
use anyhow::bail;
use serde_json::{json, Value};

/// Which Stable Diffusion the demo builds, trains and distils (`sdkd demo --family`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DemoFamily {
    /// SD-1.x: one text encoder, a 4-stage UNet, a BK-SDM `bk_small` student.
    #[default]
    Sd,
    /// SDXL: two text encoders and the pooled embedding, SDXL's UNet layout with its micro-
    /// conditioning, a Segmind-Vega-shaped `vega` student.
    Sdxl,
}

impl DemoFamily {
    pub fn name(self) -> &'static str {
        match self {
            DemoFamily::Sd => "sd",
            DemoFamily::Sdxl => "sdxl",
        }
    }

    /// The student preset the demo distils.
    pub fn student(self) -> &'static str {
        match self {
            DemoFamily::Sd => "bk_small",
            DemoFamily::Sdxl => "vega",
        }
    }
}

impl std::str::FromStr for DemoFamily {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<DemoFamily> {
        match s {
            "sd" => Ok(DemoFamily::Sd),
            "sdxl" => Ok(DemoFamily::Sdxl),
            other => bail!("--family {other:?}: unknown model family; the demo builds `sd` (SD-1.x) or `sdxl`"),
        }
    }
}

/// Side of the demo's images, in pixels.
pub const DEMO_RESOLUTION: u32 = 32;
/// Width of the text encoder, and so the UNet's `cross_attention_dim`.
pub const TEXT_HIDDEN: i64 = 64;

/// The frozen text encoder: `CLIPTextModel` with 2 layers of width 64 (2 heads, MLP 128,
/// quick_gelu as SD-1.x), over the demo tokenizer's vocabulary. `build_demo_teacher` gives it
/// PyTorch's default init, whose N(0, 1) token and position embeddings dominate the residual
/// stream: each position's output is mostly its own word plus a little context, so the caption
/// words reach the UNet as distinct, nearly orthogonal vectors at fixed slots (at a changed word,
/// cosine about 0.5, the shared position embedding), which a UNet learns from quickly. The pad
/// positions, and so the pooled output, change little between captions.
pub fn text_encoder_config(vocab_size: i64, eos_token_id: i64) -> ClipTextConfig {
    ClipTextConfig {
        vocab_size,
        hidden_size: TEXT_HIDDEN,
        intermediate_size: 2 * TEXT_HIDDEN,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 77,
        hidden_act: Activation::QuickGelu,
        layer_norm_eps: 1e-5,
        eos_token_id,
        // transformers writes the (unused) projection width of a CLIPTextModel as its width
        projection_dim: TEXT_HIDDEN,
        ..ClipTextConfig::default()
    }
}

/// `text_encoder/config.json`: the config plus the token ids transformers keeps in it.
pub fn text_encoder_json(c: &ClipTextConfig, bos_token_id: i64, pad_token_id: i64) -> Value {
    let mut v = c.to_json();
    v["bos_token_id"] = json!(bos_token_id);
    v["pad_token_id"] = json!(pad_token_id);
    if !c.with_projection {
        v["projection_dim"] = json!(c.hidden_size);
    }
    v["attention_dropout"] = json!(0.0);
    v["initializer_factor"] = json!(1.0);
    v["initializer_range"] = json!(0.02);
    v
}

/// SDXL's `text_encoder_2`: `CLIPTextModelWithProjection`, as wide as the first encoder (gelu,
/// as OpenCLIP's tower), its `text_embeds` of width `POOLED` the pooled embedding.
pub fn text_encoder_2_config(vocab_size: i64, eos_token_id: i64) -> ClipTextConfig {
    ClipTextConfig { hidden_act: Activation::Gelu, projection_dim: POOLED, with_projection: true, ..text_encoder_config(vocab_size, eos_token_id) }
}

/// Width of SDXL's pooled embedding (`text_encoder_2`'s projection).
pub const POOLED: i64 = 32;

/// The VAE: `AutoencoderKL` with blocks [16, 16] (downscale 2), one resnet per encoder block,
/// 4 latent channels, 8 norm groups. Wider blocks reconstruct no better in the same number of
/// steps and cost more per step. `scaling_factor` is set after training (1/std of the
/// latents, as SD's 0.18215 was).
pub fn vae_config(resolution: u32) -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![16, 16],
        layers_per_block: 1,
        latent_channels: 4,
        norm_num_groups: 8,
        sample_size: Some(resolution as i64),
        scaling_factor: 1.0,
        force_upcast: false,
        ..VaeConfig::default()
    }
}

/// The teacher UNet of `family`, over `latent_size`² latents.
pub fn unet_config(family: DemoFamily, latent_size: i64) -> UNetConfig {
    match family {
        DemoFamily::Sd => sd_unet_config(latent_size),
        DemoFamily::Sdxl => sdxl_unet_config(latent_size),
    }
}

/// SD-1.x's layout (CrossAttnDownBlock2D ×3 + DownBlock2D, mid block, UpBlock2D +
/// CrossAttnUpBlock2D ×3, 2 layers per block) with channels [32, 64, 64, 64], 2 heads per stage
/// and 8 norm groups.
fn sd_unet_config(latent_size: i64) -> UNetConfig {
    let mut c = UNetConfig::default();
    c.sample_size = Some(latent_size);
    c.block_out_channels = vec![32, 64, 64, 64];
    c.layers_per_block = vec![2; 4];
    c.down_block_types = vec![DownBlockKind::CrossAttn, DownBlockKind::CrossAttn, DownBlockKind::CrossAttn, DownBlockKind::Plain];
    c.up_block_types = vec![UpBlockKind::Plain, UpBlockKind::CrossAttn, UpBlockKind::CrossAttn, UpBlockKind::CrossAttn];
    c.mid_block = Some(MidBlockKind::CrossAttn);
    c.num_heads = vec![2; 4];
    c.norm_num_groups = 8;
    c.cross_attention_dim = TEXT_HIDDEN;
    c
}

/// SDXL's layout (DownBlock2D, CrossAttnDownBlock2D ×2, a cross-attention mid block, mirrored up
/// blocks, 2 resnets per down stage, linear projections, `text_time` added conditioning) with
/// channels [32, 64, 64], 2 heads and 8 norm groups. Transformer depths 2 and 4 (SDXL's are 2 and
/// 10, the mid block as deep as the last stage): deep enough that `vega` (depths 1 and 2, the
/// mid block one resnet) drops half of every attention's layers. The context is both encoders'
/// states concatenated (128 wide).
fn sdxl_unet_config(latent_size: i64) -> UNetConfig {
    let mut c = UNetConfig::default();
    c.sample_size = Some(latent_size);
    c.block_out_channels = vec![32, 64, 64];
    c.layers_per_block = vec![2; 3];
    c.down_block_types = vec![DownBlockKind::Plain, DownBlockKind::CrossAttn, DownBlockKind::CrossAttn];
    c.up_block_types = vec![UpBlockKind::CrossAttn, UpBlockKind::CrossAttn, UpBlockKind::Plain];
    c.mid_block = Some(MidBlockKind::CrossAttn);
    c.num_heads = vec![2; 3];
    c.norm_num_groups = 8;
    c.cross_attention_dim = 2 * TEXT_HIDDEN;
    c.use_linear_projection = true;
    c.transformer_layers_per_block = vec![Depth::Uniform(1), Depth::Uniform(2), Depth::Uniform(4)];
    c.addition_embed = Some(TextTimeEmbed { time_embed_dim: 8, input_dim: POOLED + TIME_IDS * 8 });
    c
}

/// `scheduler/scheduler_config.json`: diffusers' `DDPMScheduler` with SD-1.5's noise schedule
/// (scaled_linear 0.00085 -> 0.012, 1000 steps) and v-prediction, as SD 2.x. The choice is
/// measured: an epsilon teacher trained as long ignores its captions (background 36%, chance
/// 31%), because epsilon's loss weights an error in the image by sqrt(ᾱ/(1-ᾱ)), about 0.1 at the
/// high noise levels where sampling fixes the background, so the caption barely moves its loss
/// there; v's target is nearly the image itself at those levels, and the same teacher reads the
/// background from the caption (97% unguided, 100% at guidance 4).
pub fn scheduler_json() -> Value {
    json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": "0.42.1",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": null,
        "variance_type": "fixed_small"
    })
}

/// `model_index.json`'s pipeline class: an SDXL demo pipeline gives zeros for an empty prompt,
/// as SDXL was trained.
pub fn pipeline_class(family: DemoFamily) -> PipelineClass {
    match family {
        DemoFamily::Sd => PipelineClass::StableDiffusion,
        DemoFamily::Sdxl => PipelineClass::StableDiffusionXl { force_zeros_for_empty_prompt: true },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::config::SchedulerConfig;

    #[test]
    fn configs_validate_and_round_trip() {
        for family in [DemoFamily::Sd, DemoFamily::Sdxl] {
            let u = unet_config(family, 16);
            u.validate().unwrap();
            assert_eq!(UNetConfig::from_json(&u.to_json()).unwrap(), u);
        }
        assert!(crate::distill::student::is_sdxl(&unet_config(DemoFamily::Sdxl, 16)));
        let v = vae_config(DEMO_RESOLUTION);
        v.validate().unwrap();
        assert_eq!(VaeConfig::from_json(&v.to_json()).unwrap(), v);
        assert_eq!(v.downscale_factor(), 2);
        let t = text_encoder_config(600, 599);
        assert_eq!(ClipTextConfig::from_json(&text_encoder_json(&t, 598, 599)).unwrap(), t);
        let t2 = text_encoder_2_config(600, 599);
        assert_eq!(ClipTextConfig::from_json(&text_encoder_json(&t2, 598, 599)).unwrap(), t2);
        SchedulerConfig::from_json(&scheduler_json()).unwrap();
    }
}
