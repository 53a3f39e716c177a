//! What a request costs. The API brief marks `num_inference_steps`, `samples`, `img_width` and
//! `img_height` as affecting the price: a sample costs `credits` at the reference steps and size,
//! in proportion to steps × width × height, rounded up to whole credits; a request costs
//! `samples` times that. `--pricing FILE` reads the table from YAML (docs/serve.md).
use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// Credits for one sample at the reference steps and size.
    pub credits: i64,
    pub steps: i64,
    pub width: i64,
    pub height: i64,
}

impl Default for Pricing {
    /// 1 credit per sample at 20 steps, 512×512 (the API's defaults).
    fn default() -> Self {
        Pricing { credits: 1, steps: 20, width: 512, height: 512 }
    }
}

impl Pricing {
    pub fn load(path: &Path) -> Result<Pricing> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--pricing {}: cannot read it", path.display()))?;
        let pricing: Pricing = serde_yaml::from_str(&text).with_context(|| {
            format!("--pricing {}: expected the keys credits, steps, width, height (docs/serve.md)", path.display())
        })?;
        for (name, v) in [("credits", pricing.credits), ("steps", pricing.steps), ("width", pricing.width), ("height", pricing.height)] {
            ensure!(v >= 1, "--pricing {}: {name} = {v}: must be 1 or more", path.display());
        }
        ensure!(
            pricing.credits <= 1_000_000,
            "--pricing {}: credits = {}: at most 1000000 per reference sample",
            path.display(),
            pricing.credits
        );
        Ok(pricing)
    }

    /// Credits for one sample of `steps` at `width` × `height`.
    pub fn per_sample(&self, steps: i64, width: i64, height: i64) -> i64 {
        // u128: steps × pixels × credits cannot overflow for any request the API accepts
        let work = self.credits as u128 * steps as u128 * width as u128 * height as u128;
        let unit = self.steps as u128 * self.width as u128 * self.height as u128;
        i64::try_from(work.div_ceil(unit)).unwrap_or(i64::MAX)
    }

    /// Credits for a request.
    pub fn price(&self, samples: i64, steps: i64, width: i64, height: i64) -> i64 {
        self.per_sample(steps, width, height).saturating_mul(samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proportional_and_rounded_up() {
        let p = Pricing::default();
        assert_eq!(p.price(1, 20, 512, 512), 1);
        assert_eq!(p.price(1, 20, 64, 64), 1);
        assert_eq!(p.price(1, 21, 512, 512), 2);
        assert_eq!(p.price(2, 100, 1024, 1024), 40);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pricing.yaml");
        std::fs::write(&f, "credits: 2\nsteps: 20\nwidth: 512\nheight: 0\n").unwrap();
        assert!(format!("{:#}", Pricing::load(&f).unwrap_err()).contains("height = 0"));
        std::fs::write(&f, "credits: 2\nstep: 20\nwidth: 512\nheight: 512\n").unwrap();
        assert!(format!("{:#}", Pricing::load(&f).unwrap_err()).contains("step"));
    }
}
