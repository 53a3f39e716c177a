//! Single-file Stable Diffusion checkpoints in the CompVis/LDM key layout (what the official
//! `v1-5-pruned-emaonly.safetensors` / `v2-1_768-ema-pruned.safetensors` and the model-sharing
//! sites ship, and what ComfyUI, AUTOMATIC1111 and stable-diffusion.cpp load):
//!
//! - `model.diffusion_model.{time_embed,input_blocks,middle_block,output_blocks,out}.*`: the UNet
//!   (optionally `model_ema.*`, LDM's EMA with the dots of the name removed);
//! - `first_stage_model.*`: the VAE, its mid-block attention as 1×1 convs (or, in files
//!   converted from newer diffusers folders, linears);
//! - `cond_stage_model.transformer.text_model.*` (SD-1.x, transformers' CLIP names) or
//!   `cond_stage_model.model.*` (SD-2.x, OpenCLIP names: `in_proj` fuses q/k/v, and the last of
//!   its layers is not used: SD-2 conditions on the penultimate one).
//!
//! The map between these names and diffusers' is a function of the diffusers config, for any
//! UNet sdkd can build: LDM numbers `input_blocks`/`output_blocks` consecutively, so a pruned
//! student's blocks come out contiguous with its downsamplers and upsamplers where LDM puts
//! them, and a student without a mid block has no `middle_block`. Reading, the configs are
//! inferred from the tensor shapes; what shapes cannot tell (attention heads, v-prediction) comes
//! from a sidecar LDM `.yaml` (`<stem>.yaml`) or SD's defaults, and an SD-2.x file with neither
//! is refused rather than guessed.
use super::clip::{Activation, ClipTextConfig, ClipTextEncoder};
use super::layers::Init;
use super::unet::UNet;
use super::unet_config::{DownBlockKind, MidBlockKind, UNetConfig, UpBlockKind};
use super::vae::{Vae, VaeConfig};
use super::weights::{kind_of, MappedFile};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
const EMA_PREFIX: &str = "model_ema.";

/// Which Stable Diffusion generation a file is, by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP ViT-L/14 text encoder (768 wide).
    Sd1,
    /// OpenCLIP ViT-H/14 text encoder (1024 wide), penultimate layer.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD-1.x",
            Family::Sd2 => "SD-2.x",
        }
    }

    /// The tokenizer's pad token in the published pipelines.
    pub fn pad_token(self) -> &'static str {
        match self {
            Family::Sd1 => "<|endoftext|>",
            Family::Sd2 => "!",
        }
    }
}

/// What the user said about a file beyond its weights.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SingleFileOptions {
    /// Read the UNet from `model_ema.*` instead of `model.diffusion_model.*`.
    pub use_ema: bool,
    /// `epsilon` or `v_prediction`; wins over the sidecar `.yaml`.
    pub prediction_type: Option<String>,
}

/// The tensors of a checkpoint file, by name, read on demand.
pub struct StateDict {
    path: PathBuf,
    shapes: BTreeMap<String, Vec<i64>>,
    store: Store,
}

enum Store {
    Mapped(MappedFile),
    /// A `.ckpt`, already unpickled.
    Memory(HashMap<String, Tensor>),
}

impl std::fmt::Debug for StateDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateDict({}, {} tensors)", self.path.display(), self.shapes.len())
    }
}

