//! sdkd: distil Stable Diffusion UNets into BK-SDM / SD-Small / SD-Tiny students on LibTorch.
pub mod aten_extra;
pub mod commands;
pub mod config;
pub mod data;
pub mod demo;
pub mod distill;
pub mod export;
pub mod fs_safe;
pub mod grid;
pub mod json_config;
pub mod memory;
pub mod models;
pub mod pipeline;
pub mod png_meta;
pub mod serve;
pub mod schedulers;
pub mod torch_pickle;
