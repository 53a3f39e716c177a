//! Deterministic sampling. Which sample a run sees, and which crop and flip it gets, are pure
//! functions of (seed, epoch, index), computed with counter-based hashing (splitmix64) instead of
//! a stateful RNG: a run resumed from a [`Cursor`] replays exactly the data an uninterrupted run
//! would have seen, with nothing but two integers saved.
use serde::{Deserialize, Serialize};

/// One splitmix64 step: a fast, well-mixed bijection on u64 (Steele, Lea & Flood 2014).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Independent random streams drawn from one seed, so adding a new use never shifts an old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Permutation = 1,
    CropX = 2,
    CropY = 3,
    Flip = 4,
    Synth = 5,
    /// The trainer's per-step draws: latent samples, noise, timesteps, student init.
    Noise = 6,
    /// Which samples of a step train on the empty prompt (`data.caption_dropout`).
    CaptionDropout = 7,
    /// The order within and of aspect-ratio buckets (`data.buckets`).
    Bucket = 8,
}

/// A 64-bit value that depends only on (seed, stream, a, b).
pub fn hash(seed: u64, stream: Stream, a: u64, b: u64) -> u64 {
    let s = splitmix64(seed ^ (stream as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    splitmix64(splitmix64(s ^ a) ^ b)
}

/// Maps a uniform u64 onto `0..n` (Lemire's multiply-shift; the bias is below n / 2^64).
pub fn below(x: u64, n: u64) -> u64 {
    ((x as u128 * n as u128) >> 64) as u64
}

/// Whether sample `sample` (its position in the step's global batch) of optimizer step `step`
/// trains on the empty prompt instead of its caption, with probability `p` (`data.caption_dropout`,
/// diffusers' `proportion_empty_prompts`). A pure function, so a resumed run drops the same ones.
pub fn drops_caption(seed: u64, step: u64, sample: u64, p: f64) -> bool {
    // the top 53 bits as a uniform number in [0, 1)
    let u = (hash(seed, Stream::CaptionDropout, step, sample) >> 11) as f64 / (1u64 << 53) as f64;
    p > 0.0 && u < p
}

/// The order in which epoch `epoch` visits `n` samples: a Fisher-Yates shuffle whose every swap
/// is drawn from (seed, epoch, i).
pub fn permutation(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(hash(seed, Stream::Permutation, epoch, i as u64), i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Epoch `epoch`'s order over samples in aspect-ratio buckets (`bucket_of[i]`: sample i's
/// bucket; None leaves it out): each bucket's samples shuffled by (seed, bucket, epoch) and cut
/// into micro-batches of `batch`, the leftover (fewer than `batch`) left out of this epoch (a
/// different one each epoch), then the micro-batches shuffled by (seed, epoch). So every run of
/// `batch` positions from a multiple of `batch` is one bucket, whichever rank reads it.
pub fn bucketed_permutation(seed: u64, epoch: u64, bucket_of: &[Option<u32>], batch: usize) -> Vec<usize> {
    let mut members: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, b) in bucket_of.iter().enumerate() {
        if let Some(b) = b {
            members.entry(*b).or_default().push(i);
        }
    }
    let mut groups: Vec<Vec<usize>> = vec![];
    for (b, idx) in members {
        let order = permutation(hash(seed, Stream::Bucket, b as u64, 0), epoch, idx.len());
        let shuffled: Vec<usize> = order.into_iter().map(|k| idx[k]).collect();
        groups.extend(shuffled.chunks_exact(batch).map(<[usize]>::to_vec));
    }
    let order = permutation(hash(seed, Stream::Bucket, u64::MAX, 0), epoch, groups.len());
    order.into_iter().flat_map(|g| groups[g].clone()).collect()
}

/// How many positions each epoch of [`bucketed_permutation`] has.
pub fn bucketed_len(bucket_of: &[Option<u32>], batch: usize) -> usize {
    let mut counts: std::collections::BTreeMap<u32, usize> = Default::default();
    for b in bucket_of.iter().flatten() {
        *counts.entry(*b).or_default() += 1;
    }
    counts.values().map(|n| n / batch * batch).sum()
}

/// Where a data stream stands: the `position`-th entry of epoch `epoch`'s order. The trainer
/// saves the cursor of the next batch in its checkpoint and starts a new loader from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

impl Cursor {
    pub fn new(epoch: u64, position: u64) -> Self {
        Cursor { epoch, position }
    }
}

/// One rank's share of a stream read by `world` ranks together (data-parallel training): the
/// stream is cut into consecutive runs of `batch_size` positions, and rank `rank` takes runs
/// `rank`, `rank + world`, `rank + 2·world`, ... So global micro-batch `k` of a step holds the
/// same positions whatever the world size, and each rank decodes only its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

/// The order a loader walks its source in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Endless epochs, each a fresh [`permutation`] of every sample (training).
    Shuffled { seed: u64 },
    /// One pass over `start..end` in index order, epoch 0 (preprocessing, evaluation).
    Sequential { start: usize, end: usize },
}

impl Order {
    /// The cursor after `c`, or None when a sequential pass is over.
    pub fn advance(&self, c: Cursor, len: usize) -> Option<Cursor> {
        match *self {
            Order::Shuffled { .. } => {
                if c.position + 1 >= len as u64 {
                    Some(Cursor::new(c.epoch + 1, 0))
                } else {
                    Some(Cursor::new(c.epoch, c.position + 1))
                }
            }
            Order::Sequential { end, .. } => (c.position + 1 < end as u64).then(|| Cursor::new(0, c.position + 1)),
        }
    }

    /// Where a fresh pass begins.
    pub fn first(&self) -> Cursor {
        match *self {
            Order::Shuffled { .. } => Cursor::new(0, 0),
            Order::Sequential { start, .. } => Cursor::new(0, start as u64),
        }
    }

    /// Whether `c` names a sample of this order over `len` samples.
    pub fn contains(&self, c: Cursor, len: usize) -> bool {
        match *self {
            Order::Shuffled { .. } => c.position < len as u64,
            Order::Sequential { start, end } => c.epoch == 0 && c.position >= start as u64 && c.position < end as u64,
        }
    }
}

/// Maps cursors to sample indices, keeping the current epoch's permutation.
pub(crate) struct Indexer {
    order: Order,
    len: usize,
    perm: Option<(u64, Vec<usize>)>,
    /// Aspect-ratio buckets: each sample's bucket and the micro-batch size.
    buckets: Option<(std::sync::Arc<[Option<u32>]>, usize)>,
    /// A sequential pass over buckets: `start..end` sorted by bucket (stable).
    sorted: Option<Vec<usize>>,
}

impl Indexer {
    pub fn new(order: Order, len: usize) -> Self {
        Indexer { order, len, perm: None, buckets: None, sorted: None }
    }

    /// An indexer whose shuffled epochs are [`bucketed_permutation`]s and whose sequential
    /// passes visit the range bucket by bucket (in index order within each).
    pub fn bucketed(order: Order, bucket_of: std::sync::Arc<[Option<u32>]>, batch: usize) -> Self {
        let (len, sorted) = match order {
            Order::Shuffled { .. } => (bucketed_len(&bucket_of, batch), None),
            Order::Sequential { start, end } => {
                let mut range: Vec<usize> = (start..end).collect();
                range.sort_by_key(|&i| bucket_of[i]);
                (bucket_of.len(), Some(range))
            }
        };
        Indexer { order, len, perm: None, buckets: Some((bucket_of, batch)), sorted }
    }

    /// Positions per epoch: the samples, or the bucketed epoch's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bucket of sample `index`, when the order keeps to buckets.
    pub fn bucket(&self, index: usize) -> Option<u32> {
        self.buckets.as_ref().and_then(|(b, _)| b[index])
    }

    pub fn is_bucketed(&self) -> bool {
        self.buckets.is_some()
    }

    pub fn index(&mut self, c: Cursor) -> usize {
        match self.order {
            Order::Sequential { start, .. } => match &self.sorted {
                Some(sorted) => sorted[c.position as usize - start],
                None => c.position as usize,
            },
            Order::Shuffled { seed } => {
                if self.perm.as_ref().map(|(e, _)| *e) != Some(c.epoch) {
                    let perm = match &self.buckets {
                        Some((b, batch)) => bucketed_permutation(seed, c.epoch, b, *batch),
                        None => permutation(seed, c.epoch, self.len),
                    };
                    self.perm = Some((c.epoch, perm));
                }
                self.perm.as_ref().expect("set above").1[c.position as usize]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_deterministic_permutation() {
        let a = permutation(7, 3, 1000);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, permutation(7, 3, 1000));
        assert_ne!(a, permutation(7, 4, 1000), "epochs must differ");
        assert_ne!(a, permutation(8, 3, 1000), "seeds must differ");
        assert_eq!(permutation(1, 0, 0), Vec::<usize>::new());
        assert_eq!(permutation(1, 0, 1), vec![0]);
    }

    #[test]
    fn permutation_is_roughly_uniform() {
        // Where sample 0 lands over many epochs: every slot of 8 about equally often.
        let mut counts = [0usize; 8];
        for e in 0..8000 {
            let p = permutation(42, e, 8);
            counts[p.iter().position(|&i| i == 0).unwrap()] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn caption_dropout_is_a_pure_function_near_its_rate() {
        let dropped = |seed: u64, step: u64| (0..64).filter(|&i| drops_caption(seed, step, i, 0.25)).collect::<Vec<_>>();
        assert_eq!(dropped(3, 10), dropped(3, 10));
        assert_ne!(dropped(3, 10), dropped(3, 11), "steps must differ");
        assert_ne!(dropped(3, 10), dropped(4, 10), "seeds must differ");
        for p in [0.1, 0.5] {
            let n = 20_000u64;
            let hits = (0..n).filter(|&i| drops_caption(9, i / 16, i % 16, p)).count() as f64;
            // 4 standard deviations of a binomial(20000, p) count
            assert!((hits / n as f64 - p).abs() < 4.0 * (p * (1.0 - p) / n as f64).sqrt(), "p {p}: {hits}");
        }
        assert!((0..1000).all(|i| !drops_caption(1, i, 0, 0.0)));
        assert!((0..1000).all(|i| drops_caption(1, i, 0, 1.0)));
    }

    #[test]
    fn bucketed_epochs_keep_micro_batches_to_one_bucket() {
        // 11 samples in buckets 0 (5), 1 (4), 2 (1), one left out; batches of 2
        let of: Vec<Option<u32>> = vec![Some(0), Some(1), Some(0), Some(0), None, Some(1), Some(2), Some(0), Some(1), Some(0), Some(1)];
        assert_eq!(bucketed_len(&of, 2), 8);
        let mut seen = std::collections::BTreeSet::new();
        for e in 0..6 {
            let p = bucketed_permutation(3, e, &of, 2);
            assert_eq!(p, bucketed_permutation(3, e, &of, 2));
            assert_eq!(p.len(), 8);
            for pair in p.chunks(2) {
                assert_eq!(of[pair[0]], of[pair[1]], "epoch {e}: {p:?}");
            }
            assert!(!p.contains(&4) && !p.contains(&6));
            seen.extend(p);
        }
        assert_eq!(seen.len(), 9, "each bucket's leftover changes from epoch to epoch");
        assert_ne!(bucketed_permutation(3, 0, &of, 2), bucketed_permutation(4, 0, &of, 2));
    }

    #[test]
    fn below_stays_in_range() {
        for i in 0..10_000u64 {
            assert!(below(splitmix64(i), 7) < 7);
        }
        assert_eq!(below(u64::MAX, 1), 0);
    }

    #[test]
    fn orders_advance() {
        let s = Order::Shuffled { seed: 0 };
        assert_eq!(s.advance(Cursor::new(0, 1), 3), Some(Cursor::new(0, 2)));
        assert_eq!(s.advance(Cursor::new(0, 2), 3), Some(Cursor::new(1, 0)));
        let q = Order::Sequential { start: 2, end: 4 };
        assert_eq!(q.first(), Cursor::new(0, 2));
        assert_eq!(q.advance(Cursor::new(0, 2), 10), Some(Cursor::new(0, 3)));
        assert_eq!(q.advance(Cursor::new(0, 3), 10), None);
        assert!(!q.contains(Cursor::new(0, 4), 10));
    }
}
