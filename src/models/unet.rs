//! diffusers' `UNet2DConditionModel`, returning the block features as values (tch has no hooks).
use super::adapter::{AdapterSites, AdapterSpec};
use super::attention::TransformerConfig;
use super::embeddings::{timestep_embedding, TimestepEmbedding};
use super::layers::{count_params, Builder, Conv2d, GroupNorm, Init};
use super::recompute::{Recompute, Region};
use super::resnet::ResnetConfig;
use super::unet_blocks::{BlockConfig, DownBlock, InnerTaps, MidBlock, UpBlock, UpBlockChannels};
use super::unet_config::{DownBlockKind, MidBlockKind, UNetConfig, UpBlockKind, TIME_IDS};
use super::weights;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// What one forward pass computes: the prediction and every block's output.
pub struct UNetOutput {
    pub sample: Tensor,
    /// `down_blocks.i` outputs: the hidden state after the block (and its downsampler), not the
    /// tuple of skip states.
    pub down: Vec<Tensor>,
    pub mid: Option<Tensor>,
    pub up: Vec<Tensor>,
    /// Inner features that were asked for, by name (`down_blocks.2.attentions.0.proj_out`).
    pub inner: BTreeMap<String, Tensor>,
}

impl UNetOutput {
    /// A feature by its diffusers module name: `down_blocks.i`, `mid_block`, `up_blocks.i`, or an
    /// inner name that was asked for.
    pub fn feature(&self, name: &str) -> Option<&Tensor> {
        if name == "mid_block" {
            return self.mid.as_ref();
        }
        let index = |prefix: &str| name.strip_prefix(prefix).and_then(|i| i.parse::<usize>().ok());
        if let Some(i) = index("down_blocks.") {
            return self.down.get(i);
        }
        if let Some(i) = index("up_blocks.") {
            return self.up.get(i);
        }
        self.inner.get(name)
    }
}

/// What conditions a UNet besides the sample, the timestep and the text context: diffusers'
/// `added_cond_kwargs` (`text_embeds`, `time_ids`) and `timestep_cond`. Empty for SD-1.x/2.x.
#[derive(Default)]
pub struct AddedCond {
    /// `text_time` UNets (SDXL): the pooled text embedding, (b, pooled width).
    pub text_embeds: Option<Tensor>,
    /// `text_time` UNets: (b, 6) original size (h, w), crop top-left (y, x), target size (h, w).
    pub time_ids: Option<Tensor>,
    /// `time_cond_proj_dim` UNets: (b, time_cond_proj_dim), added to the timestep features.
    pub timestep_cond: Option<Tensor>,
}

/// diffusers' `add_time_proj` + `add_embedding` of `addition_embed_type: "text_time"`.
#[derive(Debug)]
struct TextTimeEmbedding {
    time_embed_dim: i64,
    add_embedding: TimestepEmbedding,
}