impl StateDict {
    /// A `.safetensors` file (its header is checked to cover the whole file, so a truncated
    /// download is refused here), or a `.ckpt` (a `torch.save` zip, read by `torch_pickle`,
    /// which refuses any pickle that asks for more than tensors and plain containers).
    pub fn open(path: &Path) -> Result<StateDict> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        match ext.as_str() {
            "safetensors" => {}
            "ckpt" | "pt" | "pth" => {
                let tensors = crate::torch_pickle::load_state_dict(path)?;
                return Ok(Self::from_tensors(path, tensors.into_iter().collect()));
            }
            _ => bail!("{}: not a single-file checkpoint (.safetensors or .ckpt)", path.display()),
        }
        let file = MappedFile::open(path)?;
        let shapes = {
            let st = file.parse()?;
            st.names()
                .into_iter()
                .map(|n| Ok((n.to_string(), st.tensor(n)?.shape().iter().map(|&d| d as i64).collect())))
                .collect::<Result<BTreeMap<_, _>>>()?
        };
        Ok(StateDict { path: path.to_path_buf(), shapes, store: Store::Mapped(file) })
    }

    /// Tensors already in memory (an unpickled `.ckpt`), named for messages by `path`.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>) -> StateDict {
        let shapes = tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
        StateDict { path: path.to_path_buf(), shapes, store: Store::Memory(tensors) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.shapes.keys().map(String::as_str)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.shapes.range(prefix.to_string()..).next().is_some_and(|(k, _)| k.starts_with(prefix))
    }

    fn with_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.shapes.range(prefix.to_string()..).map(|(k, _)| k.as_str()).take_while(move |k| k.starts_with(prefix))
    }

    /// Calls `f` with a reader of single tensors (the safetensors header is parsed once).
    fn read<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> Result<Tensor>) -> Result<R>) -> Result<R> {
        match &self.store {
            Store::Mapped(file) => {
                let st: SafeTensors<'_> = file.parse()?;
                f(&|name: &str| {
                    let view = st.tensor(name).map_err(|e| anyhow!("{}: key {name}: {e}", self.path.display()))?;
                    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                    Tensor::f_from_data_size(view.data(), &shape, kind_of(view.dtype())?)
                        .with_context(|| format!("{}: key {name}", self.path.display()))
                })
            }
            Store::Memory(map) => f(&|name: &str| {
                map.get(name).map(Tensor::shallow_clone).ok_or_else(|| anyhow!("{}: no key {name}", self.path.display()))
            }),
        }
    }
}

/// How a diffusers tensor is stored in the LDM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    Same,
    /// A linear weight stored as a 1×1 conv (the VAE's attention); a linear is also accepted.
    Conv1x1,
    /// Part `i` of 3 of OpenCLIP's fused `in_proj` (q, k, v).
    QkvPart(usize),
}

/// How names below a mapped prefix are renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rename {
    Plain,
    UnetResnet,
    VaeResnet,
    VaeAttention,
    OpenClipLayer,
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
            Rename::Plain => return Some((suffix.to_string(), Transform::Same)),
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
struct NameMap {
    entries: Vec<(String, String, Rename)>,
}

impl NameMap {
    fn add(&mut self, diffusers: impl Into<String>, ldm: impl Into<String>, rename: Rename) {
        self.entries.push((diffusers.into(), ldm.into(), rename));
    }

    /// The LDM name of a diffusers tensor: the longest matching prefix decides.
    fn ldm(&self, name: &str) -> Option<(String, Transform)> {
        let mut best: Option<&(String, String, Rename)> = None;
        for e in &self.entries {
            let matches = name == e.0 || name.strip_prefix(e.0.as_str()).is_some_and(|r| r.starts_with('.'));
            if matches && best.is_none_or(|b| e.0.len() > b.0.len()) {
                best = Some(e);
            }
        }
        let (d, l, rename) = best?;
        if name == d {
            return Some((l.clone(), Transform::Same));
        }
        let (suffix, transform) = rename.apply(&name[d.len() + 1..])?;
        Some((format!("{l}.{suffix}"), transform))
    }
}

