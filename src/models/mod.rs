//! Model definitions with diffusers' and transformers' module names, so that weights map
//! one-to-one.
pub mod adapter;
pub mod attention;
pub mod clip;
pub mod clip_tokenizer;
pub mod embeddings;
pub mod layers;
pub mod open_clip;
pub mod pipeline_dir;
pub mod recompute;
pub mod single_file;
pub mod resnet;
pub mod unet;
pub mod unet_blocks;
pub mod unet_config;
pub mod vae;
pub mod weights;

pub use clip::{ClipTextConfig, ClipTextEncoder, ClipTextModel, ClipTextOutput};
pub use clip_tokenizer::ClipTokenizer;
pub use layers::Init;
pub use pipeline_dir::{Part, PipelineClass, PipelineDir};
pub use recompute::{Checkpointing, Recompute};
pub use unet::{UNet, UNet2DConditionModel, UNetOutput};
pub use unet_config::UNetConfig;
pub use vae::{AutoencoderKL, DiagonalGaussian, Vae, VaeConfig};
