//! diffusers' `ResnetBlock2D` (the "default" time-embedding norm), used by the UNet and the VAE.
use super::layers::{Builder, Conv2d, GroupNorm, Linear};
use tch::Tensor;

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: i64,
    pub eps: f64,
    /// Width of the time embedding; `None` for the VAE's resnets, which have no `time_emb_proj`.
    pub temb_channels: Option<i64>,
    pub output_scale_factor: f64,
}

#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(b: Builder, in_ch: i64, out_ch: i64, cfg: &ResnetConfig) -> Self {
        ResnetBlock2D {
            norm1: GroupNorm::new(b.pp("norm1"), cfg.groups, in_ch, cfg.eps),
            conv1: Conv2d::new(b.pp("conv1"), in_ch, out_ch, 3, 1, 1),
            time_emb_proj: cfg.temb_channels.map(|t| Linear::new(b.pp("time_emb_proj"), t, out_ch, true)),
            norm2: GroupNorm::new(b.pp("norm2"), cfg.groups, out_ch, cfg.eps),
            conv2: Conv2d::new(b.pp("conv2"), out_ch, out_ch, 3, 1, 1),
            conv_shortcut: (in_ch != out_ch).then(|| Conv2d::new(b.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)),
            output_scale_factor: cfg.output_scale_factor,
        }
    }

    /// `x`: (b, c_in, h, w); `temb`: (b, temb_channels), (r, temb_channels) tiled b / r times
    /// over the batch (`UNet2DConditionModel::predict_stacked`), or None.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu());
            let (batch, rows) = (x.size()[0], t.size()[0]);
            let t = if rows == batch { t } else { t.repeat([batch / rows, 1]) };
            h += t.unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}
