//! The TF-ported Inception-v3 of FID and IS ("pt_inception-2015-12-05"), as pytorch-fid's
//! `InceptionV3` with the `FIDInceptionA/C/E` blocks and torch-fidelity's `inception-v3-compat`
//! build it: torchvision's module names (so both published `.pth` files load as they are),
//! 1008 logits, and the TF graph's pooling quirks (average pools that do not count padding, a
//! max pool in the last block).
//!
//! Two front-ends, one network: pytorch-fid scales bytes to [0, 1], resizes to 299² with
//! `F.interpolate(bilinear, align_corners=False)` and maps to [-1, 1]; torch-fidelity resizes the
//! raw byte values with TensorFlow 1.x's bilinear rule and maps with (x - 128) / 128.
use crate::torch_pickle;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Where users get the weights sdkd reads (no download here).
pub const WEIGHTS_HELP: &str = "pytorch-fid's pt_inception-2015-12-05-6726825d.pth \
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth) \
or torch-fidelity's weights-inception-2015-12-05-6726825d.pth \
(https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth); \
pass it with --inception";

/// The feature dimensions pytorch-fid offers (`--dims`): the first and second max pools, the
/// input of the auxiliary classifier, the final average pool.
pub const DIMS: [i64; 4] = [64, 192, 768, 2048];

/// conv (no bias) + eval-mode batch norm (eps 0.001) + ReLU: torchvision's `BasicConv2d`.
struct BasicConv {
    weight: Tensor,
    bn: [Tensor; 4], // weight, bias, running_mean, running_var
    stride: [i64; 2],
    padding: [i64; 2],
}

impl BasicConv {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.conv2d(&self.weight, None::<Tensor>, self.stride, self.padding, [1, 1], 1);
        let [w, b, m, v] = &self.bn;
        y.batch_norm(Some(w), Some(b), Some(m), Some(v), false, 0.1, 1e-3, true).relu()
    }
}

/// Reads the tensors of one layer out of the state dict, checking names and shapes.
struct Weights {
    map: HashMap<String, Tensor>,
    device: Device,
}

impl Weights {
    fn take(&mut self, name: &str, shape: &[i64]) -> Result<Tensor> {
        let t = self.map.remove(name).ok_or_else(|| anyhow!("the weights lack {name}"))?;
        if t.size() != shape {
            bail!("{name} has shape {:?}, the Inception-v3 of FID has {shape:?}", t.size());
        }
        if !matches!(t.kind(), Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double) {
            bail!("{name} holds {:?}, not floating-point weights", t.kind());
        }
        Ok(t.to_kind(Kind::Float).contiguous().to_device(self.device))
    }

    fn conv(&mut self, name: &str, cin: i64, cout: i64, k: [i64; 2], stride: i64, padding: [i64; 2]) -> Result<BasicConv> {
        let weight = self.take(&format!("{name}.conv.weight"), &[cout, cin, k[0], k[1]])?;
        let mut bn = |p: &str| self.take(&format!("{name}.bn.{p}"), &[cout]);
        let bn = [bn("weight")?, bn("bias")?, bn("running_mean")?, bn("running_var")?];
        self.map.remove(&format!("{name}.bn.num_batches_tracked"));
        Ok(BasicConv { weight, bn, stride: [stride, stride], padding })
    }
}

fn sq(k: i64) -> [i64; 2] {
    [k, k]
}

/// The average pool of the TF graph: 3x3, stride 1, padding 1, padding not counted.
fn tf_avg_pool(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None::<i64>)
}

fn max_pool(x: &Tensor, stride: i64, padding: i64) -> Tensor {
    x.max_pool2d([3, 3], [stride, stride], [padding, padding], [1, 1], false)
}

/// The double 3×3 branch of Inception blocks A and B: 1×1 to 64, 3×3 to 96, 3×3 to 96 with the
/// block's last stride and padding.
fn branch3x3dbl(w: &mut Weights, n: &str, cin: i64, stride: i64, padding: i64) -> Result<[BasicConv; 3]> {
    Ok([
        w.conv(&format!("{n}.branch3x3dbl_1"), cin, 64, sq(1), 1, sq(0))?,
        w.conv(&format!("{n}.branch3x3dbl_2"), 64, 96, sq(3), 1, sq(1))?,
        w.conv(&format!("{n}.branch3x3dbl_3"), 96, 96, sq(3), stride, sq(padding))?,
    ])
}

/// Inception blocks A (Mixed_5b-d) and C (Mixed_6b-e): a 1×1 branch, two chains of convolutions
/// and a pooled 1×1 branch, concatenated; the two kinds differ only in their chains.
struct FourBranch {
    b1: BasicConv,
    chains: [Vec<BasicConv>; 2],
    pool: BasicConv,
}

