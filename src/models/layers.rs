//! The primitive layers every model is made of, with PyTorch's parameter names and default
//! initialisation. Constructors take a [`Builder`], which knows the parameter path and how fresh
//! parameters are filled, so the struct tree *is* the checkpoint layout.
use super::adapter::{Adapter, AdapterSites, Shape};
use std::rc::Rc;
use tch::{nn, Device, Kind, Tensor};

/// How freshly created parameters are filled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Uninitialised memory: the caller loads weights next (or only counts parameters). Pages
    /// that are never written are never touched, so building SD-1.5 this way is nearly free.
    Empty,
    /// PyTorch's defaults (kaiming-uniform(a=√5) weights, fan-in uniform biases, unit norms).
    Torch,
}

/// A parameter path plus the init policy: what candle calls a VarBuilder.
#[derive(Clone)]
pub struct Builder<'a> {
    path: nn::Path<'a>,
    init: Init,
    kind: Kind,
    /// LoRA adapters for the Linear and Conv2d layers whose names match (`models::adapter`).
    adapters: Option<Rc<AdapterSites<'a>>>,
}

impl<'a> Builder<'a> {
    /// Parameters are created on `vs`'s device with dtype `kind` (not tch's per-store kind,
    /// which can only be changed by converting every tensor after the fact).
    pub fn new(vs: &'a nn::VarStore, kind: Kind, init: Init) -> Self {
        Builder { path: vs.root(), init, kind, adapters: None }
    }

    /// This builder, giving every Linear and Conv2d below it whose dotted name `sites` targets a
    /// LoRA adapter (created in `sites`' own store).
    pub fn with_adapters(self, sites: Rc<AdapterSites<'a>>) -> Self {
        Builder { adapters: Some(sites), ..self }
    }

    /// A child path: `b.pp("down_blocks").pp(0)`. tch path segments may not contain '.', so
    /// `to_out.0` is `.pp("to_out").pp(0)`.
    pub fn pp<S: ToString>(&self, name: S) -> Builder<'a> {
        Builder { path: self.path.sub(name), init: self.init, kind: self.kind, adapters: self.adapters.clone() }
    }

    pub fn device(&self) -> Device {
        self.path.device()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The dotted name of this path, e.g. `down_blocks.2.attentions.0`.
    pub fn name(&self) -> String {
        self.path.path("").trim_end_matches('.').to_string()
    }

    /// A trainable parameter filled uniformly in ±`bound` (when initialising).
    pub fn uniform(&self, name: &str, dims: &[i64], bound: f64) -> Tensor {
        self.param(name, dims, |t| {
            let _ = t.uniform_(-bound, bound);
        })
    }

    pub fn constant(&self, name: &str, dims: &[i64], value: f64) -> Tensor {
        self.param(name, dims, |t| {
            let _ = t.fill_(value);
        })
    }

    fn param(&self, name: &str, dims: &[i64], fill: impl FnOnce(&mut Tensor)) -> Tensor {
        let mut t = Tensor::empty(dims, (self.kind(), self.device()));
        if self.init == Init::Torch {
            tch::no_grad(|| fill(&mut t));
        }
        self.path.add(name, t, true)
    }

    /// The adapter of the layer at this path, when one is targeted.
    fn adapter(&self, shape: Shape) -> Option<Adapter> {
        self.adapters.as_ref().and_then(|sites| sites.adapter(&self.name(), shape))
    }
}

/// 1/sqrt(fan_in): the bound PyTorch's default init gives both weights and biases of Linear
/// and Conv2d layers.
fn fan_in_bound(fan_in: i64) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    stride: i64,
    padding: i64,
    /// A LoRA adapter added to the output (training with `lora:`); None leaves the layer as is.
    pub lora: Option<Adapter>,
}

impl Conv2d {
    pub fn new(b: Builder, in_ch: i64, out_ch: i64, kernel: i64, stride: i64, padding: i64) -> Self {
        let bound = fan_in_bound(in_ch * kernel * kernel);
        let weight = b.uniform("weight", &[out_ch, in_ch, kernel, kernel], bound);
        let bias = Some(b.uniform("bias", &[out_ch], bound));
        let lora = b.adapter(Shape::Conv { in_ch, out_ch, kernel, stride, padding });
        Conv2d { weight, bias, stride, padding, lora }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let y = x.conv2d(
            &as_kind(&self.weight, kind),
            self.bias.as_ref().map(|b| as_kind(b, kind)).as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        match &self.lora {
            Some(a) => y + a.forward(x),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A LoRA adapter added to the output (training with `lora:`); None leaves the layer as is.
    pub lora: Option<Adapter>,
}

impl Linear {
    pub fn new(b: Builder, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let bound = fan_in_bound(in_dim);
        let weight = b.uniform("weight", &[out_dim, in_dim], bound);
        let bias = bias.then(|| b.uniform("bias", &[out_dim], bound));
        let lora = b.adapter(Shape::Linear { in_dim, out_dim });
        Linear { weight, bias, lora }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let y = x.linear(&as_kind(&self.weight, kind), self.bias.as_ref().map(|b| as_kind(b, kind)).as_ref());
        match &self.lora {
            Some(a) => y + a.forward(x),
            None => y,
        }
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(b: Builder, groups: i64, channels: i64, eps: f64) -> Self {
        assert!(
            channels % groups == 0,
            "GroupNorm at {}: {channels} channels are not divisible into {groups} groups",
            b.name()
        );
        let weight = b.constant("weight", &[channels], 1.0);
        let bias = b.constant("bias", &[channels], 0.0);
        GroupNorm { weight, bias, groups, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        as_kind(x, self.weight.kind())
            .group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps, true)
            .to_kind(kind)
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(b: Builder, dim: i64, eps: f64) -> Self {
        let weight = b.constant("weight", &[dim], 1.0);
        let bias = b.constant("bias", &[dim], 0.0);
        LayerNorm { weight, bias, dim, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        as_kind(x, self.weight.kind())
            .layer_norm([self.dim], Some(&self.weight), Some(&self.bias), self.eps, true)
            .to_kind(kind)
    }
}

/// `t` in dtype `kind`: itself when it already is, else a differentiable cast.
fn as_kind(t: &Tensor, kind: Kind) -> Tensor {
    if t.kind() == kind {
        t.shallow_clone()
    } else {
        t.to_kind(kind)
    }
}

/// Total number of elements over a set of tensors.
pub fn count_params<'t>(tensors: impl IntoIterator<Item = &'t Tensor>) -> i64 {
    tensors.into_iter().map(|t| t.numel() as i64).sum()
}

impl Builder<'_> {
    /// A trainable parameter drawn from N(`mean`, `std`²) (when initialising).
    pub fn normal(&self, name: &str, dims: &[i64], mean: f64, std: f64) -> Tensor {
        self.param(name, dims, |t| {
            let _ = t.normal_(mean, std);
        })
    }
}

/// A lookup table (`nn.Embedding`): `weight` is (num_embeddings, dim), N(0, 1) by default.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(b: Builder, num_embeddings: i64, dim: i64) -> Self {
        Embedding { weight: b.normal("weight", &[num_embeddings, dim], 0.0, 1.0) }
    }

    /// `ids`: int64 of any shape -> (..., dim).
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}
