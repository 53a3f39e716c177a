//! sdkd: distil Stable Diffusion UNets into BK-SDM / SD-Small / SD-Tiny students on LibTorch.
pub mod commands;
pub mod data;
pub mod models;