impl TextTimeEmbedding {
    /// (b, pooled) and (b, 6) -> (b, time_embed_dim): the time ids' sinusoidal features (fp32)
    /// concatenated after the pooled embedding, in the embedding's dtype.
    fn forward(&self, c: &UNetConfig, text_embeds: &Tensor, time_ids: &Tensor, kind: Kind) -> Tensor {
        let b = text_embeds.size()[0];
        let time = timestep_embedding(&time_ids.flatten(0, -1), self.time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            .reshape([b, -1]);
        let add = Tensor::cat(&[text_embeds.to_kind(Kind::Float), time], -1).to_kind(kind);
        self.add_embedding.forward(&add, None)
    }
}

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(b: Builder, config: &UNetConfig) -> Self {
        let c = config;
        let n = c.num_stages();
        let ch = &c.block_out_channels;
        let block_cfg = |stage: usize, output_scale_factor: f64| BlockConfig {
            resnet: ResnetConfig {
                groups: c.norm_num_groups,
                eps: c.norm_eps,
                temb_channels: Some(c.time_embed_dim()),
                output_scale_factor,
            },
            transformer: TransformerConfig {
                heads: c.num_heads[stage],
                context_dim: c.cross_attention_dim,
                groups: c.norm_num_groups,
                use_linear_projection: c.use_linear_projection,
                upcast_attention: c.upcast_attention,
                depth: 1,
            },
        };
        let down_blocks = (0..n)
            .map(|i| {
                DownBlock::new(
                    b.pp("down_blocks").pp(i),
                    if i == 0 { ch[0] } else { ch[i - 1] },
                    ch[i],
                    c.layers_per_block[i],
                    (c.down_block_types[i] == DownBlockKind::CrossAttn)
                        .then(|| (0..c.layers_per_block[i] as usize).map(|l| c.down_depth(i, l)).collect::<Vec<_>>())
                        .as_deref(),
                    i + 1 < n,
                    c.downsample_padding,
                    &block_cfg(i, 1.0),
                )
            })
            .collect();
        let mid_block = c.mid_block.map(|kind| {
            let depth = (kind == MidBlockKind::CrossAttn).then(|| c.mid_depth());
            MidBlock::new(b.pp("mid_block"), ch[n - 1], depth, &block_cfg(n - 1, c.mid_block_scale_factor))
        });
        let up_blocks = (0..n)
            .map(|i| {
                let stage = n - 1 - i; // the down stage this up block mirrors
                let channels = UpBlockChannels {
                    in_ch: ch[stage.saturating_sub(1)],
                    out_ch: ch[stage],
                    prev_out_ch: ch[(stage + 1).min(n - 1)],
                };
                UpBlock::new(
                    b.pp("up_blocks").pp(i),
                    &channels,
                    c.layers_per_block[stage] + 1,
                    (c.up_block_types[i] == UpBlockKind::CrossAttn)
                        .then(|| (0..=c.layers_per_block[stage] as usize).map(|l| c.up_depth(i, l)).collect::<Vec<_>>())
                        .as_deref(),
                    i + 1 < n,
                    &block_cfg(stage, 1.0),
                )
            })
            .collect();
        UNet2DConditionModel {
            config: c.clone(),
            conv_in: Conv2d::new(b.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1),
            time_embedding: TimestepEmbedding::new(b.pp("time_embedding"), ch[0], c.time_embed_dim(), c.time_cond_proj_dim),
            add_embedding: c.addition_embed.map(|e| TextTimeEmbedding {
                time_embed_dim: e.time_embed_dim,
                add_embedding: TimestepEmbedding::new(b.pp("add_embedding"), e.input_dim, c.time_embed_dim(), None),
            }),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(b.pp("conv_norm_out"), c.norm_num_groups, ch[0], c.norm_eps),
            conv_out: Conv2d::new(b.pp("conv_out"), ch[0], c.out_channels, 3, 1, 1),
        }
    }

