//! LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") inside
//! the layers they adapt, as PEFT's `LoraLayer`: a Linear gains `lora_A` (rank × in) and
//! `lora_B` (out × rank); a Conv2d a k×k `lora_A` conv with the layer's stride and padding and
//! a 1×1 `lora_B` conv. The output is `base(x) + B(A(dropout(x)))·alpha/rank`.
//!
//! They are made while a UNet is built (`Builder::with_adapters`): every Linear and Conv2d whose
//! dotted name a target matches gets one, its two weights in a VarStore of their own named
//! `<module>.lora_A.weight` / `<module>.lora_B.weight` (PEFT's names without its adapter name),
//! so the base's VarStore is untouched and can be frozen whole. Init is PEFT's default
//! (`init_lora_weights=True`): A Kaiming-uniform with a = √5 (bound 1/√fan_in, PyTorch's
//! default for a layer's weight), B zero, so a fresh adapter leaves the output unchanged.
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use tch::{nn, Kind, Tensor};

/// How a fresh adapter's A is drawn (B is zero either way), as PEFT's `init_lora_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterInit {
    /// PEFT's default (`True`): Kaiming-uniform with a = √5, bound 1/√fan_in.
    #[default]
    Kaiming,
    /// PEFT's `"gaussian"`: N(0, (1/rank)²).
    Gaussian,
}

/// What adapters to make: PEFT's `LoraConfig` fields that shape the layers.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub init: AdapterInit,
    /// Module-name patterns, as PEFT matches a list of `target_modules`: a layer is targeted
    /// when its dotted name equals a pattern or ends with `.` + the pattern.
    pub targets: Vec<String>,
}

impl AdapterSpec {
    /// The index of the first target matching the dotted layer name `name`.
    pub fn target_of(&self, name: &str) -> Option<usize> {
        self.targets.iter().position(|t| name == t || name.strip_suffix(t.as_str()).is_some_and(|rest| rest.ends_with('.')))
    }
}

/// The adapted layer's geometry.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    Linear { in_dim: i64, out_dim: i64 },
    Conv { in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64 },
}

/// One layer's adapter: `B(A(dropout(x)))·scale`.
#[derive(Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    /// alpha / rank.
    pub scale: f64,
    dropout: f64,
    /// Conv adapters' (stride, padding) of the k×k down conv; None for Linear.
    conv: Option<(i64, i64)>,
}

impl Adapter {
    /// The adapter's contribution to the layer's output for input `x`, in `x`'s dtype. Dropout
    /// acts only while gradients are recorded (training), as PEFT's in `train()` mode.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let (down, up) = (as_kind(&self.down, kind), as_kind(&self.up, kind));
        let x = if self.dropout > 0.0 && grad_mode() { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let h = match self.conv {
            None => x.linear::<&Tensor>(&down, None).linear::<&Tensor>(&up, None),
            Some((stride, padding)) => {
                x.conv2d::<&Tensor>(&down, None, [stride, stride], [padding, padding], [1, 1], 1).conv2d::<&Tensor>(&up, None, [1, 1], [0, 0], [1, 1], 1)
            }
        };
        h * self.scale
    }
}

/// `t` in dtype `kind` (a differentiable cast when it is not), as the layers cast their weights.
fn as_kind(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// Whether autograd records operations here (tch has no getter: an op on a leaf that requires
/// grad tells).
fn grad_mode() -> bool {
    let probe = Tensor::zeros([], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (&probe * 1.0).requires_grad()
}

/// Where a model's adapters are made while it is built: the adapters' VarStore path, the spec,
/// and what matched (checked by `finish` once the model is built).
pub struct AdapterSites<'a> {
    root: nn::Path<'a>,
    spec: AdapterSpec,
    /// Per target: the layers it matched.
    matched: RefCell<Vec<Vec<String>>>,
    /// The first layer the rank does not fit.
    too_small: RefCell<Option<String>>,
}

impl<'a> AdapterSites<'a> {
    pub fn new(store: &'a nn::VarStore, spec: AdapterSpec) -> AdapterSites<'a> {
        let matched = RefCell::new(vec![vec![]; spec.targets.len()]);
        AdapterSites { root: store.root(), spec, matched, too_small: RefCell::new(None) }
    }

    /// The adapter for the layer `name` of `shape`, when a target matches it and the rank fits
    /// (else the first misfit is kept for `finish`).
    pub fn adapter(&self, name: &str, shape: Shape) -> Option<Adapter> {
        let target = self.spec.target_of(name)?;
        self.matched.borrow_mut()[target].push(name.to_string());
        let r = self.spec.rank;
        let (in_features, out_features, down_dims, up_dims, conv) = match shape {
            Shape::Linear { in_dim, out_dim } => (in_dim, out_dim, vec![r, in_dim], vec![out_dim, r], None),
            Shape::Conv { in_ch, out_ch, kernel, stride, padding } => {
                (in_ch * kernel * kernel, out_ch, vec![r, in_ch, kernel, kernel], vec![out_ch, r, 1, 1], Some((stride, padding)))
            }
        };
        if r > in_features.min(out_features) {
            let mut first = self.too_small.borrow_mut();
            first.get_or_insert_with(|| format!("{name} ({in_features} in, {out_features} out)"));
            return None;
        }
        let path = name.split('.').fold(self.root.clone(), |p, seg| p.sub(seg));
        let device = path.device();
        let mut down = Tensor::empty(&down_dims, (Kind::Float, device));
        let bound = 1.0 / (in_features as f64).sqrt();
        let _ = tch::no_grad(|| match self.spec.init {
            AdapterInit::Kaiming => down.uniform_(-bound, bound),
            AdapterInit::Gaussian => down.normal_(0.0, 1.0 / r as f64),
        });
        let up = Tensor::zeros(&up_dims, (Kind::Float, device));
        let down = path.sub("lora_A").add("weight", down, true);
        let up = path.sub("lora_B").add("weight", up, true);
        Some(Adapter { down, up, scale: self.spec.alpha / r as f64, dropout: self.spec.dropout, conv })
    }

    /// After the build: an error naming the target that matched no layer, or the first layer
    /// the rank exceeds; else the adapted layers' names, in build order.
    pub fn finish(&self) -> Result<Vec<String>, String> {
        let matched = self.matched.borrow();
        if let Some(i) = matched.iter().position(Vec::is_empty) {
            return Err(format!("lora.targets[{i}] = {:?} matches no Linear or Conv2d layer of the UNet", self.spec.targets[i]));
        }
        if let Some(layer) = self.too_small.borrow().as_ref() {
            return Err(format!("lora.rank = {} is larger than layer {layer}: the rank must be at most the smaller of its two sides", self.spec.rank));
        }
        let mut names: Vec<String> = matched.iter().flatten().cloned().collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_as_peft_lists_do() {
        let spec = AdapterSpec { rank: 1, alpha: 1.0, dropout: 0.0, init: AdapterInit::Kaiming, targets: vec!["to_q".into(), "downsamplers.0.conv".into(), "conv1".into()] };
        assert_eq!(spec.target_of("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), Some(0));
        assert_eq!(spec.target_of("down_blocks.1.downsamplers.0.conv"), Some(1));
        assert_eq!(spec.target_of("down_blocks.1.resnets.0.conv1"), Some(2));
        assert_eq!(spec.target_of("to_q"), Some(0));
        assert_eq!(spec.target_of("down_blocks.1.resnets.0.xconv1"), None);
        assert_eq!(spec.target_of("conv_in"), None);
    }
}
