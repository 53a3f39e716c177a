//! sdkd's UNet against diffusers' `UNet2DConditionModel` on tiny random perturbed models:
//! prediction and every block feature, fp32 files (sharded for sd1), fp16 and bf16 variant folders,
//! and clean errors for bad inputs.
mod common;

use common::*;
use sdkd::models::UNet;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{Device, Kind};

const MODELS: [&str; 4] = ["sd1", "sd2", "lpb1_nomid", "three_stage"];

fn fixtures() -> &'static Path {
    reference_unets()
}

/// Loads `name/unet_dir` into an fp32 model and compares it with diffusers' outputs in `ref_file`.
fn check(name: &str, unet_dir: &str, ref_file: &str) {
    let dir = fixtures().join(name);
    let unet = UNet::load(&dir.join(unet_dir), Device::Cpu, Kind::Float).unwrap();
    let refs = read_tensors(&dir.join(ref_file));
    let inner: BTreeSet<String> = refs
        .keys()
        .filter_map(|k| k.strip_prefix("feat."))
        .filter(|k| k.contains(".attentions."))
        .map(str::to_string)
        .collect();
    let out = tch::no_grad(|| unet.model.forward(&refs["sample"], &refs["timesteps"], &refs["context"], &inner));
    let err = rel_err(&out.sample, &refs["out"]);
    assert!(err <= 1e-5, "{name}/{unet_dir}: prediction rel err {err:e}");
    let mut n = 0;
    for (key, want) in refs.iter().filter(|(k, _)| k.starts_with("feat.")) {
        let feature = &key["feat.".len()..];
        let got = out.feature(feature).unwrap_or_else(|| panic!("{name}: no feature {feature}"));
        let err = rel_err(got, want);
        assert!(err <= 1e-5, "{name}/{unet_dir}: feature {feature} rel err {err:e}");
        n += 1;
    }
    let expected = out.down.len() + out.up.len() + usize::from(out.mid.is_some()) + inner.len();
    assert_eq!(n, expected, "{name}: every block feature compared");
}

#[test]
fn fp32_matches_diffusers() {
    for name in MODELS {
        check(name, "unet", "ref.safetensors");
    }
}

#[test]
fn fp16_file_into_fp32_model_matches() {
    for name in MODELS {
        check(name, "unet_fp16", "ref.safetensors");
    }
}

/// A `variant="bf16"` folder (`diffusion_pytorch_model.bf16.safetensors`), against diffusers
/// loading the same folder into fp32.
#[test]
fn bf16_variant_into_fp32_model_matches() {
    for name in MODELS {
        let files = std::fs::read_dir(fixtures().join(name).join("unet_bf16")).unwrap();
        let names: Vec<String> = files.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n == "diffusion_pytorch_model.bf16.safetensors"), "{name}: {names:?}");
        check(name, "unet_bf16", "ref_bf16.safetensors");
    }
    // bf16 rounding changes the model: the fp32 reference is not met by the bf16 folder
    let unet = UNet::load(&fixtures().join("sd2/unet_bf16"), Device::Cpu, Kind::Float).unwrap();
    let refs = read_tensors(&fixtures().join("sd2/ref.safetensors"));
    let out = tch::no_grad(|| unet.model.forward(&refs["sample"], &refs["timesteps"], &refs["context"], &BTreeSet::new()));
    assert!(rel_err(&out.sample, &refs["out"]) > 1e-4, "the bf16 folder gave the fp32 model's output");
}

#[test]
fn keeps_the_requested_dtype() {
    let unet = UNet::load(&fixtures().join("sd2/unet"), Device::Cpu, Kind::BFloat16).unwrap();
    assert!(unet.vs.variables().values().all(|t| t.kind() == Kind::BFloat16));
    let unet = UNet::load(&fixtures().join("sd2/unet_fp16"), Device::Cpu, Kind::Float).unwrap();
    assert!(unet.vs.variables().values().all(|t| t.kind() == Kind::Float));
    // a bf16 file into a bf16 model: the file's values as they are
    let unet = UNet::load(&fixtures().join("sd2/unet_bf16"), Device::Cpu, Kind::BFloat16).unwrap();
    let file = read_tensors(&fixtures().join("sd2/unet_bf16/diffusion_pytorch_model.bf16.safetensors"));
    let vars = unet.vs.variables();
    assert_eq!(vars.len(), file.len());
    for (k, t) in &file {
        assert_eq!(t.kind(), Kind::BFloat16, "{k} in the file");
        assert!(vars[k].equal(t), "{k} differs from the file");
    }
}

/// A copy of a fixture's fp32 UNet folder to break.
fn broken_copy(tmp: &Path) -> PathBuf {
    let src = fixtures().join("sd2/unet");
    let dst = tmp.join("unet");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

#[test]
fn bad_inputs_are_clean_errors() {
    let tmp = tempdir();
    let load = |dir: &Path| UNet::load(dir, Device::Cpu, Kind::Float).err().map(|e| format!("{e:#}")).unwrap_or_default();

    let dir = broken_copy(&tmp.path().join("truncated"));
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&dir);
    assert!(e.contains("not a valid safetensors") && e.contains("diffusion_pytorch_model"), "{e}");

    let dir = broken_copy(&tmp.path().join("json"));
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let e = load(&dir);
    assert!(e.contains("not valid JSON") && e.contains("config.json"), "{e}");

    let dir = broken_copy(&tmp.path().join("blocktype"));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"DownBlock2D\"", "\"SimpleCrossAttnDownBlock2D\"");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = load(&dir);
    assert!(e.contains("SimpleCrossAttnDownBlock2D") && e.contains("down_block_types"), "{e}");

    // a mis-shaped tensor: widen the cross-attention dim in the config only
    let dir = broken_copy(&tmp.path().join("shape"));
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"cross_attention_dim\": 48", "\"cross_attention_dim\": 40");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let e = load(&dir);
    assert!(e.contains("mis-shaped") && e.contains("attn2.to_k.weight"), "{e}");
}
