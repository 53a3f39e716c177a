//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`/`UpBlock2D`) and the resamplers. A plain block
//! is a cross-attention block without attentions, so one struct serves both kinds.
use super::attention::{Transformer2DModel, TransformerConfig};
use super::layers::{Builder, Conv2d};
use super::recompute::{Recompute, Region};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use std::collections::{BTreeMap, BTreeSet};
use tch::Tensor;

/// Inner features asked for by name (`down_blocks.2.attentions.0.proj_out`), and those found.
pub struct InnerTaps<'a> {
    pub wanted: &'a BTreeSet<String>,
    pub got: BTreeMap<String, Tensor>,
}

impl<'a> InnerTaps<'a> {
    pub fn new(wanted: &'a BTreeSet<String>) -> Self {
        InnerTaps { wanted, got: BTreeMap::new() }
    }

    /// Keeps `value` as feature `name` when it is wanted.
    fn offer(&mut self, name: &str, value: &Tensor) {
        if self.wanted.contains(name) {
            self.got.insert(name.to_string(), value.shallow_clone());
        }
    }
}

/// A spatial transformer that remembers its checkpoint name, so it can offer its inner features:
/// its output (`<name>`), its `proj_out` and each transformer block's self-attention
/// (`<name>.transformer_blocks.l.attn1`).
#[derive(Debug)]
struct NamedTransformer {
    name: String,
    depth: usize,
    model: Transformer2DModel,
}

impl NamedTransformer {
    fn new(b: Builder, channels: i64, cfg: &TransformerConfig) -> Self {
        NamedTransformer { name: b.name(), depth: cfg.depth as usize, model: Transformer2DModel::new(b, channels, cfg) }
    }

    fn attn1_name(&self, l: usize) -> String {
        format!("{}.transformer_blocks.{l}.attn1", self.name)
    }

    /// One `Region::Attention`: the hidden state, and the wanted taps among `proj_out` and the
    /// `attn1` outputs as further region outputs.
    fn forward<'a>(&'a self, x: &Tensor, context: &Tensor, taps: &mut InnerTaps, rc: &Recompute<'a>) -> Tensor {
        let proj_out = format!("{}.proj_out", self.name);
        let want_proj = taps.wanted.contains(&proj_out);
        let attn1: Vec<usize> = (0..self.depth).filter(|&l| taps.wanted.contains(&self.attn1_name(l))).collect();
        let want_attn1 = !attn1.is_empty();
        let picked = attn1.clone();
        let mut outs = rc.run(Region::Attention, &[x, context], move |xs, _| {
            let out = self.model.forward_taps(&xs[0], &xs[1], want_attn1);
            let mut v = vec![out.hidden];
            if want_proj {
                v.push(out.proj_out);
            }
            v.extend(picked.iter().map(|&l| out.attn1[l].shallow_clone()));
            v
        });
        for &l in attn1.iter().rev() {
            taps.got.insert(self.attn1_name(l), outs.pop().expect("the region returns attn1"));
        }
        if want_proj {
            taps.got.insert(proj_out, outs.pop().expect("the region returns proj_out"));
        }
        let hidden = outs.swap_remove(0);
        taps.offer(&self.name, &hidden);
        hidden
    }

    fn feature_names(&self) -> impl Iterator<Item = String> + '_ {
        [self.name.clone(), format!("{}.proj_out", self.name)].into_iter().chain((0..self.depth).map(|l| self.attn1_name(l)))
    }
}

/// A resnet as one `Region::Layer`; `skip` (an up block's) is concatenated inside the region, so
/// the concatenation is recomputed rather than stored. Its output is the tap `name`.
fn resnet_region<'a>(rc: &Recompute<'a>, resnet: &'a NamedResnet, x: &Tensor, skip: Option<&Tensor>, temb: &Tensor, taps: &mut InnerTaps) -> Tensor {
    let r = &resnet.model;
    let mut outs = match skip {
        Some(skip) => rc.run(Region::Layer, &[x, skip, temb], move |xs, _| vec![r.forward(&Tensor::cat(&[&xs[0], &xs[1]], 1), Some(&xs[2]))]),
        None => rc.run(Region::Layer, &[x, temb], move |xs, _| vec![r.forward(&xs[0], Some(&xs[1]))]),
    };
    let out = outs.swap_remove(0);
    taps.offer(&resnet.name, &out);
    out
}

