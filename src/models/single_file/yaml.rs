//! The sidecar LDM `.yaml`: read for what the weights cannot say (heads, v-prediction, the VAE
//! scale), written beside exported files.
use super::super::unet_config::{DownBlockKind, UNetConfig};
use super::SingleFile;
use std::path::{Path, PathBuf};

/// `<stem>.yaml` (or `.yml`) beside `path`.
pub(super) fn sidecar(path: &Path) -> Option<PathBuf> {
    ["yaml", "yml"].iter().map(|e| path.with_extension(e)).find(|p| p.is_file())
}

fn yaml_get<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a serde_yaml::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

impl SingleFile {
    /// An integer of the sidecar's `model.params.unet_config.params` (LDM) or
    /// `model.params.network_config.params` (SGM, SDXL's configs).
    pub(super) fn unet_param(&self, key: &str) -> Option<i64> {
        let (_, v) = self.yaml.as_ref()?;
        ["unet_config", "network_config"]
            .iter()
            .find_map(|section| yaml_get(v, &["model", "params", section, "params", key]))
            .and_then(serde_yaml::Value::as_i64)
    }

    pub(super) fn model_param(&self, key: &str) -> Option<&serde_yaml::Value> {
        self.yaml.as_ref().and_then(|(_, v)| yaml_get(v, &["model", "params", key]))
    }
}

/// The student's LDM UNet config (`model.params.unet_config` of an LDM `.yaml`), for tools that
/// take an original config: per-level `num_res_blocks`, `transformer_depth`, whether a middle
/// block exists, and the heads and prediction type the weights cannot carry.
pub fn ldm_yaml(c: &UNetConfig, v_prediction: bool, scale_factor: f64) -> String {
    let c0 = c.block_out_channels[0];
    let mult: Vec<String> = c.block_out_channels.iter().map(|ch| (ch / c0).to_string()).collect();
    let res: Vec<String> = c.layers_per_block.iter().map(i64::to_string).collect();
    let attn: Vec<String> = c
        .down_block_types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == DownBlockKind::CrossAttn)
        .map(|(i, _)| (1i64 << i).to_string())
        .collect();
    let depth: Vec<String> = c
        .down_block_types
        .iter()
        .enumerate()
        .map(|(i, t)| if *t == DownBlockKind::CrossAttn { c.down_depth(i, 0) } else { 0 }.to_string())
        .collect();
    let heads_line = if c.num_heads.iter().all(|&h| h == c.num_heads[0]) {
        format!("        num_heads: {}\n", c.num_heads[0])
    } else {
        let per: Vec<i64> = c.block_out_channels.iter().zip(&c.num_heads).map(|(ch, h)| ch / h).collect();
        format!("        num_head_channels: {}\n", per[0])
    };
    format!(
        "# The LDM config of this checkpoint's UNet, written by sdkd.\nmodel:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n{}    linear_start: 0.00085\n    linear_end: 0.012\n    timesteps: 1000\n    scale_factor: {scale_factor}\n    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n      params:\n        image_size: {}\n        in_channels: {}\n        out_channels: {}\n        model_channels: {c0}\n        attention_resolutions: [{}]\n        num_res_blocks: [{}]\n        channel_mult: [{}]\n{heads_line}        use_spatial_transformer: true\n        transformer_depth: [{}]\n        context_dim: {}\n        use_linear_in_transformer: {}\n        legacy: false\n# Outside model: (the LDM code's UNetModel takes no such argument): whether the UNet has a\n# middle_block (BK-SDM-Small/Tiny have none; the original LDM code always builds one).\nsdkd:\n  middle_block: {}\n",
        if v_prediction { "    parameterization: \"v\"\n" } else { "" },
        c.sample_size.unwrap_or(64),
        c.in_channels,
        c.out_channels,
        attn.join(", "),
        res.join(", "),
        mult.join(", "),
        depth.join(", "),
        c.cross_attention_dim,
        c.use_linear_projection,
        c.mid_block.is_some(),
    )
}
