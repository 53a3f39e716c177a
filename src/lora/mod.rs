//! LoRA: the `lora:` training section (`config`).
pub mod config;