    /// `sample`: (b, c, h, w); `timesteps`: (b,) or a scalar; `context`: (b, m, cross_attention_dim).
    /// For a UNet that needs `AddedCond` (SDXL's `text_time`), use `forward_cond`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, inner: &BTreeSet<String>) -> UNetOutput {
        self.forward_with(sample, timesteps, context, inner, &Recompute::off())
    }

    /// `forward` with the added conditioning (pooled text embedding and time ids, the guidance
    /// embedding's condition).
    pub fn forward_cond(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, added: &AddedCond, inner: &BTreeSet<String>) -> UNetOutput {
        self.forward_inner(sample, timesteps, context, added, inner, None, &Recompute::off())
    }

    /// `forward_cond` with the regions `rc` checkpoints recomputed in backward (`rc` must outlive
    /// the backward).
    pub fn forward_cond_with<'a>(
        &'a self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: &AddedCond,
        inner: &'a BTreeSet<String>,
        rc: &Recompute<'a>,
    ) -> UNetOutput {
        self.forward_inner(sample, timesteps, context, added, inner, None, rc)
    }

    /// Whether this UNet needs `AddedCond::text_embeds` and `time_ids` (`addition_embed_type: "text_time"`).
    pub fn needs_text_time(&self) -> bool {
        self.add_embedding.is_some()
    }

    /// Whether any `AddedCond` input conditions this UNet's time path (SDXL's `text_time`, a
    /// `time_cond_proj_dim` guidance embedding).
    pub fn needs_added_cond(&self) -> bool {
        self.needs_text_time() || self.config.time_cond_proj_dim.is_some()
    }

    /// `forward` with the blocks or transformers that `rc` checkpoints recomputed in backward
    /// (`rc` must outlive the backward).
    pub fn forward_with<'a>(
        &'a self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        inner: &'a BTreeSet<String>,
        rc: &Recompute<'a>,
    ) -> UNetOutput {
        self.forward_cond_with(sample, timesteps, context, &AddedCond::default(), inner, rc)
    }

    /// `forward_with`; with `time_rows` r (a scalar `timesteps`), the time embedding is computed
    /// for r rows and every resnet's time projection on those r rows, tiled over the batch (b / r
    /// times). `added` must then have r rows too (one request's).
    #[allow(clippy::too_many_arguments)]
    fn forward_inner<'a>(
        &'a self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: &AddedCond,
        inner: &'a BTreeSet<String>,
        time_rows: Option<i64>,
        rc: &Recompute<'a>,
    ) -> UNetOutput {
        let c = &self.config;
        let (batch, _, height, width) = sample.size4().expect("UNet sample must be (b, c, h, w)");
        let mut taps = InnerTaps::new(inner);
        let sample = if c.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let timesteps = match time_rows {
            Some(rows) => {
                assert!(timesteps.dim() == 0 && rows > 0 && batch % rows == 0, "time_rows {rows} must divide the batch {batch}, with one timestep");
                timesteps.expand([rows], true)
            }
            None if timesteps.dim() == 0 => timesteps.expand([batch], true),
            None => timesteps.shallow_clone(),
        };
        let t_emb = timestep_embedding(&timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
            .to_kind(sample.kind());
        let mut temb = self.time_embedding.forward(&t_emb, added.timestep_cond.as_ref()); // (b, 4·c0)
        if let Some(add) = &self.add_embedding {
            let (Some(text_embeds), Some(time_ids)) = (&added.text_embeds, &added.time_ids) else {
                panic!("a text_time UNet needs AddedCond::text_embeds and time_ids (check needs_text_time before calling)")
            };
            assert_eq!(time_ids.size()[1..], [TIME_IDS], "time_ids must be (b, {TIME_IDS})");
            temb = temb + add.forward(c, text_embeds, time_ids, sample.kind());
        }

        let mut h = self.conv_in.forward(&sample);
        let mut skips = vec![h.shallow_clone()];
        let mut down = Vec::with_capacity(self.down_blocks.len());
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &temb, context, &mut taps, rc);
            skips.extend(block_skips);
            down.push(out.shallow_clone());
            h = out;
        }
        let mid = self.mid_block.as_ref().map(|m| {
            h = m.forward(&h, &temb, context, &mut taps, rc);
            h.shallow_clone()
        });
        // When the input is not a multiple of the total downscale, each upsampler goes to the
        // size of the skip it meets next instead of ×2.
        let factor = 1i64 << (self.up_blocks.len().saturating_sub(1));
        let odd_size = height % factor != 0 || width % factor != 0;
        let mut up = Vec::with_capacity(self.up_blocks.len());
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.num_resnets());
            let upsample_size = (odd_size && i + 1 < self.up_blocks.len()).then(|| {
                let s = skips.last().expect("skip states run out before the last up block").size();
                (s[2], s[3])
            });
            h = block.forward(&h, &block_skips, &temb, context, upsample_size, &mut taps, rc);
            up.push(h.shallow_clone());
        }
        // the output head: two more full-resolution tensors, recomputed under `blocks`
        let head = |xs: &[Tensor], _: &Recompute<'a>| vec![self.conv_out.forward(&self.conv_norm_out.forward(&xs[0]).silu())];
        let sample = rc.run(Region::Layer, &[&h], head).swap_remove(0);
        UNetOutput { sample, down, mid, up, inner: taps.got }
    }

    /// Device of the parameters (callers move inputs there).
    pub fn device(&self) -> Device {
        self.conv_in.weight.device()
    }

    /// dtype of the parameters.
    pub fn kind(&self) -> Kind {
        self.conv_in.weight.kind()
    }

    /// The prediction alone (inference).
    pub fn predict(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Tensor {
        self.forward(sample, timesteps, context, &BTreeSet::new()).sample
    }

    /// `predict` with the added conditioning.
    pub fn predict_cond(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor, added: &AddedCond) -> Tensor {
        self.forward_cond(sample, timesteps, context, added, &BTreeSet::new()).sample
    }

    /// `predict` for several requests stacked request after request, `rows_per_request` rows
    /// each, at one shared scalar `timestep`; each request's rows equal its own `predict` on the
    /// CPU. LibTorch's CPU GEMM rounds a row differently with the number of rows around it when
    /// there are few (one request's 1 to 3 rows give other values than the same rows among 8), so
    /// the time embedding and each resnet's time projection run on one request's rows and are
    /// tiled over the batch. The wider layers (attention, convolutions) see at least 12 rows per
    /// request at every size `Parts::batches_exactly` lets through, and keep each row's values.
    /// `added` holds one request's rows (`rows_per_request`): the conditioning is shared by the
    /// batch (`Parts::batches_exactly` keeps other SDXL requests apart).
    pub fn predict_stacked(&self, sample: &Tensor, timestep: &Tensor, context: &Tensor, added: &AddedCond, rows_per_request: i64) -> Tensor {
        self.forward_inner(sample, timestep, context, added, &BTreeSet::new(), Some(rows_per_request), &Recompute::off()).sample
    }

    /// Every inner feature name this model can return.
    pub fn inner_feature_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.down_blocks.iter().flat_map(DownBlock::inner_feature_names).collect();
        names.extend(self.mid_block.iter().flat_map(MidBlock::inner_feature_names));
        names.extend(self.up_blocks.iter().flat_map(UpBlock::inner_feature_names));
        names
    }

    /// Every feature name `UNetOutput::feature` can resolve for this model.
    pub fn feature_names(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..self.down_blocks.len()).map(|i| format!("down_blocks.{i}")).collect();
        if self.mid_block.is_some() {
            names.push("mid_block".into());
        }
        names.extend((0..self.up_blocks.len()).map(|i| format!("up_blocks.{i}")));
        names.extend(self.inner_feature_names());
        names
    }
}