/// A resnet with its checkpoint name (`down_blocks.1.resnets.0`), a feature KD tap.
#[derive(Debug)]
struct NamedResnet {
    name: String,
    model: ResnetBlock2D,
}

impl NamedResnet {
    fn new(b: Builder, in_ch: i64, out_ch: i64, cfg: &ResnetConfig) -> Self {
        NamedResnet { name: b.name(), model: ResnetBlock2D::new(b, in_ch, out_ch, cfg) }
    }
}

/// The names of the inner features a block's resnets and transformers can offer.
fn inner_names(resnets: &[NamedResnet], transformers: &[NamedTransformer]) -> Vec<String> {
    resnets.iter().map(|r| r.name.clone()).chain(transformers.iter().flat_map(NamedTransformer::feature_names)).collect()
}

#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: i64,
}

impl Downsample2D {
    pub fn new(b: Builder, channels: i64, padding: i64) -> Self {
        Downsample2D { conv: Conv2d::new(b.pp("conv"), channels, channels, 3, 2, padding), padding }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.padding == 0 {
            // diffusers pads right/bottom by one when the conv itself has no padding
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(b: Builder, channels: i64) -> Self {
        Upsample2D { conv: Conv2d::new(b.pp("conv"), channels, channels, 3, 1, 1) }
    }

    /// Nearest-neighbour ×2, or to `size` when the skip connection's size is odd.
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = x.size4().expect("upsample input must be (b, c, h, w)");
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d([oh, ow], None, None))
    }
}

/// Per-block settings shared by every stage of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockConfig {
    pub resnet: ResnetConfig,
    pub transformer: TransformerConfig,
}

impl BlockConfig {
    /// The spatial transformers of a block, one per layer, `depths[i]` transformer blocks deep.
    fn transformers(&self, b: &Builder, channels: i64, depths: &[i64]) -> Vec<NamedTransformer> {
        depths
            .iter()
            .enumerate()
            .map(|(i, &depth)| NamedTransformer::new(b.pp("attentions").pp(i), channels, &TransformerConfig { depth, ..self.transformer }))
            .collect()
    }
}

#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<NamedResnet>,
    attentions: Vec<NamedTransformer>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    // The arguments of diffusers' `DownBlock2D` / `CrossAttnDownBlock2D`, one for one;
    // `attention_depths` is `None` for a plain block, else each layer's transformer depth.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: Builder,
        in_ch: i64,
        out_ch: i64,
        layers: i64,
        attention_depths: Option<&[i64]>,
        add_downsample: bool,
        downsample_padding: i64,
        cfg: &BlockConfig,
    ) -> Self {
        let resnets = (0..layers)
            .map(|i| NamedResnet::new(b.pp("resnets").pp(i), if i == 0 { in_ch } else { out_ch }, out_ch, &cfg.resnet))
            .collect();
        let attentions = attention_depths.map_or(vec![], |d| cfg.transformers(&b, out_ch, d));
        let downsampler =
            add_downsample.then(|| Downsample2D::new(b.pp("downsamplers").pp(0), out_ch, downsample_padding));
        DownBlock { resnets, attentions, downsampler }
    }

    /// Returns the block's output and the skip states it hands to the up path (the output is
    /// the last of them). Each resnet, transformer and the downsampler is one region.
    pub fn forward<'a>(&'a self, x: &Tensor, temb: &Tensor, context: &Tensor, taps: &mut InnerTaps, rc: &Recompute<'a>) -> (Tensor, Vec<Tensor>) {
        let mut h = x.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet_region(rc, resnet, &h, None, temb, taps);
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, taps, rc);
            }
            skips.push(h.shallow_clone());
        }
        if let Some(down) = &self.downsampler {
            h = rc.run(Region::Layer, &[&h], move |xs, _| vec![down.forward(&xs[0])]).swap_remove(0);
            skips.push(h.shallow_clone());
        }
        (h, skips)
    }

    pub fn inner_feature_names(&self) -> Vec<String> {
        inner_names(&self.resnets, &self.attentions)
    }
}

