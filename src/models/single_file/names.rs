//! The map between diffusers' names and the LDM layout's, a function of the diffusers config;
//! used both ways (`SingleFile`'s loading and the `*_to_ldm` writers).
use super::super::clip::ClipTextConfig;
use super::super::unet_config::{DownBlockKind, UNetConfig, UpBlockKind};
use super::super::vae::VaeConfig;
use super::{Family, CLIP_PREFIX, EMA_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, XL_CLIP_PREFIX, XL_OPEN_CLIP_PREFIX};
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use tch::Tensor;

/// How a diffusers tensor is stored in the LDM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Transform {
    Same,
    /// A linear weight stored as a 1×1 conv (the VAE's attention); a linear is also accepted.
    Conv1x1,
    /// Part `i` of 3 of OpenCLIP's fused `in_proj` (q, k, v).
    QkvPart(usize),
    /// A linear weight stored as the matrix that multiplies (OpenCLIP's `text_projection`).
    Transposed,
}

/// How names below a mapped prefix are renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rename {
    Plain,
    UnetResnet,
    VaeResnet,
    VaeAttention,
    OpenClipLayer,
    /// The one tensor of an exact name, transposed.
    Transposed,
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];
const VAE_RESNET: &[(&str, &str)] = &[("conv_shortcut", "nin_shortcut")];
const VAE_ATTENTION: &[(&str, &str)] =
    &[("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")];
const OPEN_CLIP_LAYER: &[(&str, &str)] = &[
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
];

impl Rename {
    fn apply(self, suffix: &str) -> Option<(String, Transform)> {
        let table = match self {
            Rename::Plain | Rename::Transposed => return Some((suffix.to_string(), Transform::Same)),
            Rename::UnetResnet => UNET_RESNET,
            Rename::VaeResnet => VAE_RESNET,
            Rename::VaeAttention => VAE_ATTENTION,
            Rename::OpenClipLayer => {
                for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    if let Some(leaf) = suffix.strip_prefix(&format!("self_attn.{p}.")) {
                        return Some((format!("attn.in_proj_{leaf}"), Transform::QkvPart(i)));
                    }
                }
                OPEN_CLIP_LAYER
            }
        };
        for (from, to) in table {
            if let Some(leaf) = suffix.strip_prefix(&format!("{from}.")) {
                let transform = if self == Rename::VaeAttention && *from != "group_norm" && leaf == "weight" {
                    Transform::Conv1x1
                } else {
                    Transform::Same
                };
                return Some((format!("{to}.{leaf}"), transform));
            }
        }
        Some((suffix.to_string(), Transform::Same))
    }
}

/// diffusers prefix -> LDM prefix (each without the trailing dot), with how the rest is renamed.
#[derive(Debug, Default)]
pub(super) struct NameMap {
    entries: Vec<(String, String, Rename)>,
}

impl NameMap {
    fn add(&mut self, diffusers: impl Into<String>, ldm: impl Into<String>, rename: Rename) {
        self.entries.push((diffusers.into(), ldm.into(), rename));
    }

    /// The LDM name of a diffusers tensor: the longest matching prefix decides.
    pub(super) fn ldm(&self, name: &str) -> Option<(String, Transform)> {
        let mut best: Option<&(String, String, Rename)> = None;
        for e in &self.entries {
            let matches = name == e.0 || name.strip_prefix(e.0.as_str()).is_some_and(|r| r.starts_with('.'));
            if matches && best.is_none_or(|b| e.0.len() > b.0.len()) {
                best = Some(e);
            }
        }
        let (d, l, rename) = best?;
        if name == d {
            return Some((l.clone(), if *rename == Rename::Transposed { Transform::Transposed } else { Transform::Same }));
        }
        let (suffix, transform) = rename.apply(&name[d.len() + 1..])?;
        Some((format!("{l}.{suffix}"), transform))
    }
}