/// A UNet with the var store that owns its parameters.
pub struct UNet {
    pub vs: nn::VarStore,
    pub model: UNet2DConditionModel,
    /// The LoRA adapters' own var store (`build_with_adapters`), apart from the base's.
    pub adapters: Option<nn::VarStore>,
}

impl UNet {
    /// A UNet from a config, its parameters filled per `init` with dtype `kind`.
    pub fn build(config: &UNetConfig, device: Device, kind: Kind, init: Init) -> UNet {
        let vs = nn::VarStore::new(device);
        let model = UNet2DConditionModel::new(Builder::new(&vs, kind, init), config);
        UNet { vs, model, adapters: None }
    }

    /// `build` with a LoRA adapter (fp32, PEFT's default init drawn from the current generator)
    /// on every Linear and Conv2d `spec` targets, in `adapters`. Fails naming the target that
    /// matches nothing, or the first layer the rank exceeds.
    pub fn build_with_adapters(config: &UNetConfig, device: Device, kind: Kind, init: Init, spec: &AdapterSpec) -> Result<UNet> {
        let vs = nn::VarStore::new(device);
        let store = nn::VarStore::new(device);
        let sites = Rc::new(AdapterSites::new(&store, spec.clone()));
        let model = UNet2DConditionModel::new(Builder::new(&vs, kind, init).with_adapters(sites.clone()), config);
        sites.finish().map_err(anyhow::Error::msg)?;
        drop(sites);
        let mut vs = vs;
        vs.freeze();
        Ok(UNet { vs, model, adapters: Some(store) })
    }