/// The LDM names of a UNet with `c`'s layout (without the `model.diffusion_model.` prefix).
fn unet_map(c: &UNetConfig) -> NameMap {
    let mut m = NameMap::default();
    let n = c.num_stages();
    m.add("time_embedding.linear_1", "time_embed.0", Rename::Plain);
    m.add("time_embedding.linear_2", "time_embed.2", Rename::Plain);
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
fn vae_map(c: &VaeConfig) -> NameMap {
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
fn text_map(c: &ClipTextConfig, family: Family, sd1_prefix: &str) -> NameMap {
    let mut m = NameMap::default();
    match family {
        Family::Sd1 => m.add("text_model", sd1_prefix.trim_end_matches('.'), Rename::Plain),
        Family::Sd2 => {
            let p = OPEN_CLIP_PREFIX;
            m.add("text_model.embeddings.token_embedding", format!("{p}token_embedding"), Rename::Plain);
            m.add("text_model.embeddings.position_embedding.weight", format!("{p}positional_embedding"), Rename::Plain);
            m.add("text_model.final_layer_norm", format!("{p}ln_final"), Rename::Plain);
            for i in 0..c.num_hidden_layers {
                m.add(format!("text_model.encoder.layers.{i}"), format!("{p}transformer.resblocks.{i}"), Rename::OpenClipLayer);
            }
        }
    }
    m
}

/// `model_ema.*` name of a UNet key: LDM's `LitEma` drops the dots.
fn ema_name(unet_key: &str) -> String {
    format!("{EMA_PREFIX}{}", unet_key["model.".len()..].replace('.', ""))
}

/// A single file opened as a Stable Diffusion pipeline: its family and the configs its shapes
/// (and sidecar `.yaml`) give.
#[derive(Debug)]
pub struct SingleFile {
    pub state: StateDict,
    pub family: Family,
    pub options: SingleFileOptions,
    /// The sidecar LDM config, when there is one.
    pub yaml: Option<(PathBuf, serde_yaml::Value)>,
    /// Where the SD-1 text encoder's names start (older files lack `text_model.`).
    sd1_text_prefix: String,
}

/// `<stem>.yaml` (or `.yml`) beside `path`.
fn sidecar(path: &Path) -> Option<PathBuf> {
    ["yaml", "yml"].iter().map(|e| path.with_extension(e)).find(|p| p.is_file())
}

fn yaml_get<'a>(v: &'a serde_yaml::Value, path: &[&str]) -> Option<&'a serde_yaml::Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

impl SingleFile {
    pub fn open(path: &Path, options: &SingleFileOptions) -> Result<SingleFile> {
        let state = StateDict::open(path)?;
        Self::from_state(state, options)
    }

    pub fn from_state(state: StateDict, options: &SingleFileOptions) -> Result<SingleFile> {
        let file = state.path().display().to_string();
        for key in ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight", "model.diffusion_model.label_emb.0.0.weight"] {
            if state.contains(key) || (key.starts_with("conditioner") && state.has_prefix("conditioner.embedders.")) {
                bail!("{file}: key {key}: this is an SDXL checkpoint; SDXL is not supported yet (SD-1.x and SD-2.x are)");
            }
        }
        if !state.has_prefix(UNET_PREFIX) {
            bail!("{file}: no {UNET_PREFIX}* keys: not a Stable Diffusion 1.x/2.x checkpoint in the CompVis/LDM layout");
        }
        let family = if state.has_prefix(OPEN_CLIP_PREFIX) {
            Family::Sd2
        } else if state.has_prefix(CLIP_PREFIX) {
            Family::Sd1
        } else {
            // No text encoder: the UNet's context width tells (768 CLIP-L, 1024 OpenCLIP-H).
            let ctx = state.names().find(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight")).and_then(|k| state.shape(k)).map(|s| s[1]);
            if ctx == Some(1024) { Family::Sd2 } else { Family::Sd1 }
        };
        let sd1_text_prefix =
            if state.has_prefix(&format!("{CLIP_PREFIX}text_model.")) || !state.has_prefix(CLIP_PREFIX) {
                format!("{CLIP_PREFIX}text_model.")
            } else {
                CLIP_PREFIX.to_string()
            };
        let yaml = match sidecar(state.path()) {
            Some(p) => {
                let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                let v: serde_yaml::Value = serde_yaml::from_str(&text).with_context(|| format!("{}: not valid YAML", p.display()))?;
                Some((p, v))
            }
            None => None,
        };
        if options.use_ema && !state.has_prefix(EMA_PREFIX) {
            bail!("{file}: --use-ema: the file has no {EMA_PREFIX}* keys (no EMA weights)");
        }
        Ok(SingleFile { state, family, options: options.clone(), yaml, sd1_text_prefix })
    }

    fn file(&self) -> String {
        self.state.path().display().to_string()
    }

    fn shape(&self, key: &str) -> Result<&[i64]> {
        self.state.shape(key).ok_or_else(|| anyhow!("{}: missing key {key}", self.file()))
    }

    /// An integer of the sidecar's `model.params.unet_config.params`.
    fn unet_param(&self, key: &str) -> Option<i64> {
        self.yaml.as_ref().and_then(|(_, v)| yaml_get(v, &["model", "params", "unet_config", "params", key])).and_then(serde_yaml::Value::as_i64)
    }

    fn model_param(&self, key: &str) -> Option<&serde_yaml::Value> {
        self.yaml.as_ref().and_then(|(_, v)| yaml_get(v, &["model", "params", key]))
    }

    /// Whether the file holds a part (`first_stage_model.*`, `cond_stage_model.*`).
    pub fn check_has(&self, prefix: &str, what: &str) -> Result<()> {
        if !self.state.has_prefix(prefix) {
            bail!("{}: no {prefix}* keys: the file holds no {what}, which this needs", self.file());
        }
        Ok(())
    }

    fn text_prefix(&self) -> &str {
        match self.family {
            Family::Sd1 => CLIP_PREFIX,
            Family::Sd2 => OPEN_CLIP_PREFIX,
        }
    }

    /// `epsilon` or `v_prediction`: the flag, else the sidecar's `parameterization`, else
    /// epsilon for SD-1.x; an SD-2.x file (512-base is epsilon, 768-v is v) with neither is
    /// refused rather than guessed.
    pub fn prediction_type(&self) -> Result<String> {
        if let Some(p) = &self.options.prediction_type {
            return Ok(p.clone());
        }
        if let Some((path, _)) = &self.yaml {
            return match self.model_param("parameterization").and_then(serde_yaml::Value::as_str) {
                None | Some("eps") => Ok("epsilon".into()),
                Some("v") => Ok("v_prediction".into()),
                Some(other) => bail!("{}: key model.params.parameterization: {other:?} is not supported (\"eps\" or \"v\")", path.display()),
            };
        }
        match self.family {
            Family::Sd1 => Ok("epsilon".into()),
            Family::Sd2 => bail!(
                "{}: an SD-2.x checkpoint (OpenCLIP text encoder, 1024-wide context): whether it predicts v (768-v models) or \
                 noise (512-base) cannot be seen in the weights, and sdkd does not guess; put the model's LDM config beside it \
                 as {} (with parameterization: \"v\" for a v model), or convert it once with \
                 `sdkd convert --from <file> --to <folder> --prediction-type v_prediction|epsilon`",
                self.file(),
                self.state.path().with_extension("yaml").display()
            ),
        }
    }

    /// The UNet's diffusers config, from the shapes under `model.diffusion_model.`.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let file = self.file();
        let key = |rest: &str| format!("{UNET_PREFIX}{rest}");
        let has = |rest: &str| self.state.has_prefix(&key(rest));
        let conv_in = self.shape(&key("input_blocks.0.0.weight"))?.to_vec();
        let out = self.shape(&key("out.2.weight"))?.to_vec();
        let mut c = UNetConfig::default();
        c.in_channels = conv_in[1];
        c.out_channels = out[0];
        let mut stages: Vec<(i64, i64, bool)> = vec![]; // (channels, layers, cross-attention)
        let mut cur: (i64, i64, bool) = (conv_in[0], 0, false);
        let mut k = 1;
        let mut context = None;
        let mut linear = None;
        loop {
            let b = format!("input_blocks.{k}.");
            if !has(&b) {
                break;
            }
            if has(&format!("{b}0.op.")) {
                stages.push(cur);
                cur = (cur.0, 0, false);
            } else {
                let ch = self.shape(&key(&format!("{b}0.out_layers.3.weight")))?[0];
                let attn = has(&format!("{b}1."));
                if cur.1 > 0 && (ch != cur.0 || attn != cur.2) {
                    bail!("{file}: key {}: a stage changes width or attention between its blocks (not a UNet2DConditionModel)", key(&b));
                }
                cur = (ch, cur.1 + 1, attn);
                if attn {
                    if has(&format!("{b}1.transformer_blocks.1.")) {
                        bail!("{file}: key {}transformer_blocks.1: transformer depth above 1 is not supported", key(&format!("{b}1.")));
                    }
                    let to_k = self.shape(&key(&format!("{b}1.transformer_blocks.0.attn2.to_k.weight")))?;
                    context.get_or_insert(to_k[1]);
                    linear.get_or_insert(self.shape(&key(&format!("{b}1.proj_in.weight")))?.len() == 2);
                }
            }
            k += 1;
        }
        if cur.1 == 0 {
            bail!("{file}: key {}: the last input stage has no resnet", key(&format!("input_blocks.{}", k - 1)));
        }
        stages.push(cur);
        self.check_contiguous("input_blocks", k)?;
        let n = stages.len();
        c.block_out_channels = stages.iter().map(|s| s.0).collect();
        c.layers_per_block = stages.iter().map(|s| s.1).collect();
        c.down_block_types = stages.iter().map(|s| if s.2 { DownBlockKind::CrossAttn } else { DownBlockKind::Plain }).collect();
        c.mid_block = has("middle_block.").then_some(MidBlockKind::CrossAttn);
        // The up path: up block i mirrors stage n-1-i with one more resnet; an upsampler ends it.
        let mut up_types = vec![];
        let mut k = 0;
        for i in 0..n {
            let want = c.layers_per_block[n - 1 - i] + 1;
            let mut attn = None;
            for j in 0..want {
                let b = format!("output_blocks.{k}.");
                if !has(&b) {
                    bail!("{file}: key {}: missing; up block {i} needs {want} blocks to mirror input stage {}", key(&b), n - 1 - i);
                }
                let a = has(&format!("{b}1.proj_in."));
                attn.get_or_insert(a);
                let upsampler = has(&format!("{b}1.conv.")) || has(&format!("{b}2.conv."));
                if upsampler != (j + 1 == want && i + 1 < n) {
                    bail!("{file}: key {}: an upsampler where the input side has no stage boundary (or none where it has one)", key(&b));
                }
                k += 1;
            }
            up_types.push(if attn == Some(true) { UpBlockKind::CrossAttn } else { UpBlockKind::Plain });
        }
        if has(&format!("output_blocks.{k}.")) {
            bail!("{file}: key {}: more output blocks than the input blocks mirror", key(&format!("output_blocks.{k}")));
        }
        self.check_contiguous("output_blocks", k)?;
        c.up_block_types = up_types;
        c.cross_attention_dim = context.unwrap_or(768);
        c.use_linear_projection = linear.unwrap_or(false);
        // Heads are not in the weights: LDM's config gives num_head_channels (SD-2: 64) or
        // num_heads (SD-1: 8).
        let head_channels = self.unet_param("num_head_channels").filter(|&h| h > 0);
        let heads = self.unet_param("num_heads").filter(|&h| h > 0);
        c.num_heads = match (head_channels, heads, self.family) {
            (Some(h), _, _) => c.block_out_channels.iter().map(|ch| ch / h).collect(),
            (None, Some(h), _) => vec![h; n],
            (None, None, Family::Sd1) => vec![8; n],
            (None, None, Family::Sd2) => c.block_out_channels.iter().map(|ch| ch / 64).collect(),
        };
        if let Some(i) = c.block_out_channels.iter().zip(&c.num_heads).position(|(ch, &h)| h <= 0 || ch % h != 0) {
            bail!(
                "{file}: the attention heads cannot be seen in the weights, and {}'s default does not fit stage {i} ({} channels): \
                 put the model's LDM config beside it as {} (num_head_channels or num_heads)",
                self.family.name(),
                c.block_out_channels[i],
                self.state.path().with_extension("yaml").display()
            );
        }
        let v = self.prediction_type().map(|p| p == "v_prediction").unwrap_or(false);
        // diffusers' SD-2.1 768-v config upcasts attention (fp16 overflows there).
        c.upcast_attention = self.family == Family::Sd2 && v;
        c.sample_size = Some(self.unet_param("image_size").unwrap_or(if self.family == Family::Sd2 && v { 96 } else { 64 }));
        c.validate().with_context(|| format!("{file}: the UNet its shapes describe"))?;
        Ok(c)
    }

    /// Refuses numbered blocks beyond a gap (loaders that count blocks stop at the first one).
    fn check_contiguous(&self, list: &str, end: usize) -> Result<()> {
        let prefix = format!("{UNET_PREFIX}{list}.");
        for name in self.state.with_prefix(&prefix) {
            let idx: Option<usize> = name[prefix.len()..].split('.').next().and_then(|i| i.parse().ok());
            if idx.is_some_and(|i| i >= end) {
                bail!("{}: key {name}: the {list} numbering has a gap at {end}", self.file());
            }
        }
        Ok(())
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        self.check_has(VAE_PREFIX, "VAE (first_stage_model)")?;
        let key = |rest: &str| format!("{VAE_PREFIX}{rest}");
        let mut ch = vec![];
        while self.state.has_prefix(&key(&format!("encoder.down.{}.", ch.len()))) {
            ch.push(self.shape(&key(&format!("encoder.down.{}.block.0.conv1.weight", ch.len())))?[0]);
        }
        let mut layers = 0;
        while self.state.has_prefix(&key(&format!("encoder.down.0.block.{layers}."))) {
            layers += 1;
        }
        let c = VaeConfig {
            in_channels: self.shape(&key("encoder.conv_in.weight"))?[1],
            out_channels: self.shape(&key("decoder.conv_out.weight"))?[0],
            block_out_channels: ch,
            layers_per_block: layers,
            latent_channels: self.shape(&key("decoder.conv_in.weight"))?[1],
            norm_num_groups: 32,
            sample_size: Some(if self.family == Family::Sd2 { 768 } else { 512 }),
            scaling_factor: self.model_param("scale_factor").and_then(serde_yaml::Value::as_f64).unwrap_or(0.18215),
            use_quant_conv: self.state.has_prefix(&key("quant_conv.")),
            use_post_quant_conv: self.state.has_prefix(&key("post_quant_conv.")),
            mid_block_add_attention: self.state.has_prefix(&key("encoder.mid.attn_1.")),
            ..VaeConfig::default()
        };
        c.validate().with_context(|| format!("{}: the VAE its shapes describe", self.file()))?;
        Ok(c)
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        let p = self.text_prefix();
        self.check_has(p, "text encoder (cond_stage_model)")?;
        let c = match self.family {
            Family::Sd1 => {
                let t = &self.sd1_text_prefix;
                let tok = self.shape(&format!("{t}embeddings.token_embedding.weight"))?.to_vec();
                let mut layers = 0;
                while self.state.has_prefix(&format!("{t}encoder.layers.{layers}.")) {
                    layers += 1;
                }
                ClipTextConfig {
                    vocab_size: tok[0],
                    hidden_size: tok[1],
                    intermediate_size: self.shape(&format!("{t}encoder.layers.0.mlp.fc1.weight"))?[0],
                    num_hidden_layers: layers,
                    num_attention_heads: (tok[1] / 64).max(1),
                    max_position_embeddings: self.shape(&format!("{t}embeddings.position_embedding.weight"))?[0],
                    hidden_act: Activation::QuickGelu,
                    ..ClipTextConfig::default()
                }
            }
            Family::Sd2 => {
                let tok = self.shape(&format!("{p}token_embedding.weight"))?.to_vec();
                let mut layers = 0;
                while self.state.has_prefix(&format!("{p}transformer.resblocks.{layers}.")) {
                    layers += 1;
                }
                if layers < 2 {
                    bail!("{}: key {p}transformer.resblocks: {layers} layers; SD-2 uses the penultimate of at least 2", self.file());
                }
                ClipTextConfig {
                    vocab_size: tok[0],
                    hidden_size: tok[1],
                    intermediate_size: self.shape(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
                    // SD-2 conditions on the penultimate layer: the last is not part of the model.
                    num_hidden_layers: layers - 1,
                    num_attention_heads: (tok[1] / 64).max(1),
                    max_position_embeddings: self.shape(&format!("{p}positional_embedding"))?[0],
                    hidden_act: Activation::Gelu,
                    ..ClipTextConfig::default()
                }
            }
        };
        c.validate().with_context(|| format!("{}: the text encoder its shapes describe", self.file()))?;
        Ok(c)
    }

    /// Copies the tensors of one part into `vars`: every model tensor must be in the file with
    /// its shape, and the file's keys of that part (but `ignore`d ones) must all be used.
    fn load_part(
        &self,
        vars: &HashMap<String, Tensor>,
        map: &NameMap,
        prefix: &str,
        part_prefix: &str,
        ignore: &dyn Fn(&str) -> bool,
        ema: bool,
    ) -> Result<()> {
        let file = self.file();
        let mut used = BTreeSet::new();
        self.state.read(|get| {
            let mut names: Vec<&String> = vars.keys().collect();
            names.sort();
            for name in names {
                let var = &vars[name];
                let (ldm, transform) = map.ldm(name).ok_or_else(|| anyhow!("{file}: no LDM name for {name} (sdkd bug)"))?;
                let key = format!("{prefix}{ldm}");
                let source = if ema { ema_name(&key) } else { key.clone() };
                let shape = self.state.shape(&source).ok_or_else(|| anyhow!("{file}: missing key {source} (diffusers' {name})"))?.to_vec();
                let want = var.size();
                let t = get(&source)?;
                let t = match transform {
                    Transform::Same => t,
                    Transform::Conv1x1 if shape.len() == 4 && shape[2..] == [1, 1] => t.reshape(&shape[..2]),
                    Transform::Conv1x1 => t,
                    Transform::QkvPart(i) => {
                        if shape.is_empty() || shape[0] != 3 * want[0] {
                            bail!("{file}: key {source}: shape {shape:?} is not three of {want:?} (fused q, k, v)");
                        }
                        t.narrow(0, i as i64 * want[0], want[0])
                    }
                };
                if t.size() != want {
                    bail!("{file}: key {source}: shape {shape:?} in the file, but the model ({name}) needs {want:?}");
                }
                if var.is_floating_point() && !t.is_floating_point() {
                    bail!("{file}: key {source}: stored as {:?}, not floating point", t.kind());
                }
                tch::no_grad(|| var.shallow_clone().copy_(&t));
                used.insert(key);
            }
            Ok(())
        })?;
        let unexpected: Vec<String> =
            self.state.with_prefix(part_prefix).filter(|k| !used.contains(*k) && !ignore(k)).map(str::to_string).collect();
        if !unexpected.is_empty() {
            bail!(
                "{file}: {} unexpected key(s) for the model its shapes describe: {}",
                unexpected.len(),
                crate::fs_safe::list_some(&unexpected)
            );
        }
        Ok(())
    }

    pub fn load_unet(&self, device: Device, kind: Kind) -> Result<UNet> {
        let config = self.unet_config()?;
        let unet = UNet::build(&config, device, kind, Init::Empty);
        self.load_part(&unet.vs.variables(), &unet_map(&config), UNET_PREFIX, UNET_PREFIX, &|_| false, self.options.use_ema)?;
        Ok(unet)
    }

    pub fn load_vae(&self, device: Device, kind: Kind) -> Result<Vae> {
        let config = self.vae_config()?;
        let vae = Vae::build(&config, device, kind, Init::Empty);
        let map = vae_map(&config);
        // LDM's VAE training loss (`first_stage_model.loss.*`, in a few files) is not the VAE.
        let ignore = |k: &str| k.starts_with("first_stage_model.loss.");
        self.load_part(&vae.vs.variables(), &map, VAE_PREFIX, VAE_PREFIX, &ignore, false)?;
        Ok(vae)
    }

    pub fn load_text_encoder(&self, device: Device, kind: Kind) -> Result<ClipTextEncoder> {
        let config = self.text_encoder_config()?;
        let enc = ClipTextEncoder::build(&config, device, kind, Init::Empty);
        let map = text_map(&config, self.family, &self.sd1_text_prefix);
        let last = format!("{OPEN_CLIP_PREFIX}transformer.resblocks.{}.", config.num_hidden_layers);
        let ignore = |k: &str| {
            k.ends_with("embeddings.position_ids")
                || k == "cond_stage_model.model.text_projection"
                || k == "cond_stage_model.model.logit_scale"
                || k == "cond_stage_model.model.attn_mask"
                || k.starts_with(&last)
        };
        self.load_part(&enc.vs.variables(), &map, "", self.text_prefix(), &ignore, false)?;
        Ok(enc)
    }
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

/// The VAE's tensors in LDM names (`first_stage_model.*`, attention as 1×1 convs as in the
/// original files).
pub fn vae_to_ldm(config: &VaeConfig, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    to_ldm(tensors, &vae_map(config), VAE_PREFIX)
}

/// The text encoder's tensors in LDM names: SD-1 as `cond_stage_model.transformer.text_model.*`,
/// SD-2 in OpenCLIP's names (q/k/v fused into `in_proj`); the SD-2 layer the model does not use
/// is not invented.
pub fn text_encoder_to_ldm(config: &ClipTextConfig, family: Family, tensors: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    to_ldm(tensors, &text_map(config, family, &format!("{CLIP_PREFIX}text_model.")), "")
}

/// The family of a pipeline by its text encoder: gelu and a 1024-wide context are SD-2's
/// OpenCLIP, anything else is written in SD-1's CLIP names.
pub fn family_of(config: &ClipTextConfig) -> Family {
    if config.hidden_act == Activation::Gelu {
        Family::Sd2
    } else {
        Family::Sd1
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
    let depth: Vec<String> = c.down_block_types.iter().map(|t| if *t == DownBlockKind::CrossAttn { "1" } else { "0" }.to_string()).collect();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::student::{StudentPlan, StudentSpec};

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
        let mut specs: Vec<StudentSpec> = ["bk_base", "bk_small", "bk_tiny"].iter().map(|p| StudentSpec::preset(p, 4).unwrap()).collect();
        let mut custom = StudentSpec::preset("bk_small", 4).unwrap();
        custom.down = vec![vec![0, 1], vec![0], vec![0], vec![0, 1]];
        custom.up = vec![vec![0, 1, 2], vec![0, 2], vec![0, 2], vec![0, 1, 2]];
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
            assert_eq!(names.iter().any(|n| n.starts_with("middle_block.")), spec.mid_block, "{}", spec.name);
        }
    }
}
