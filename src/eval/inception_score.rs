//! Inception Score as torch-fidelity's `isc` computes it: the logits shuffled with
//! `np.random.RandomState(2020).permutation(N)`, softmax in float64, split into 10 parts
//! (`i·N/10 .. (i+1)·N/10`), exp of each part's mean KL(p(y|x) ‖ p(y)), then mean and population
//! standard deviation of the parts. numpy's legacy Mersenne Twister and its Fisher-Yates shuffle
//! are reproduced so that the parts hold the same images.
use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// torch-fidelity's defaults.
pub const SPLITS: usize = 10;
pub const SHUFFLE_SEED: u32 = 2020;

/// MT19937 as numpy's `RandomState(seed)` seeds it (`init_genrand`).
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            state[i] = 1812433253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 == 1 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's `random_interval(max)`: masked rejection sampling of 0..=max.
    fn interval(&mut self, max: u32) -> u32 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16] {
            mask |= mask >> s;
        }
        loop {
            let v = self.next_u32() & mask;
            if v <= max {
                return v;
            }
        }
    }
}

/// `np.random.RandomState(seed).permutation(n)`.
pub fn numpy_permutation(n: usize, seed: u32) -> Vec<i64> {
    let mut rng = Mt19937::new(seed);
    let mut v: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u32) as usize;
        v.swap(i, j);
    }
    v
}

/// (mean, std) of the Inception Score of (N, classes) logits.
pub fn inception_score(logits: &Tensor, splits: usize) -> Result<(f64, f64)> {
    let n = logits.size()[0] as usize;
    if n < splits {
        bail!("the Inception Score's {splits} splits need at least {splits} images, got {n}");
    }
    let perm = Tensor::from_slice(&numpy_permutation(n, SHUFFLE_SEED)).to_device(logits.device());
    let f = logits.index_select(0, &perm).to_kind(Kind::Double);
    let p = f.softmax(1, Kind::Double);
    let log_p = f.log_softmax(1, Kind::Double);
    let mut scores = vec![];
    for i in 0..splits {
        let (a, b) = ((i * n / splits) as i64, ((i + 1) * n / splits) as i64);
        let pc = p.narrow(0, a, b - a);
        let lc = log_p.narrow(0, a, b - a);
        let q = pc.mean_dim(0, true, Kind::Double);
        let kl = &pc * (lc - q.log());
        scores.push(kl.sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double).exp().double_value(&[]));
    }
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64;
    Ok((mean, var.sqrt()))
}
