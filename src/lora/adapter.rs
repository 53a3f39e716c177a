//! One low-rank adapter: A (down), B (up) and alpha, and the weight delta it adds.
use anyhow::{bail, ensure, Result};
use tch::{Kind, Tensor};

/// The adapter of one linear or conv layer. `down` is A: `[r, in]` for a linear, `[r, in, kh,
/// kw]` for a conv (a k×k conv to r channels, PEFT's and kohya's conv LoRA); `up` is B:
/// `[out, r]` or `[out, r, 1, 1]` (a 1×1 conv). The layer's weight gains `alpha/r · B·A`.
#[derive(Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

impl Adapter {
    pub fn new(down: Tensor, up: Tensor, alpha: f64) -> Self {
        Adapter { down, up, alpha }
    }

    pub fn rank(&self) -> i64 {
        self.down.size().first().copied().unwrap_or(0)
    }

    /// `alpha / r`, PEFT's `scaling` (without rsLoRA).
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    pub fn parameters(&self) -> i64 {
        (self.down.numel() + self.up.numel()) as i64
    }

    /// Shapes that pair (a floating A of rank r ≥ 1, a B of the same rank, a 1×1 B for a conv)
    /// and finite values, alpha included.
    pub fn check(&self) -> Result<()> {
        let (d, u) = (self.down.size(), self.up.size());
        ensure!(self.down.is_floating_point() && self.up.is_floating_point(), "A and B must be floating point, not {:?}/{:?}", self.down.kind(), self.up.kind());
        match (d.len(), u.len()) {
            (2, 2) => {}
            (4, 4) if u[2] == 1 && u[3] == 1 => {}
            (4, 4) => bail!("B has shape {u:?}: a conv adapter's up matrix is a 1×1 conv [out, r, 1, 1]"),
            _ => bail!("A {d:?} and B {u:?}: a LoRA pairs [r, in] with [out, r] (linear) or [r, in, kh, kw] with [out, r, 1, 1] (conv)"),
        }
        ensure!(d[0] >= 1, "rank 0 (A has shape {d:?})");
        ensure!(u[1] == d[0], "A {d:?} has rank {} but B {u:?} has rank {}", d[0], u[1]);
        ensure!(self.alpha.is_finite(), "alpha is {}", self.alpha);
        for (name, t) in [("A", &self.down), ("B", &self.up)] {
            let finite = t.isfinite().all().int64_value(&[]) == 1;
            ensure!(finite, "{name} holds NaN or infinite values");
        }
        Ok(())
    }

    /// The shape of the weight this adapter fits: `[out, in]` or `[out, in, kh, kw]`.
    pub fn weight_shape(&self) -> Vec<i64> {
        let (d, u) = (self.down.size(), self.up.size());
        let mut shape = vec![u[0], d[1]];
        shape.extend_from_slice(&d[2..]);
        shape
    }

    /// `scale · alpha/r · B·A` in fp32 on `device`, computed as PEFT's `get_delta_weight`
    /// computes it (so fusing gives diffusers' `fuse_lora` weights bit for bit on the CPU in
    /// fp32): `B @ A` for a linear and a 1×1 conv, `conv2d(Aᵀ, B)ᵀ` for a k×k conv, then times
    /// `(alpha / r) · scale`, multiplied in f64 first as PEFT's `scale_layer` does.
    pub fn delta(&self, scale: f64, device: tch::Device) -> Tensor {
        let a = self.down.to_device(device).to_kind(Kind::Float);
        let b = self.up.to_device(device).to_kind(Kind::Float);
        let scaling = self.scaling() * scale;
        if a.dim() == 2 {
            return b.matmul(&a) * scaling;
        }
        let (kh, kw) = (a.size()[2], a.size()[3]);
        if kh == 1 && kw == 1 {
            (b.squeeze_dim(3).squeeze_dim(2).matmul(&a.squeeze_dim(3).squeeze_dim(2))).unsqueeze(2).unsqueeze(3) * scaling
        } else {
            a.transpose(0, 1).conv2d::<&Tensor>(&b, None, [1, 1], [0, 0], [1, 1], 1).transpose(0, 1) * scaling
        }
    }
}
