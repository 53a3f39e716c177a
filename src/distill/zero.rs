//! `optim.shard_state`: ZeRO stage 1 (Rajbhandari et al., "ZeRO: Memory Optimizations Toward
//! Training Trillion Parameter Models", 2020) over a data-parallel run's c10d group. Each of the
//! N ranks keeps AdamW's two moments for 1/N of the student's parameters and updates only that
//! share; gradients are reduce-scattered to the rank that owns them, and the updated parameters
//! all-gathered back to every rank, bucket by bucket.
//!
//! Layout (`Shards::new`): the parameters, in the optimizer's order, are cut into buckets of whole
//! tensors of at most `BUCKET_BYTES` (25 MiB, the gradient all-reduce's buckets; a larger tensor
//! is a bucket alone). A bucket is one flat vector of `numel` elements, padded to `N·k`; rank `r`
//! owns elements `r·k .. (r+1)·k`. The part of a parameter inside a rank's range is a *piece*, a
//! flat view into the parameter: the rank's `AdamW` is made over its pieces (named by their
//! parameter) and updates them in place.
//!
//! sdkd's mixed precision keeps no second copy of the weights to shard: the student's fp32 weights
//! are the model's own, cast per layer to the compute dtype (`Distiller`), and every rank's
//! forward needs all of them. The moments are what is sharded: each rank holds
//! `bytes(moments) / N`, plus at most N - 1 padding elements per bucket.
//!
//! Checkpoints hold the full state, as unsharded AdamW names it (`gather_state`: the moments
//! all-gathered bucket by bucket into rank 0's host memory), written by rank 0 alone through the
//! crash-safe checkpoint writer: one file that is complete or absent, which resumes on any world
//! size, sharded or not (`load_state_file` reads a rank's pieces out of the memory-mapped file).
//!
//! On one process (no group, N = 1) the collectives are the identity and each piece is a whole
//! parameter: the step is the unsharded one bit for bit (`tests/distributed.rs`).
use super::optim::{AdamW, EXP_AVG, EXP_AVG_SQ, STEP};
use crate::distributed::{bucket_indices, Ranks};
use crate::models::weights::{kind_of, MappedFile};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The part of parameter `param` a rank owns: its flat elements `start .. start + len`, at
/// `at .. at + len` of the rank's range of the bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Piece {
    param: usize,
    start: i64,
    len: i64,
    at: i64,
}

#[derive(Debug)]
struct Bucket {
    /// Its parameters (consecutive indices) and where each starts in the flat bucket.
    params: Vec<(usize, i64)>,
    /// Elements per rank: the bucket's size padded up to a multiple of N, divided by N.
    per_rank: i64,
    /// This rank's pieces, in order.
    pieces: Vec<Piece>,
}

/// How a rank's share of the optimizer state maps onto the whole parameters, and the collectives
/// of a sharded step.
pub struct Shards {
    world: usize,
    rank: usize,
    /// The whole parameters (every rank holds them all), in the optimizer's order.
    params: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    kind: Kind,
    device: Device,
}

/// `t`'s elements as one flat view (parameters are contiguous).
fn flat(t: &Tensor) -> Tensor {
    t.detach().view([-1])
}