    /// The parameters training updates, by name: the adapters' when there are any (the base is
    /// frozen), else every parameter.
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        weights::named_tensors(self.adapters.as_ref().unwrap_or(&self.vs))
    }

    /// Loads a diffusers UNet folder (config.json + safetensors weights), keeping `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<UNet> {
        let config = UNetConfig::from_path(dir)?;
        let unet = UNet::build(&config, device, kind, Init::Empty);
        let files = weights::weight_files(dir, "diffusion_pytorch_model")?;
        weights::load_strict(&unet.vs.variables(), &files).with_context(|| format!("loading UNet {}", dir.display()))?;
        Ok(unet)
    }

    pub fn num_params(&self) -> i64 {
        count_params(self.vs.variables().values())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_counts_the_published_parameters() {
        let c = UNetConfig::from_path(Path::new("configs/reference/sd15_unet_config.json")).unwrap();
        let unet = UNet::build(&c, Device::Cpu, Kind::Float, Init::Empty);
        assert_eq!(unet.num_params(), 859_520_964);
        let c = UNetConfig::from_path(Path::new("configs/reference/sd21_unet_config.json")).unwrap();
        let unet = UNet::build(&c, Device::Cpu, Kind::Float, Init::Empty);
        assert_eq!(unet.num_params(), 865_910_724);
    }

    /// SDXL-base's config (the published file), built with unwritten half-precision storage.
    #[test]
    fn sdxl_counts_the_published_parameters() {
        let c = UNetConfig::from_path(Path::new("configs/reference/sdxl_unet_config.json")).unwrap();
        let unet = UNet::build(&c, Device::Cpu, Kind::Half, Init::Empty);
        assert_eq!(unet.num_params(), 2_567_463_684);
        let vars = unet.vs.variables();
        let blocks: BTreeSet<String> = vars
            .keys()
            .filter_map(|k| k.find(".transformer_blocks.").map(|i| {
                let rest = &k[i + ".transformer_blocks.".len()..];
                format!("{}.{}", &k[..i], &rest[..rest.find('.').unwrap()])
            }))
            .collect();
        assert_eq!(blocks.len(), 70);
        assert_eq!(c.transformer_block_count(), 70);
        let embed: i64 = vars.iter().filter(|(k, _)| k.starts_with("add_embedding.") || k.starts_with("time_embedding.")).map(|(_, t)| t.numel() as i64).sum();
        assert_eq!(embed, 7_296_000);
    }

    #[test]
    fn odd_sizes_and_features() {
        let mut c = UNetConfig::default();
        c.block_out_channels = vec![32, 64];
        c.down_block_types = vec![DownBlockKind::CrossAttn, DownBlockKind::Plain];
        c.up_block_types = vec![UpBlockKind::Plain, UpBlockKind::CrossAttn];
        c.layers_per_block = vec![1, 1];
        c.num_heads = vec![2, 2];
        c.norm_num_groups = 8;
        c.cross_attention_dim = 16;
        let unet = UNet::build(&c, Device::Cpu, Kind::Float, Init::Torch);
        let x = Tensor::randn([2, 4, 9, 7], (Kind::Float, Device::Cpu));
        let ctx = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
        let wanted: BTreeSet<String> = ["down_blocks.0.attentions.0.proj_out".to_string()].into();
        let out = unet.model.forward(&x, &Tensor::from_slice(&[10i64, 500]), &ctx, &wanted);
        assert_eq!(out.sample.size(), vec![2, 4, 9, 7]);
        assert_eq!(out.down.len(), 2);
        assert_eq!(out.feature("up_blocks.1").unwrap().size(), vec![2, 32, 9, 7]);
        assert_eq!(out.feature("down_blocks.0.attentions.0.proj_out").unwrap().size(), vec![2, 32, 9, 7]);
        assert!(out.feature("mid_block").is_some());
    }
}
