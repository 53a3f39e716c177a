//! Dynamic loss scaling for fp16 student compute, with the rules of PyTorch's `GradScaler`:
//! fp16 gradients underflow below 6e-8, so the loss is multiplied by `scale` before backward and
//! the gradients divided by it before clipping and AdamW. A step whose gradients overflowed is
//! skipped and the scale halved; after 2000 finite steps in a row it doubles. bf16 has fp32's
//! exponent range and needs none of this.
use serde::{Deserialize, Serialize};

/// The scale and its growth counter: part of a checkpoint, so a resumed fp16 run continues with
/// the scale it had.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Finite steps in a row since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale { scale: LossScale::INIT, good_steps: 0 }
    }
}

impl LossScale {
    /// GradScaler's `init_scale`, 2^16.
    pub const INIT: f64 = 65536.0;
    /// GradScaler's `growth_interval`.
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// Records one step's outcome (GradScaler's `growth_factor` 2 and `backoff_factor` 0.5).
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_and_a_finite_run_doubles() {
        let mut s = LossScale::default();
        s.update(true);
        s.update(false);
        assert_eq!(s, LossScale { scale: 32768.0, good_steps: 0 });
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(true);
        assert_eq!(s, LossScale { scale: 65536.0, good_steps: 0 });
    }
}