/// The LDM names of a UNet with `c`'s layout (without the `model.diffusion_model.` prefix).
pub(super) fn unet_map(c: &UNetConfig) -> NameMap {
    let mut m = NameMap::default();
    let n = c.num_stages();
    m.add("time_embedding.linear_1", "time_embed.0", Rename::Plain);
    m.add("time_embedding.linear_2", "time_embed.2", Rename::Plain);
    if c.addition_embed.is_some() {
        m.add("add_embedding.linear_1", "label_emb.0.0", Rename::Plain);
        m.add("add_embedding.linear_2", "label_emb.0.2", Rename::Plain);
    }
    m.add("conv_in", "input_blocks.0.0", Rename::Plain);
    let mut k = 1;
    for i in 0..n {
        for j in 0..c.layers_per_block[i] {
            m.add(format!("down_blocks.{i}.resnets.{j}"), format!("input_blocks.{k}.0"), Rename::UnetResnet);
            if c.down_block_types[i] == DownBlockKind::CrossAttn {
                m.add(format!("down_blocks.{i}.attentions.{j}"), format!("input_blocks.{k}.1"), Rename::Plain);
            }
            k += 1;
        }
        if i + 1 < n {
            m.add(format!("down_blocks.{i}.downsamplers.0.conv"), format!("input_blocks.{k}.0.op"), Rename::Plain);
            k += 1;
        }
    }
    if c.mid_block.is_some() {
        m.add("mid_block.resnets.0", "middle_block.0", Rename::UnetResnet);
        m.add("mid_block.attentions.0", "middle_block.1", Rename::Plain);
        m.add("mid_block.resnets.1", "middle_block.2", Rename::UnetResnet);
    }
    let mut k = 0;
    for i in 0..n {
        let layers = c.layers_per_block[n - 1 - i] + 1;
        let attn = c.up_block_types[i] == UpBlockKind::CrossAttn;
        for j in 0..layers {
            m.add(format!("up_blocks.{i}.resnets.{j}"), format!("output_blocks.{k}.0"), Rename::UnetResnet);
            if attn {
                m.add(format!("up_blocks.{i}.attentions.{j}"), format!("output_blocks.{k}.1"), Rename::Plain);
            }
            if j + 1 == layers && i + 1 < n {
                let slot = if attn { 2 } else { 1 };
                m.add(format!("up_blocks.{i}.upsamplers.0.conv"), format!("output_blocks.{k}.{slot}.conv"), Rename::Plain);
            }
            k += 1;
        }
    }
    m.add("conv_norm_out", "out.0", Rename::Plain);
    m.add("conv_out", "out.2", Rename::Plain);
    m
}

/// The LDM names of a VAE (without `first_stage_model.`).
pub(super) fn vae_map(c: &VaeConfig) -> NameMap {
    let mut m = NameMap::default();
    let n = c.block_out_channels.len();
    for side in ["encoder", "decoder"] {
        m.add(format!("{side}.conv_in"), format!("{side}.conv_in"), Rename::Plain);
        m.add(format!("{side}.conv_out"), format!("{side}.conv_out"), Rename::Plain);
        m.add(format!("{side}.conv_norm_out"), format!("{side}.norm_out"), Rename::Plain);
        m.add(format!("{side}.mid_block.resnets.0"), format!("{side}.mid.block_1"), Rename::VaeResnet);
        m.add(format!("{side}.mid_block.resnets.1"), format!("{side}.mid.block_2"), Rename::VaeResnet);
        m.add(format!("{side}.mid_block.attentions.0"), format!("{side}.mid.attn_1"), Rename::VaeAttention);
    }
    for i in 0..n {
        for j in 0..c.layers_per_block {
            m.add(format!("encoder.down_blocks.{i}.resnets.{j}"), format!("encoder.down.{i}.block.{j}"), Rename::VaeResnet);
        }
        m.add(format!("encoder.down_blocks.{i}.downsamplers.0.conv"), format!("encoder.down.{i}.downsample.conv"), Rename::Plain);
        // LDM numbers the decoder's levels from the bottom: diffusers' up block i is up.{n-1-i}.
        let l = n - 1 - i;
        for j in 0..=c.layers_per_block {
            m.add(format!("decoder.up_blocks.{i}.resnets.{j}"), format!("decoder.up.{l}.block.{j}"), Rename::VaeResnet);
        }
        m.add(format!("decoder.up_blocks.{i}.upsamplers.0.conv"), format!("decoder.up.{l}.upsample.conv"), Rename::Plain);
    }
    m.add("quant_conv", "quant_conv", Rename::Plain);
    m.add("post_quant_conv", "post_quant_conv", Rename::Plain);
    m
}

/// The text encoder's LDM names (full keys, prefix included).
pub(super) fn text_map(c: &ClipTextConfig, family: Family, sd1_prefix: &str) -> NameMap {
    match family {
        Family::Sd1 | Family::Sdxl => {
            let mut m = NameMap::default();
            m.add("text_model", sd1_prefix.trim_end_matches('.'), Rename::Plain);
            m
        }
        Family::Sd2 => open_clip_map(c, OPEN_CLIP_PREFIX),
    }
}