impl FourBranch {
    /// Block A: a 5×5 chain and the double 3×3 chain.
    fn block_a(w: &mut Weights, n: &str, cin: i64, pool_features: i64) -> Result<Self> {
        Ok(FourBranch {
            b1: w.conv(&format!("{n}.branch1x1"), cin, 64, sq(1), 1, sq(0))?,
            chains: [
                vec![w.conv(&format!("{n}.branch5x5_1"), cin, 48, sq(1), 1, sq(0))?, w.conv(&format!("{n}.branch5x5_2"), 48, 64, sq(5), 1, sq(2))?],
                branch3x3dbl(w, n, cin, 1, 1)?.into(),
            ],
            pool: w.conv(&format!("{n}.branch_pool"), cin, pool_features, sq(1), 1, sq(0))?,
        })
    }

    /// Block C: factorised 7×7 chains (1×7 and 7×1) of width `c7`.
    fn block_c(w: &mut Weights, n: &str, cin: i64, c7: i64) -> Result<Self> {
        let (r, c) = ([1, 7], [7, 1]);
        let (pr, pc) = ([0, 3], [3, 0]);
        Ok(FourBranch {
            b1: w.conv(&format!("{n}.branch1x1"), cin, 192, sq(1), 1, sq(0))?,
            chains: [
                vec![
                    w.conv(&format!("{n}.branch7x7_1"), cin, c7, sq(1), 1, sq(0))?,
                    w.conv(&format!("{n}.branch7x7_2"), c7, c7, r, 1, pr)?,
                    w.conv(&format!("{n}.branch7x7_3"), c7, 192, c, 1, pc)?,
                ],
                vec![
                    w.conv(&format!("{n}.branch7x7dbl_1"), cin, c7, sq(1), 1, sq(0))?,
                    w.conv(&format!("{n}.branch7x7dbl_2"), c7, c7, c, 1, pc)?,
                    w.conv(&format!("{n}.branch7x7dbl_3"), c7, c7, r, 1, pr)?,
                    w.conv(&format!("{n}.branch7x7dbl_4"), c7, c7, c, 1, pc)?,
                    w.conv(&format!("{n}.branch7x7dbl_5"), c7, 192, r, 1, pr)?,
                ],
            ],
            pool: w.conv(&format!("{n}.branch_pool"), cin, 192, sq(1), 1, sq(0))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.b1.forward(x);
        let [a, b] = &self.chains;
        let bp = self.pool.forward(&tf_avg_pool(x));
        Tensor::cat(&[b1, chain(a, x), chain(b, x), bp], 1)
    }
}

/// Convolutions applied one after the other.
fn chain(convs: &[BasicConv], x: &Tensor) -> Tensor {
    convs.iter().fold(x.shallow_clone(), |y, c| c.forward(&y))
}

struct BlockB {
    b3: BasicConv,
    dbl: [BasicConv; 3],
}

impl BlockB {
    fn new(w: &mut Weights, n: &str, cin: i64) -> Result<Self> {
        Ok(BlockB {
            b3: w.conv(&format!("{n}.branch3x3"), cin, 384, sq(3), 2, sq(0))?,
            dbl: branch3x3dbl(w, n, cin, 2, 0)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = self.b3.forward(x);
        let dbl = chain(&self.dbl, x);
        Tensor::cat(&[b3, dbl, max_pool(x, 2, 0)], 1)
    }
}

struct BlockD {
    b3: [BasicConv; 2],
    b7: [BasicConv; 4],
}

impl BlockD {
    fn new(w: &mut Weights, n: &str, cin: i64) -> Result<Self> {
        Ok(BlockD {
            b3: [
                w.conv(&format!("{n}.branch3x3_1"), cin, 192, sq(1), 1, sq(0))?,
                w.conv(&format!("{n}.branch3x3_2"), 192, 320, sq(3), 2, sq(0))?,
            ],
            b7: [
                w.conv(&format!("{n}.branch7x7x3_1"), cin, 192, sq(1), 1, sq(0))?,
                w.conv(&format!("{n}.branch7x7x3_2"), 192, 192, [1, 7], 1, [0, 3])?,
                w.conv(&format!("{n}.branch7x7x3_3"), 192, 192, [7, 1], 1, [3, 0])?,
                w.conv(&format!("{n}.branch7x7x3_4"), 192, 192, sq(3), 2, sq(0))?,
            ],
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let b3 = chain(&self.b3, x);
        let b7 = chain(&self.b7, x);
        Tensor::cat(&[b3, b7, max_pool(x, 2, 0)], 1)
    }
}

struct BlockE {
    b1: BasicConv,
    b3_1: BasicConv,
    b3_2: [BasicConv; 2],
    dbl_1: [BasicConv; 2],
    dbl_3: [BasicConv; 2],
    pool: BasicConv,
    /// Mixed_7c pools with max (the TF graph's quirk), Mixed_7b with the uncounted average.
    max_pool: bool,
}

impl BlockE {
    fn new(w: &mut Weights, n: &str, cin: i64, max_pool: bool) -> Result<Self> {
        let (r, c) = ([1, 3], [3, 1]);
        Ok(BlockE {
            b1: w.conv(&format!("{n}.branch1x1"), cin, 320, sq(1), 1, sq(0))?,
            b3_1: w.conv(&format!("{n}.branch3x3_1"), cin, 384, sq(1), 1, sq(0))?,
            b3_2: [w.conv(&format!("{n}.branch3x3_2a"), 384, 384, r, 1, [0, 1])?, w.conv(&format!("{n}.branch3x3_2b"), 384, 384, c, 1, [1, 0])?],
            dbl_1: [
                w.conv(&format!("{n}.branch3x3dbl_1"), cin, 448, sq(1), 1, sq(0))?,
                w.conv(&format!("{n}.branch3x3dbl_2"), 448, 384, sq(3), 1, sq(1))?,
            ],
            dbl_3: [
                w.conv(&format!("{n}.branch3x3dbl_3a"), 384, 384, r, 1, [0, 1])?,
                w.conv(&format!("{n}.branch3x3dbl_3b"), 384, 384, c, 1, [1, 0])?,
            ],
            pool: w.conv(&format!("{n}.branch_pool"), cin, 192, sq(1), 1, sq(0))?,
            max_pool,
        })
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let b1 = self.b1.forward(x);
        let b3 = self.b3_1.forward(x);
        let b3 = Tensor::cat(&[self.b3_2[0].forward(&b3), self.b3_2[1].forward(&b3)], 1);
        let dbl = self.dbl_1[1].forward(&self.dbl_1[0].forward(x));
        let dbl = Tensor::cat(&[self.dbl_3[0].forward(&dbl), self.dbl_3[1].forward(&dbl)], 1);
        let pooled = if self.max_pool { max_pool(x, 1, 1) } else { tf_avg_pool(x) };
        Tensor::cat(&[b1, b3, dbl, self.pool.forward(&pooled)], 1)
    }
}

/// The network, loaded from a published weights file.
pub struct InceptionV3 {
    stem: [BasicConv; 3],
    stem2: [BasicConv; 2],
    mixed_5: [FourBranch; 3],
    mixed_6a: BlockB,
    mixed_6: [FourBranch; 4],
    mixed_7a: BlockD,
    mixed_7: [BlockE; 2],
    fc_weight: Tensor,
    fc_bias: Tensor,
    device: Device,
}

/// What one forward pass gives for each image.
pub struct Features {
    /// (N, dims) float32: the block pytorch-fid's `--dims` selects, average-pooled.
    pub pool: Tensor,
    /// (N, 1008) float32 logits without the bias (torch-fidelity's `logits_unbiased`, what IS
    /// uses), when the pass went to the end.
    pub logits_unbiased: Option<Tensor>,
}

impl InceptionV3 {
    /// Loads `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's copy: the same layout).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        if !path.exists() {
            bail!("the Inception weights file {} does not exist; sdkd needs {WEIGHTS_HELP}", path.display());
        }
        let tensors = torch_pickle::load_state_dict(path)
            .with_context(|| format!("the Inception weights file {} is unreadable; sdkd needs {WEIGHTS_HELP}", path.display()))?;
        Self::from_tensors(tensors, device).with_context(|| format!("{} is not the FID Inception-v3 ({WEIGHTS_HELP})", path.display()))
    }

    pub fn from_tensors(tensors: Vec<(String, Tensor)>, device: Device) -> Result<Self> {
        let mut w = Weights { map: tensors.into_iter().collect(), device };
        let net = InceptionV3 {
            stem: [
                w.conv("Conv2d_1a_3x3", 3, 32, sq(3), 2, sq(0))?,
                w.conv("Conv2d_2a_3x3", 32, 32, sq(3), 1, sq(0))?,
                w.conv("Conv2d_2b_3x3", 32, 64, sq(3), 1, sq(1))?,
            ],
            stem2: [w.conv("Conv2d_3b_1x1", 64, 80, sq(1), 1, sq(0))?, w.conv("Conv2d_4a_3x3", 80, 192, sq(3), 1, sq(0))?],
            mixed_5: [
                FourBranch::block_a(&mut w, "Mixed_5b", 192, 32)?,
                FourBranch::block_a(&mut w, "Mixed_5c", 256, 64)?,
                FourBranch::block_a(&mut w, "Mixed_5d", 288, 64)?,
            ],
            mixed_6a: BlockB::new(&mut w, "Mixed_6a", 288)?,
            mixed_6: [
                FourBranch::block_c(&mut w, "Mixed_6b", 768, 128)?,
                FourBranch::block_c(&mut w, "Mixed_6c", 768, 160)?,
                FourBranch::block_c(&mut w, "Mixed_6d", 768, 160)?,
                FourBranch::block_c(&mut w, "Mixed_6e", 768, 192)?,
            ],
            mixed_7a: BlockD::new(&mut w, "Mixed_7a", 768)?,
            mixed_7: [BlockE::new(&mut w, "Mixed_7b", 1280, false)?, BlockE::new(&mut w, "Mixed_7c", 2048, true)?],
            fc_weight: w.take("fc.weight", &[1008, 2048])?,
            fc_bias: w.take("fc.bias", &[1008])?,
            device,
        };
        if let Some(extra) = w.map.keys().min() {
            bail!("unexpected tensor {extra} (and {} more): not the FID Inception-v3's layout", w.map.len() - 1);
        }
        Ok(net)
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The network on an input already at 299² in [-1, 1]: the `dims` features and, for 2048,
    /// the unbiased logits too.
    pub fn forward(&self, x: &Tensor, dims: i64) -> Result<Features> {
        if !DIMS.contains(&dims) {
            bail!("--dims {dims}: pytorch-fid's Inception offers 64, 192, 768 or 2048");
        }
        let _guard = tch::no_grad_guard();
        let pool = |t: &Tensor| t.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        let mut x = chain(&self.stem, x);
        x = max_pool(&x, 2, 0);
        if dims == 64 {
            return Ok(Features { pool: pool(&x), logits_unbiased: None });
        }
        x = self.stem2.iter().fold(x, |y, c| c.forward(&y));
        x = max_pool(&x, 2, 0);
        if dims == 192 {
            return Ok(Features { pool: pool(&x), logits_unbiased: None });
        }
        x = self.mixed_5.iter().fold(x, |y, b| b.forward(&y));
        x = self.mixed_6a.forward(&x);
        x = self.mixed_6.iter().fold(x, |y, b| b.forward(&y));
        if dims == 768 {
            return Ok(Features { pool: pool(&x), logits_unbiased: None });
        }
        x = self.mixed_7a.forward(&x);
        x = self.mixed_7.iter().fold(x, |y, b| b.forward(&y));
        let pool3 = pool(&x);
        let logits = pool3.mm(&self.fc_weight.tr());
        Ok(Features { pool: pool3, logits_unbiased: Some(logits) })
    }

    /// The biased logits (`fc`), for whoever wants class predictions.
    pub fn logits(&self, logits_unbiased: &Tensor) -> Tensor {
        logits_unbiased + self.fc_bias.unsqueeze(0)
    }
}

/// pytorch-fid's input: (N, 3, H, W) bytes → [0, 1] → `F.interpolate(299², bilinear,
/// align_corners=False)` → 2x - 1.
pub fn pytorch_fid_input(images: &Tensor) -> Tensor {
    let x = images.to_kind(Kind::Float) / 255.0;
    let x = x.upsample_bilinear2d([299, 299], false, None, None);
    x * 2.0 - 1.0
}

/// torch-fidelity's input: (N, 3, H, W) bytes as floats, resized to 299² with TensorFlow 1.x's
/// bilinear rule (source = destination · in/out, no half-pixel shift), then (x - 128) / 128.
pub fn torch_fidelity_input(images: &Tensor) -> Tensor {
    let x = images.to_kind(Kind::Float);
    let (h, w) = (x.size()[2], x.size()[3]);
    let grid = |n_in: i64| {
        let scale = n_in as f64 / 299.0;
        let g = Tensor::arange_start_step(0, 299, 1, (Kind::Float, x.device())) * Tensor::from(scale as f32).to_device(x.device());
        let lo = g.to_kind(Kind::Int64);
        let hi = (&lo + 1).clamp_max(n_in - 1);
        let d = g - lo.to_kind(Kind::Float);
        (lo, hi, d)
    };
    let (xlo, xhi, dx) = grid(w);
    let (ylo, yhi, dy) = grid(h);
    let rows_lo = x.index_select(2, &ylo);
    let rows_hi = x.index_select(2, &yhi);
    let (in00, in01) = (rows_lo.index_select(3, &xlo), rows_lo.index_select(3, &xhi));
    let (in10, in11) = (rows_hi.index_select(3, &xlo), rows_hi.index_select(3, &xhi));
    let dx = dx.view([1, 1, 1, 299]);
    let in0 = &in00 + (&in01 - &in00) * &dx;
    let in1 = &in10 + (&in11 - &in10) * &dx;
    let out = &in0 + (&in1 - &in0) * dy.view([1, 1, 299, 1]);
    (out - 128.0) / 128.0
}