#[derive(Debug)]
pub struct MidBlock {
    resnets: Vec<NamedResnet>,
    attentions: Vec<NamedTransformer>,
}

impl MidBlock {
    /// `UNetMidBlock2DCrossAttn` (resnet, transformer `attention_depth` deep, resnet), or with
    /// `None` diffusers' `UNetMidBlock2D` as `mid_block_type` builds it: one resnet.
    pub fn new(b: Builder, channels: i64, attention_depth: Option<i64>, cfg: &BlockConfig) -> Self {
        let resnets = if attention_depth.is_some() { 2 } else { 1 };
        MidBlock {
            resnets: (0..resnets).map(|i| NamedResnet::new(b.pp("resnets").pp(i), channels, channels, &cfg.resnet)).collect(),
            attentions: attention_depth.map_or(vec![], |d| cfg.transformers(&b, channels, &[d])),
        }
    }

    /// Each resnet and transformer is one region.
    pub fn forward<'a>(&'a self, x: &Tensor, temb: &Tensor, context: &Tensor, taps: &mut InnerTaps, rc: &Recompute<'a>) -> Tensor {
        let mut h = resnet_region(rc, &self.resnets[0], x, None, temb, taps);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context, taps, rc);
            h = resnet_region(rc, resnet, &h, None, temb, taps);
        }
        h
    }

    pub fn inner_feature_names(&self) -> Vec<String> {
        inner_names(&self.resnets, &self.attentions)
    }
}

#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<NamedResnet>,
    attentions: Vec<NamedTransformer>,
    upsampler: Option<Upsample2D>,
}

pub struct UpBlockChannels {
    /// Width of the matching down stage's input (the last skip's width).
    pub in_ch: i64,
    pub out_ch: i64,
    /// Width of what arrives from the stage below.
    pub prev_out_ch: i64,
}

impl UpBlock {
    /// `attention_depths` as for `DownBlock::new`.
    pub fn new(b: Builder, ch: &UpBlockChannels, layers: i64, attention_depths: Option<&[i64]>, add_upsample: bool, cfg: &BlockConfig) -> Self {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 { ch.in_ch } else { ch.out_ch };
                let input = if i == 0 { ch.prev_out_ch } else { ch.out_ch };
                NamedResnet::new(b.pp("resnets").pp(i), input + skip, ch.out_ch, &cfg.resnet)
            })
            .collect();
        let attentions = attention_depths.map_or(vec![], |d| cfg.transformers(&b, ch.out_ch, d));
        let upsampler = add_upsample.then(|| Upsample2D::new(b.pp("upsamplers").pp(0), ch.out_ch));
        UpBlock { resnets, attentions, upsampler }
    }

    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `skips` are this block's skip states in the order the down path made them; they are
    /// consumed last first. Each resnet (with its skip concatenation), transformer and the
    /// upsampler is one region.
    #[allow(clippy::too_many_arguments)]
    pub fn forward<'a>(
        &'a self,
        x: &Tensor,
        skips: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(i64, i64)>,
        taps: &mut InnerTaps,
        rc: &Recompute<'a>,
    ) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, (resnet, skip)) in self.resnets.iter().zip(skips.iter().rev()).enumerate() {
            h = resnet_region(rc, resnet, &h, Some(skip), temb, taps);
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, taps, rc);
            }
        }
        match &self.upsampler {
            // the ×2 input of its conv is the largest tensor of the block: recomputed, not stored
            Some(up) => rc.run(Region::Layer, &[&h], move |xs, _| vec![up.forward(&xs[0], upsample_size)]).swap_remove(0),
            None => h,
        }
    }

    pub fn inner_feature_names(&self) -> Vec<String> {
        inner_names(&self.resnets, &self.attentions)
    }
}