/// An OpenCLIP text tower's names under `p` (SD-2's ViT-H, SDXL's ViT-bigG), with
/// `text_projection` when the model has one.
pub(super) fn open_clip_map(c: &ClipTextConfig, p: &str) -> NameMap {
    let mut m = NameMap::default();
    m.add("text_model.embeddings.token_embedding", format!("{p}token_embedding"), Rename::Plain);
    m.add("text_model.embeddings.position_embedding.weight", format!("{p}positional_embedding"), Rename::Plain);
    m.add("text_model.final_layer_norm", format!("{p}ln_final"), Rename::Plain);
    for i in 0..c.num_hidden_layers {
        m.add(format!("text_model.encoder.layers.{i}"), format!("{p}transformer.resblocks.{i}"), Rename::OpenClipLayer);
    }
    if c.with_projection {
        m.add("text_projection.weight", format!("{p}text_projection"), Rename::Transposed);
    }
    m
}

/// `model_ema.*` name of a UNet key: LDM's `LitEma` drops the dots.
pub(super) fn ema_name(unet_key: &str) -> String {
    format!("{EMA_PREFIX}{}", unet_key["model.".len()..].replace('.', ""))
}

/// Diffusers-named tensors of one part turned into LDM-named ones (`prefix` added): the
/// inverse of what `SingleFile` reads.
fn to_ldm(tensors: &[(String, Tensor)], map: &NameMap, prefix: &str) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![];
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (name, t) in tensors {
        let (ldm, transform) = map.ldm(name).ok_or_else(|| anyhow!("no LDM name for {name}"))?;
        let key = format!("{prefix}{ldm}");
        match transform {
            Transform::Same => out.push((key, t.shallow_clone())),
            Transform::Conv1x1 => {
                let s = t.size();
                out.push((key, t.reshape([s[0], s[1], 1, 1])))
            }
            Transform::QkvPart(i) => fused.entry(key).or_default()[i] = Some(t.shallow_clone()),
            Transform::Transposed => out.push((key, t.tr().contiguous())),
        }
    }
    for (key, parts) in fused {
        let parts: Vec<Tensor> = parts.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| anyhow!("{key}: q, k or v missing"))?;
        out.push((key, Tensor::cat(&parts, 0)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The UNet's tensors in LDM names (`model.diffusion_model.*`).
pub fn unet_to_ldm(config: &UNetConfig, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    to_ldm(tensors, &unet_map(config), UNET_PREFIX)
}

/// The LDM/SGM name of each of a UNet's modules (`down_blocks.1.attentions.0.proj_in` ->
/// `input_blocks.4.1.proj_in`, without `model.diffusion_model.`): kohya's SDXL LoRA keys are
/// these names with `_` for `.`. A module without an LDM name is left out.
pub fn unet_module_ldm_names<'a>(config: &UNetConfig, modules: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, String> {
    let map = unet_map(config);
    modules
        .into_iter()
        .filter_map(|m| {
            let (ldm, _) = map.ldm(&format!("{m}.weight"))?;
            Some((m.to_string(), ldm.strip_suffix(".weight")?.to_string()))
        })
        .collect()
}

/// The VAE's tensors in LDM names (`first_stage_model.*`, attention as 1×1 convs as in the
/// original files).
pub fn vae_to_ldm(config: &VaeConfig, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    to_ldm(tensors, &vae_map(config), VAE_PREFIX)
}

/// The text encoder's tensors in LDM names: SD-1 as `cond_stage_model.transformer.text_model.*`,
/// SD-2 in OpenCLIP's names (q/k/v fused into `in_proj`; the SD-2 layer the model does not use
/// is not invented), SDXL's first as `conditioner.embedders.0.transformer.text_model.*`.
pub fn text_encoder_to_ldm(config: &ClipTextConfig, family: Family, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    let clip = if family == Family::Sdxl { XL_CLIP_PREFIX } else { CLIP_PREFIX };
    to_ldm(tensors, &text_map(config, family, &format!("{clip}text_model.")), "")
}

/// SDXL's second text encoder in SGM's names (`conditioner.embedders.1.model.*`: OpenCLIP's,
/// q/k/v fused into `in_proj`, `text_projection` transposed).
pub fn text_encoder_2_to_ldm(config: &ClipTextConfig, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    to_ldm(tensors, &open_clip_map(config, XL_OPEN_CLIP_PREFIX), "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::student::{StudentPlan, StudentSpec};
    use crate::models::layers::Init;
    use crate::models::unet::UNet;
    use std::collections::BTreeSet;
    use std::path::Path;
    use tch::{Device, Kind};

    fn sd15() -> UNetConfig {
        UNetConfig::from_path(Path::new("configs/reference/sd15_unet_config.json")).unwrap()
    }

    #[test]
    fn sd15_names_are_ldm_names() {
        let m = unet_map(&sd15());
        let l = |n: &str| m.ldm(n).unwrap().0;
        assert_eq!(l("time_embedding.linear_1.weight"), "time_embed.0.weight");
        assert_eq!(l("down_blocks.0.resnets.1.conv1.weight"), "input_blocks.2.0.in_layers.2.weight");
        assert_eq!(l("down_blocks.0.attentions.1.proj_in.weight"), "input_blocks.2.1.proj_in.weight");
        assert_eq!(l("down_blocks.0.downsamplers.0.conv.weight"), "input_blocks.3.0.op.weight");
        assert_eq!(l("down_blocks.3.resnets.1.time_emb_proj.bias"), "input_blocks.11.0.emb_layers.1.bias");
        assert_eq!(l("mid_block.resnets.1.conv_shortcut.weight"), "middle_block.2.skip_connection.weight");
        assert_eq!(l("up_blocks.0.upsamplers.0.conv.weight"), "output_blocks.2.1.conv.weight");
        assert_eq!(l("up_blocks.1.upsamplers.0.conv.weight"), "output_blocks.5.2.conv.weight");
        assert_eq!(l("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"), "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight");
        assert_eq!(l("conv_out.bias"), "out.2.bias");
    }

    #[test]
    fn vae_and_openclip_names() {
        let c = VaeConfig { block_out_channels: vec![128, 256, 512, 512], layers_per_block: 2, ..Default::default() };
        let m = vae_map(&c);
        assert_eq!(m.ldm("decoder.up_blocks.0.resnets.2.conv1.weight").unwrap().0, "decoder.up.3.block.2.conv1.weight");
        assert_eq!(m.ldm("encoder.down_blocks.1.resnets.0.conv_shortcut.weight").unwrap().0, "encoder.down.1.block.0.nin_shortcut.weight");
        assert_eq!(m.ldm("encoder.mid_block.attentions.0.to_out.0.weight").unwrap(), ("encoder.mid.attn_1.proj_out.weight".into(), Transform::Conv1x1));
        assert_eq!(m.ldm("decoder.conv_norm_out.bias").unwrap().0, "decoder.norm_out.bias");
        let t = ClipTextConfig { num_hidden_layers: 2, ..Default::default() };
        let m = text_map(&t, Family::Sd2, "");
        assert_eq!(m.ldm("text_model.encoder.layers.1.self_attn.k_proj.bias").unwrap(), ("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias".into(), Transform::QkvPart(1)));
        assert_eq!(m.ldm("text_model.encoder.layers.0.mlp.fc2.weight").unwrap().0, "cond_stage_model.model.transformer.resblocks.0.mlp.c_proj.weight");
        assert_eq!(m.ldm("text_model.embeddings.position_embedding.weight").unwrap().0, "cond_stage_model.model.positional_embedding");
    }

    /// Every student's LDM blocks are numbered without gaps, and each name is used once.
    #[test]
    fn student_blocks_are_contiguous() {
        let t = sd15();
        let mut specs: Vec<StudentSpec> = ["bk_base", "bk_small", "bk_tiny"].iter().map(|p| StudentSpec::preset(p, &t).unwrap()).collect();
        let mut custom = StudentSpec::preset("bk_small", &t).unwrap();
        custom.down = vec![vec![0, 1].into(), vec![0].into(), vec![0].into(), vec![0, 1].into()];
        custom.up = vec![vec![0, 1, 2].into(), vec![0, 2].into(), vec![0, 2].into(), vec![0, 1, 2].into()];
        custom.name = "custom".into();
        specs.push(custom);
        for spec in specs {
            let plan = StudentPlan::new(&spec, &t).unwrap();
            let unet = UNet::build(&plan.config, Device::Cpu, Kind::Float, Init::Empty);
            let m = unet_map(&plan.config);
            let names: BTreeSet<String> = unet.vs.variables().keys().map(|n| m.ldm(n).unwrap().0).collect();
            assert_eq!(names.len(), unet.vs.len(), "{}: two tensors share an LDM name", spec.name);
            for list in ["input_blocks", "output_blocks"] {
                let idx: BTreeSet<usize> = names.iter().filter_map(|n| n.strip_prefix(&format!("{list}."))).filter_map(|r| r.split('.').next()?.parse().ok()).collect();
                let max = *idx.iter().max().unwrap();
                assert_eq!(idx, (0..=max).collect(), "{}: {list} has gaps", spec.name);
            }
            assert_eq!(names.iter().any(|n| n.starts_with("middle_block.")), plan.config.mid_block.is_some(), "{}", spec.name);
        }
    }

    /// ComfyUI's `detect_unet_config` (comfy/model_detection.py) reduced to what its SDXL-family
    /// entries match on, read from key names: resnets per level, each input and output block's
    /// transformer depth (output blocks last first), the mid block's depth (-1: a resnet alone,
    /// -2: none).
    fn comfy_detect(names: &BTreeSet<String>) -> (Vec<usize>, Vec<usize>, Vec<usize>, i64) {
        let has = |k: String| names.contains(&k);
        let depth = |block: &str| (0..).take_while(|d| names.iter().any(|n| n.starts_with(&format!("{block}.1.transformer_blocks.{d}.")))).count();
        let inputs = (0..).take_while(|k| names.iter().any(|n| n.starts_with(&format!("input_blocks.{k}.")))).count();
        let (mut res_blocks, mut depth_in, mut depth_out, mut last) = (vec![], vec![], vec![], 0);
        for k in 0..inputs {
            let (input, output) = (format!("input_blocks.{k}"), format!("output_blocks.{}", inputs - k - 1));
            if has(format!("{input}.0.op.weight")) {
                res_blocks.push(last);
                last = 0;
                depth_out.push(depth(&output));
                continue;
            }
            if has(format!("{input}.0.in_layers.0.weight")) {
                last += 1;
                depth_in.push(depth(&input));
            }
            if has(format!("{output}.0.in_layers.0.weight")) {
                depth_out.push(depth(&output));
            }
        }
        res_blocks.push(last);
        let middle = if has("middle_block.1.proj_in.weight".into()) {
            depth("middle_block") as i64
        } else if has("middle_block.0.in_layers.0.weight".into()) {
            -1
        } else {
            -2
        };
        (res_blocks, depth_in, depth_out, middle)
    }

    /// The SDXL students' single-file names give what ComfyUI's `SSD_1B`, `Segmind_Vega`,
    /// `KOALA_1B` and `KOALA_700M` entries (comfy/model_detection.py, supported_models.py) match.
    #[test]
    fn sdxl_students_are_numbered_as_comfyui_detects_them() {
        let t = UNetConfig::from_path(Path::new("configs/reference/sdxl_unet_config.json")).unwrap();
        let want: [(&str, (Vec<usize>, Vec<usize>, Vec<usize>, i64)); 5] = [
            ("ssd_1b", (vec![2, 2, 2], vec![0, 0, 2, 2, 4, 4], vec![0, 0, 0, 1, 1, 2, 10, 4, 4], -1)),
            ("vega", (vec![2, 2, 2], vec![0, 0, 1, 1, 2, 2], vec![0, 0, 0, 1, 1, 1, 2, 2, 2], -1)),
            ("koala_1b", (vec![1, 1, 1], vec![0, 2, 6], vec![0, 0, 2, 2, 6, 6], 6)),
            ("koala_700m", (vec![1, 1, 1], vec![0, 2, 5], vec![0, 0, 2, 2, 5, 5], -2)),
            ("bk_base", (vec![1, 1, 1], vec![0, 2, 10], vec![0, 0, 2, 2, 10, 10], 10)),
        ];
        let base = unet_map(&t);
        let sdxl: BTreeSet<String> = UNet::build(&t, Device::Cpu, Kind::Half, Init::Empty).vs.variables().keys().map(|n| base.ldm(n).unwrap().0).collect();
        assert_eq!(comfy_detect(&sdxl), (vec![2, 2, 2], vec![0, 0, 2, 2, 10, 10], vec![0, 0, 0, 2, 2, 2, 10, 10, 10], 10), "SDXL itself");
        for (preset, detected) in want {
            let plan = StudentPlan::new(&StudentSpec::preset(preset, &t).unwrap(), &t).unwrap();
            let m = unet_map(&plan.config);
            let names: BTreeSet<String> = UNet::build(&plan.config, Device::Cpu, Kind::Half, Init::Empty).vs.variables().keys().map(|n| m.ldm(n).unwrap().0).collect();
            assert_eq!(comfy_detect(&names), detected, "{preset}");
        }
    }
}
