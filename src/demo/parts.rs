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
use crate::models::clip::{Activation, ClipTextConfig};
use crate::models::unet_config::{DownBlockKind, MidBlockKind, UNetConfig, UpBlockKind};
use crate::models::VaeConfig;
use serde_json::{json, Value};

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
    v["projection_dim"] = json!(c.hidden_size);
    v["attention_dropout"] = json!(0.0);
    v["initializer_factor"] = json!(1.0);
    v["initializer_range"] = json!(0.02);
    v
}

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

/// The teacher UNet: SD-1.x's layout (CrossAttnDownBlock2D ×3 + DownBlock2D, mid block,
/// UpBlock2D + CrossAttnUpBlock2D ×3, 2 layers per block) with channels [32, 64, 64, 64],
/// 2 heads per stage and 8 norm groups, over `latent_size`² latents.
pub fn unet_config(latent_size: i64) -> UNetConfig {
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

/// `model_index.json` of a `StableDiffusionPipeline` without safety checker.
pub fn model_index_json() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::config::SchedulerConfig;

    #[test]
    fn configs_validate_and_round_trip() {
        let u = unet_config(16);
        u.validate().unwrap();
        assert_eq!(UNetConfig::from_json(&u.to_json()).unwrap(), u);
        let v = vae_config(DEMO_RESOLUTION);
        v.validate().unwrap();
        assert_eq!(VaeConfig::from_json(&v.to_json()).unwrap(), v);
        assert_eq!(v.downscale_factor(), 2);
        let t = text_encoder_config(600, 599);
        assert_eq!(ClipTextConfig::from_json(&text_encoder_json(&t, 598, 599)).unwrap(), t);
        SchedulerConfig::from_json(&scheduler_json()).unwrap();
    }
}
