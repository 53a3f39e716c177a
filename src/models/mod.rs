//! Model definitions with diffusers' and transformers' module names, so that weights map
//! one-to-one.
pub mod attention;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod unet;
pub mod unet_blocks;
pub mod unet_config;
pub mod weights;

pub use layers::Init;
pub use unet::{UNet, UNet2DConditionModel, UNetOutput};
pub use unet_config::UNetConfig;
