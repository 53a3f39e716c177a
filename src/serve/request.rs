//! The JSON body of `POST /v1/txt2img`, with the names, defaults and ranges of
//! docs/serve.md, checked into a `GenerateRequest`. Unknown fields are refused by name: a
//! misspelt `num_inference_step` would otherwise be ignored silently.
use crate::pipeline::{resolve_seed, GenerateRequest};
use crate::schedulers::SchedulerKind;
use anyhow::{anyhow, ensure, Result};
use serde::Deserialize;

/// Image sides the API accepts: multiples of 64 from 64 to 1024 pixels.
pub const SIZES: std::ops::RangeInclusive<i64> = 64..=1024;
pub const SIZE_STEP: i64 = 64;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Txt2Img {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default = "default_steps")]
    pub num_inference_steps: i64,
    #[serde(default = "default_guidance")]
    pub guidance_scale: f64,
    #[serde(default = "default_samples")]
    pub samples: i64,
    /// -1: a random seed (returned in the answer).
    #[serde(default = "default_seed")]
    pub seed: i64,
    #[serde(default = "default_size")]
    pub img_width: i64,
    #[serde(default = "default_size")]
    pub img_height: i64,
    /// true: JSON with base64 PNGs; false: the PNG itself (several samples side by side).
    #[serde(default = "default_base64")]
    pub base64: bool,
}

fn default_scheduler() -> String {
    "unipc".into()
}
fn default_steps() -> i64 {
    20
}
fn default_guidance() -> f64 {
    7.5
}
fn default_samples() -> i64 {
    1
}
fn default_seed() -> i64 {
    -1
}
fn default_size() -> i64 {
    512
}
fn default_base64() -> bool {
    true
}

impl Txt2Img {
    /// Parses a request body; the error names the field at fault.
    pub fn parse(body: &[u8]) -> Result<Txt2Img> {
        let mut de = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut de).map_err(|e| match e.path().to_string().as_str() {
            "." => anyhow!("request body: {}", e.inner()),
            field => anyhow!("{field}: {}", e.inner()),
        })
    }

    /// The generation this asks for, with a random seed drawn for -1.
    pub fn to_generate_request(&self) -> Result<GenerateRequest> {
        ensure!(!self.prompt.trim().is_empty(), "prompt: must not be empty");
        let scheduler: SchedulerKind = self.scheduler.parse().map_err(|e| anyhow!("scheduler: {e}"))?;
        // LCM models sample in 1 to 8 steps; its sampler refuses more than its config's
        // original_inference_steps (50 by default) when the request is built
        let min_steps = if scheduler == SchedulerKind::Lcm { 1 } else { 20 };
        ensure!(
            (min_steps..=100).contains(&self.num_inference_steps),
            "num_inference_steps = {}: must be {min_steps} to 100 with scheduler {scheduler}",
            self.num_inference_steps
        );
        ensure!(
            (0.1..=25.0).contains(&self.guidance_scale),
            "guidance_scale = {}: must be 0.1 to 25",
            self.guidance_scale
        );
        ensure!((1..=4).contains(&self.samples), "samples = {}: must be 1 to 4", self.samples);
        for (name, v) in [("img_width", self.img_width), ("img_height", self.img_height)] {
            ensure!(
                SIZES.contains(&v) && v % SIZE_STEP == 0,
                "{name} = {v}: must be a multiple of {SIZE_STEP} from {} to {}",
                SIZES.start(),
                SIZES.end()
            );
        }
        let seed = resolve_seed(self.seed).map_err(|e| anyhow!("seed: {e}"))?;
        Ok(GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            scheduler,
            steps: self.num_inference_steps as usize,
            guidance_scale: self.guidance_scale,
            seed,
            width: Some(self.img_width),
            height: Some(self.img_height),
            samples: self.samples as usize,
            ..GenerateRequest::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> Result<GenerateRequest> {
        Txt2Img::parse(json.as_bytes())?.to_generate_request()
    }

    #[test]
    fn defaults_follow_the_brief() {
        let r = req(r#"{"prompt": "a toy panda", "seed": 5}"#).unwrap();
        assert_eq!((r.scheduler, r.steps, r.guidance_scale, r.samples, r.seed), (SchedulerKind::Unipc, 20, 7.5, 1, 5));
        assert_eq!((r.width, r.height, r.negative_prompt), (Some(512), Some(512), None));
        assert!(Txt2Img::parse(br#"{"prompt": "x"}"#).unwrap().base64);
        let r = req(r#"{"prompt": "x", "scheduler": "dpmpp_2m", "num_inference_steps": 100, "guidance_scale": 0.1, "samples": 4, "img_width": 64, "img_height": 1024}"#).unwrap();
        assert_eq!((r.scheduler, r.steps, r.samples, r.width, r.height), (SchedulerKind::Dpmpp2m, 100, 4, Some(64), Some(1024)));
        let r = req(r#"{"prompt": "x", "scheduler": "lcm", "num_inference_steps": 1}"#).unwrap();
        assert_eq!((r.scheduler, r.steps), (SchedulerKind::Lcm, 1));
    }

    #[test]
    fn errors_name_the_field() {
        for (body, field) in [
            (r#"{"prompt": "x", "num_inference_steps": 19}"#, "num_inference_steps"),
            (r#"{"prompt": "x", "num_inference_steps": 101}"#, "num_inference_steps"),
            (r#"{"prompt": "x", "guidance_scale": 25.5}"#, "guidance_scale"),
            (r#"{"prompt": "x", "samples": 5}"#, "samples"),
            (r#"{"prompt": "x", "img_width": 500}"#, "img_width"),
            (r#"{"prompt": "x", "img_height": 2048}"#, "img_height"),
            (r#"{"prompt": "x", "scheduler": "heun"}"#, "scheduler"),
            (r#"{"prompt": "x", "seed": -2}"#, "seed"),
            (r#"{"prompt": "  "}"#, "prompt"),
            (r#"{"negative_prompt": "x"}"#, "prompt"),
            (r#"{"prompt": "x", "num_inference_step": 30}"#, "num_inference_step"),
            (r#"{"prompt": "x", "samples": "two"}"#, "samples"),
            (r#"not json"#, "request body"),
        ] {
            let e = format!("{:#}", req(body).unwrap_err());
            assert!(e.contains(field), "{body}: {e}");
        }
    }
}