impl Shards {
    /// The layout of `params` over `world` ranks seen from `rank`, and this rank's pieces as
    /// (parameter name, flat view into the parameter): what its `AdamW` is made over.
    pub fn new(params: Vec<(String, Tensor)>, world: usize, rank: usize, bucket_bytes: usize) -> Result<(Shards, Vec<(String, Tensor)>)> {
        ensure!(world >= 1 && rank < world, "optim.shard_state: rank {rank} of {world}");
        let first = params.first().map(|(_, t)| (t.kind(), t.device()));
        let (kind, device) = first.unwrap_or((Kind::Float, Device::Cpu));
        for (name, t) in &params {
            ensure!(
                (t.kind(), t.device()) == (kind, device) && t.is_contiguous(),
                "optim.shard_state: parameter {name} is {:?} on {:?}, the others {kind:?} on {device:?} (a bucket packs one dtype on one device)",
                t.kind(),
                t.device()
            );
        }
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let (mut buckets, mut views) = (vec![], vec![]);
        for ids in bucket_indices(&tensors, bucket_bytes) {
            let mut offset = 0i64;
            let mut members = vec![];
            for i in ids {
                members.push((i, offset));
                offset += tensors[i].numel() as i64;
            }
            let w = world as i64;
            let per_rank = (offset + w - 1) / w;
            let (lo, hi) = (rank as i64 * per_rank, ((rank as i64 + 1) * per_rank).min(offset));
            let mut pieces = vec![];
            for &(i, off) in &members {
                let (a, b) = (lo.max(off), hi.min(off + tensors[i].numel() as i64));
                if a < b {
                    pieces.push(Piece { param: i, start: a - off, len: b - a, at: a - lo });
                    views.push((params[i].0.clone(), flat(&tensors[i]).narrow(0, a - off, b - a)));
                }
            }
            buckets.push(Bucket { params: members, per_rank, pieces });
        }
        Ok((Shards { world, rank, params, buckets, kind, device }, views))
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.buckets.iter().flat_map(|b| b.pieces.iter())
    }

