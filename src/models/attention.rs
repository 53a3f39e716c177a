//! diffusers' `Attention` (scaled dot-product), the GEGLU `FeedForward`, `BasicTransformerBlock`
//! and `Transformer2DModel` (the spatial transformer of the cross-attention blocks).
use super::layers::{Builder, Conv2d, GroupNorm, LayerNorm, Linear};
use tch::{Kind, Tensor};

#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: i64,
    upcast: bool,
}

impl Attention {
    /// `context_dim` is the width of what is attended to: `query_dim` for self-attention, the
    /// text encoder's width for cross-attention.
    pub fn new(b: Builder, query_dim: i64, context_dim: i64, heads: i64, head_dim: i64, upcast: bool) -> Self {
        let inner = heads * head_dim;
        Attention {
            to_q: Linear::new(b.pp("to_q"), query_dim, inner, false),
            to_k: Linear::new(b.pp("to_k"), context_dim, inner, false),
            to_v: Linear::new(b.pp("to_v"), context_dim, inner, false),
            to_out: Linear::new(b.pp("to_out").pp(0), inner, query_dim, true),
            heads,
            upcast,
        }
    }

    /// `x`: (b, n, query_dim); `context`: (b, m, context_dim) or None for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let context = context.unwrap_or(x);
        let (b, n, _) = x.size3().expect("attention input must be (batch, tokens, channels)");
        let split = |t: Tensor| t.view([b, -1, self.heads, t.size()[2] / self.heads]).transpose(1, 2); // (b, heads, n, d)
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(context));
        let v = split(self.to_v.forward(context));
        let kind = q.kind();
        // upcast_attention: SD-2.x overflows fp16 in the softmax; compute it in fp32.
        let (q, k, v) = if self.upcast && kind != Kind::Float {
            (q.to_kind(Kind::Float), k.to_kind(Kind::Float), v.to_kind(Kind::Float))
        } else {
            (q, k, v)
        };
        let out = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, None, false)
            .to_kind(kind)
            .transpose(1, 2)
            .reshape([b, n, -1]); // (b, n, heads * d)
        self.to_out.forward(&out)
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` (dim -> 2·inner), gelu gate, `net.2` (inner -> dim).
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    pub fn new(b: Builder, dim: i64) -> Self {
        let inner = dim * 4;
        FeedForward {
            proj: Linear::new(b.pp("net").pp(0).pp("proj"), dim, inner * 2, true),
            out: Linear::new(b.pp("net").pp(2), inner, dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj.forward(x).chunk(2, -1);
        self.out.forward(&(&h[0] * h[1].gelu("none")))
    }
}

#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(b: Builder, dim: i64, heads: i64, head_dim: i64, context_dim: i64, upcast: bool) -> Self {
        BasicTransformerBlock {
            norm1: LayerNorm::new(b.pp("norm1"), dim, 1e-5),
            attn1: Attention::new(b.pp("attn1"), dim, dim, heads, head_dim, upcast),
            norm2: LayerNorm::new(b.pp("norm2"), dim, 1e-5),
            attn2: Attention::new(b.pp("attn2"), dim, context_dim, heads, head_dim, upcast),
            norm3: LayerNorm::new(b.pp("norm3"), dim, 1e-5),
            ff: FeedForward::new(b.pp("ff"), dim),
        }
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        self.forward_parts(x, context).0
    }

    /// The block's output and its self-attention's (`attn1`, before the residual: what a forward
    /// hook on diffusers' `attn1` sees).
    pub fn forward_parts(&self, x: &Tensor, context: &Tensor) -> (Tensor, Tensor) {
        let attn1 = self.attn1.forward(&self.norm1.forward(x), None);
        let x = &attn1 + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        (self.ff.forward(&self.norm3.forward(&x)) + x, attn1)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub heads: i64,
    pub context_dim: i64,
    pub groups: i64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// `BasicTransformerBlock`s in the spatial transformer (`transformer_layers_per_block`).
    pub depth: i64,
}

#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(b: Builder, linear: bool, in_dim: i64, out_dim: i64) -> Self {
        if linear {
            Projection::Linear(Linear::new(b, in_dim, out_dim, true))
        } else {
            Projection::Conv(Conv2d::new(b, in_dim, out_dim, 1, 1, 0))
        }
    }
}

/// What a spatial transformer computes: its output and its `proj_out` output (BK-SDM-Tiny
/// distils `attentions.*.proj_out`), (b, c, h, w) for conv projections, (b, hw, c) for linear.
pub struct TransformerOutput {
    pub hidden: Tensor,
    pub proj_out: Tensor,
    /// Each transformer block's `attn1` output (b, hw, c), when asked for (else empty).
    pub attn1: Vec<Tensor>,
}

#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(b: Builder, channels: i64, cfg: &TransformerConfig) -> Self {
        let head_dim = channels / cfg.heads;
        let inner = cfg.heads * head_dim;
        let lin = cfg.use_linear_projection;
        Transformer2DModel {
            norm: GroupNorm::new(b.pp("norm"), cfg.groups, channels, 1e-6),
            proj_in: Projection::new(b.pp("proj_in"), lin, channels, inner),
            transformer_blocks: (0..cfg.depth)
                .map(|i| {
                    let b = b.pp("transformer_blocks").pp(i);
                    BasicTransformerBlock::new(b, inner, cfg.heads, head_dim, cfg.context_dim, cfg.upcast_attention)
                })
                .collect(),
            proj_out: Projection::new(b.pp("proj_out"), lin, inner, channels),
        }
    }

    /// `x`: (b, c, h, w); `context`: (b, m, context_dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> TransformerOutput {
        self.forward_taps(x, context, false)
    }

    /// `forward`, with every block's `attn1` output when `attn1` (self-attention feature KD).
    pub fn forward_taps(&self, x: &Tensor, context: &Tensor, attn1: bool) -> TransformerOutput {
        let (b, c, h, w) = x.size4().expect("transformer input must be (b, c, h, w)");
        let normed = self.norm.forward(x);
        let to_tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, -1]); // (b, hw, c)
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)),
            Projection::Linear(lin) => lin.forward(&to_tokens(normed)),
        };
        let mut attn1_outs = vec![];
        for block in &self.transformer_blocks {
            if attn1 {
                let (out, a) = block.forward_parts(&tokens, context);
                attn1_outs.push(a);
                tokens = out;
            } else {
                tokens = block.forward(&tokens, context);
            }
        }
        let to_image = |t: &Tensor| t.reshape([b, h, w, -1]).permute([0, 3, 1, 2]).contiguous(); // (b, c, h, w)
        let (proj_out, spatial) = match &self.proj_out {
            Projection::Conv(conv) => {
                let p = conv.forward(&to_image(&tokens));
                (p.shallow_clone(), p)
            }
            Projection::Linear(lin) => {
                let p = lin.forward(&tokens);
                let s = to_image(&p);
                (p, s)
            }
        };
        debug_assert_eq!(spatial.size()[1], c);
        TransformerOutput { hidden: spatial + x, proj_out, attn1: attn1_outs }
    }
}