    fn group<'a>(&self, ranks: Option<&'a Ranks>) -> Result<&'a Ranks> {
        match ranks {
            Some(r) if r.size() == self.world => Ok(r),
            _ => bail!("optim.shard_state: a sharded step over {} ranks without their process group", self.world),
        }
    }

    /// The gradients of this rank's pieces (its `AdamW`'s, in order): every parameter's gradient
    /// summed over the ranks and divided by N (one reduce-scatter per bucket); undefined where
    /// the parameter has none (the same on every rank, which run the same graph). Each
    /// parameter's own gradient is dropped once packed, so the step holds about one copy of
    /// the gradients, not two.
    pub fn reduce_gradients(&self, ranks: Option<&Ranks>) -> Result<Vec<Tensor>> {
        let group = if self.world > 1 { Some(self.group(ranks)?) } else { None };
        tch::no_grad(|| -> Result<Vec<Tensor>> {
            let mut out = vec![];
            for b in &self.buckets {
                let packed = Tensor::f_zeros([b.per_rank * self.world as i64], (self.kind, self.device))?;
                let mut defined = HashSet::new();
                for &(i, off) in &b.params {
                    let p = &self.params[i].1;
                    let g = p.grad();
                    if g.defined() {
                        packed.narrow(0, off, g.numel() as i64).f_copy_(&g.reshape([-1]))?;
                        defined.insert(i);
                    }
                    crate::aten_extra::set_grad_none(p)?;
                }
                let mine = match group {
                    None => packed,
                    Some(ranks) => {
                        let mut mine = Tensor::f_empty([b.per_rank], (self.kind, self.device))?;
                        ranks.group.reduce_scatter_sum(&[(&packed, &mine)])?;
                        let _ = mine.f_mul_scalar_(1.0 / self.world as f64)?;
                        mine
                    }
                };
                out.extend(b.pieces.iter().map(|p| if defined.contains(&p.param) { mine.narrow(0, p.at, p.len) } else { Tensor::new() }));
            }
            Ok(out)
        })
    }

    /// The 2-norm of every rank's pieces together, from this rank's `local` norm of its own:
    /// `sqrt(Σ local²)` over the ranks (the norm clipping must use: the global one).
    pub fn global_norm(&self, local: &Tensor, ranks: Option<&Ranks>) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(local.shallow_clone());
        }
        let squared = tch::no_grad(|| local.f_to_device(self.device)?.f_to_kind(Kind::Float)?.f_square())?;
        self.group(ranks)?.group.all_reduce_sum(&[&squared])?;
        Ok(squared.f_sqrt()?)
    }

    /// Every rank's updated pieces all-gathered into every rank's whole parameters, one bucket
    /// at a time (a bucket's flat copy is all it allocates).
    pub fn gather_params(&self, ranks: Option<&Ranks>) -> Result<()> {
        if self.world == 1 {
            return Ok(()); // the pieces are the parameters
        }
        let ranks = self.group(ranks)?;
        tch::no_grad(|| -> Result<()> {
            for b in &self.buckets {
                let mine = Tensor::f_zeros([b.per_rank], (self.kind, self.device))?;
                for p in &b.pieces {
                    mine.narrow(0, p.at, p.len).f_copy_(&flat(&self.params[p.param].1).narrow(0, p.start, p.len))?;
                }
                let all = Tensor::f_empty([b.per_rank * self.world as i64], (self.kind, self.device))?;
                ranks.group.all_gather(&[(&mine, &all)])?;
                for &(i, off) in &b.params {
                    let dst = flat(&self.params[i].1);
                    dst.shallow_clone().f_copy_(&all.narrow(0, off, dst.numel() as i64))?;
                }
            }
            Ok(())
        })
    }

    /// The full state of `opt` (this rank's `AdamW`) as an unsharded `AdamW::state_tensors`
    /// names it: each parameter's whole moments (gathered bucket by bucket, to the CPU) and its
    /// step count, on rank 0; None on the others. Every rank must call it.
    pub fn gather_state(&self, opt: &AdamW, ranks: Option<&Ranks>) -> Result<Option<Vec<(String, Tensor)>>> {
        let moments = opt.moments();
        let steps = opt.steps();
        ensure!(moments.len() == self.pieces().count(), "optim.shard_state: the optimizer is not over this rank's pieces");
        // every piece of a parameter has its step count; a rank without one says 0
        let mut count = vec![0i64; self.params.len()];
        for (p, (_, s)) in self.pieces().zip(&steps) {
            count[p.param] = *s;
        }
        let mut owned: Vec<(Tensor, Tensor)> = vec![];
        let group = if self.world > 1 { Some(self.group(ranks)?) } else { None };
        if let Some(ranks) = group {
            count = ranks.max_counts(&count)?;
        }
        // the optimizer's, also on a rank that owns no piece (more ranks than elements)
        let state_kind = opt.state_kind();
        let mut pieces_moments = moments.iter();
        tch::no_grad(|| -> Result<()> {
            for b in &self.buckets {
                let zeros = || Tensor::f_zeros([b.per_rank], (state_kind, self.device));
                let mine = [zeros()?, zeros()?];
                for p in &b.pieces {
                    let (m, v) = pieces_moments.next().expect("one moment pair per piece, counted above");
                    mine[0].narrow(0, p.at, p.len).f_copy_(m)?;
                    mine[1].narrow(0, p.at, p.len).f_copy_(v)?;
                }
                let [m, v] = match group {
                    None => mine, // one process owns the whole bucket
                    Some(ranks) => {
                        let n = b.per_rank * self.world as i64;
                        let all = [Tensor::f_empty([n], (state_kind, self.device))?, Tensor::f_empty([n], (state_kind, self.device))?];
                        ranks.group.all_gather(&[(&mine[0], &all[0]), (&mine[1], &all[1])])?;
                        all
                    }
                };
                if self.rank == 0 {
                    let (m, v) = (m.f_to_device(Device::Cpu)?, v.f_to_device(Device::Cpu)?);
                    for &(i, off) in &b.params {
                        let p = &self.params[i].1;
                        let whole = |t: &Tensor| t.f_narrow(0, off, p.numel() as i64)?.f_view(p.size().as_slice());
                        owned.push((whole(&m)?, whole(&v)?));
                    }
                }
            }
            Ok(())
        })?;
        if self.rank != 0 {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(3 * self.params.len());
        for (((name, _), (m, v)), c) in self.params.iter().zip(owned).zip(count) {
            out.push((format!("{EXP_AVG}{name}"), m));
            out.push((format!("{EXP_AVG_SQ}{name}"), v));
            out.push((format!("{STEP}{name}"), Tensor::from(c)));
        }
        Ok(Some(out))
    }

    /// Loads this rank's pieces of a full optimizer state file (`gather_state`'s or an unsharded
    /// run's, of any world size) into `opt`, reading only their bytes of the memory-mapped file.
    /// As `AdamW::load_state_file`: names and whole shapes must match exactly, moments are
    /// converted to the state's dtype, and the saved dtype is returned when it differed.
    pub fn load_state_file(&self, opt: &mut AdamW, path: &Path) -> Result<Option<Kind>> {
        let file = MappedFile::open(path)?;
        let st = file.parse()?;
        let what = || format!("optimizer state {}", path.display());
        let mut want: HashMap<String, Vec<i64>> = HashMap::new();
        for (name, p) in &self.params {
            want.insert(format!("{EXP_AVG}{name}"), p.size());
            want.insert(format!("{EXP_AVG_SQ}{name}"), p.size());
            want.insert(format!("{STEP}{name}"), vec![]);
        }
        let have: HashSet<&str> = st.names().into_iter().collect();
        let mut missing: Vec<&str> = want.keys().map(String::as_str).filter(|n| !have.contains(n)).collect();
        let mut unexpected: Vec<&str> = have.iter().copied().filter(|n| !want.contains_key(*n)).collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            missing.sort();
            unexpected.sort();
            let first = |v: &[&str]| v.iter().take(5).copied().collect::<Vec<_>>().join(", ");
            bail!("{} does not match: {} missing ({}), {} unexpected ({})", what(), missing.len(), first(&missing), unexpected.len(), first(&unexpected));
        }
        let mut saved = None;
        let mut named = vec![];
        for p in self.pieces() {
            let name = &self.params[p.param].0;
            for prefix in [EXP_AVG, EXP_AVG_SQ] {
                let key = format!("{prefix}{name}");
                let view = st.tensor(&key)?;
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                ensure!(shape == want[&key], "{}: {key} has shape {shape:?}, expected {:?}", what(), want[&key]);
                let kind = kind_of(view.dtype()).with_context(what)?;
                ensure!(matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double), "{}: {key} is stored as {:?}, not floating point", what(), view.dtype());
                saved.get_or_insert(kind);
                let size = kind.elt_size_in_bytes();
                let bytes = &view.data()[p.start as usize * size..(p.start + p.len) as usize * size];
                let piece = Tensor::f_from_data_size(bytes, &[p.len], kind)?;
                ensure!(piece.isfinite().all().int64_value(&[]) != 0, "{}: {key} holds NaN or infinite values", what());
                named.push((format!("{prefix}{name}"), piece));
            }
            let key = format!("{STEP}{name}");
            let view = st.tensor(&key)?;
            let step = crate::models::weights::view_to_tensor(&view).with_context(what)?;
            named.push((key, step));
        }
        opt.load_state(&named).with_context(what)?;
        Ok(saved.filter(|&k| k != opt.state_kind()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(sizes: &[i64]) -> Vec<(String, Tensor)> {
        sizes.iter().enumerate().map(|(i, &n)| (format!("p{i}"), Tensor::arange(n, (Kind::Float, Device::Cpu)))).collect()
    }

    /// Every element of every bucket is owned by exactly one rank, in order, and the pieces are
    /// views of the parameters.
    #[test]
    fn the_ranks_pieces_tile_every_bucket() {
        let sizes = [5, 3, 12, 1, 7];
        // up to 9 ranks: rank 8 of 9 owns no element at all
        for world in 1..=9 {
            let mut owned: Vec<Vec<bool>> = sizes.iter().map(|&n| vec![false; n as usize]).collect();
            for rank in 0..world {
                let (shards, views) = Shards::new(params(&sizes), world, rank, 10 * 4).unwrap();
                assert_eq!(shards.buckets.iter().map(|b| b.params.len()).collect::<Vec<_>>(), vec![2, 1, 2]);
                assert_eq!(views.len(), shards.pieces().count());
                for (p, (name, view)) in shards.pieces().zip(&views) {
                    assert_eq!(name, &format!("p{}", p.param));
                    assert!(p.at >= 0 && p.at + p.len <= shards.buckets.iter().find(|b| b.pieces.contains(p)).unwrap().per_rank);
                    assert_eq!(view.double_value(&[0]), p.start as f64, "a view of the parameter");
                    for e in p.start..p.start + p.len {
                        assert!(!owned[p.param][e as usize], "element {e} of p{} owned twice", p.param);
                        owned[p.param][e as usize] = true;
                    }
                }
                if world == 1 {
                    assert!(shards.pieces().all(|p| p.start == 0 && p.len == sizes[p.param]), "one process: whole parameters");
                }
            }
            assert!(owned.iter().flatten().all(|&o| o), "world {world}: an element nobody owns");
        }
    }
}
