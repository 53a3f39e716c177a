//! Parity of the CLIP tokenizer, the CLIP text encoder and the VAE with transformers/diffusers
//! (tests/reference/make_encoders.py), and of `sdkd inspect --model` with a tiny pipeline saved
//! by diffusers (tests/reference/make_pipeline.py).
mod common;

use common::{rel_err, read_tensors, run_reference, sdkd, assert_clean_failure};
use sdkd::models::{ClipTextEncoder, ClipTokenizer, PipelineDir, Vae};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// The reference outputs, made once per test binary.
fn reference() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = common::tempdir();
        run_reference("make_encoders.py", &[dir.path().to_str().unwrap()]);
        dir
    })
    .path()
}

/// A tiny StableDiffusionPipeline folder and the counts diffusers/transformers give for it.
fn pipeline() -> (&'static Path, &'static Value) {
    static PIPE: OnceLock<(tempfile::TempDir, PathBuf, Value)> = OnceLock::new();
    let (_, dir, expect) = PIPE.get_or_init(|| {
        let tmp = common::tempdir();
        let dir = tmp.path().join("pipe");
        let expect = tmp.path().join("expect.json");
        run_reference("make_pipeline.py", &[dir.to_str().unwrap(), "--expect", expect.to_str().unwrap()]);
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&expect).unwrap()).unwrap();
        (tmp, dir, v)
    });
    (dir, expect)
}

fn ids_of(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn tokenizer_matches_transformers() {
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(reference().join("tokenizer_cases.json")).unwrap()).unwrap();
    let texts: Vec<&str> = cases["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    // the README's figures: 1,259 strings in 5 tokenizer layouts
    assert_eq!(texts.len(), 1259, "strings in tokenizer_cases.json");
    assert_eq!(cases["variants"].as_object().unwrap().len(), 5, "tokenizer layouts");
    for (name, want) in cases["variants"].as_object().unwrap() {
        let tok = ClipTokenizer::from_dir(&reference().join(name)).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(tok.vocab_size() as i64, want["vocab_size"].as_i64().unwrap(), "{name}: vocab size");
        assert_eq!(tok.pad_id(), want["pad_token_id"].as_i64().unwrap(), "{name}: pad id");
        assert_eq!(tok.model_max_length() as i64, want["model_max_length"].as_i64().unwrap(), "{name}: max length");
        let mut bad = vec![];
        for (i, text) in texts.iter().enumerate() {
            let ids = tok.encode(text);
            let padded = tok.encode_padded(text);
            let decoded = tok.decode(&ids, true);
            if ids != ids_of(&want["ids"][i]) || padded != ids_of(&want["padded"][i]) || decoded != want["decoded"][i].as_str().unwrap() {
                bad.push(format!("{text:?}: sdkd {ids:?} / {decoded:?}, transformers {} / {}", want["ids"][i], want["decoded"][i]));
            }
        }
        assert!(bad.is_empty(), "{name}: {} of {} strings differ, e.g.\n{}", bad.len(), texts.len(), bad[..bad.len().min(5)].join("\n"));
        eprintln!("{name}: {} strings match (ids, padded ids, decoded text)", texts.len());
    }
}

#[test]
fn tokenizer_batch_tensor() {
    let tok = ClipTokenizer::from_dir(&reference().join("tok_sd15")).unwrap();
    let t = tok.encode_batch(&["a photo of a cat", "a dog"], Device::Cpu);
    assert_eq!(t.size(), vec![2, 77]);
    assert_eq!(t.int64_value(&[0, 0]), tok.bos_id());
    assert_eq!(t.int64_value(&[1, 76]), tok.pad_id());
}

/// Bound on the VAE's max |sdkd - diffusers| / max |diffusers|: about twice the worst measured
/// (1.8e-6, vae_c), so a change of the arithmetic shows while float reassociation does not.
const VAE_TOL: f64 = 4e-6;

/// The text encoder is bit-identical to transformers' on the CPU in fp32 (the same LibTorch
/// kernels in the same order): every output is compared with `Tensor::equal`.
fn check_clip(dir: &str, io: &str) {
    let r = read_tensors(&reference().join(io));
    let enc = ClipTextEncoder::load(&reference().join(dir), Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    let out = tch::no_grad(|| enc.model.forward(&r["input_ids"]));
    let check = |what: &str, a: &Tensor, b: &Tensor| {
        assert_eq!(a.size(), b.size(), "{dir} {what}: shape");
        assert!(a.equal(b), "{dir} {what}: not bit-identical to transformers (rel err {:e})", rel_err(a, b));
    };
    check("last_hidden_state", &out.last_hidden_state, &r["last_hidden_state"]);
    check("pooled", &out.pooled, &r["pooled"]);
    assert_eq!(out.hidden_states.len(), 4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        check(&format!("hidden_states.{i}"), h, &r[&format!("hidden_states.{i}")]);
    }
    let skip1 = tch::no_grad(|| enc.model.prompt_embeds(&r["input_ids"], 1));
    check("clip skip 1", &skip1, &r["skip1"]);
    let short = tch::no_grad(|| enc.model.forward(&r["input_ids"].narrow(1, 0, 10)).last_hidden_state);
    check("10 tokens", &short, &r["short_last_hidden_state"]);
    eprintln!("{dir}: every output bit-identical");
}

#[test]
fn clip_quick_gelu_matches_transformers() {
    check_clip("clip_quick", "clip_quick_io.safetensors");
}

#[test]
fn clip_gelu_matches_transformers() {
    check_clip("clip_gelu", "clip_gelu_io.safetensors");
}

#[test]
fn clip_published_names_load() {
    // "text_model."-prefixed names plus the position_ids buffer, as SD-1.5's text encoder has them
    check_clip("clip_prefixed", "clip_quick_io.safetensors");
}

fn check_vae(dir: &str, io: &str) {
    let r = read_tensors(&reference().join(io));
    let vae = Vae::load(&reference().join(dir), Device::Cpu, Kind::Float).unwrap_or_else(|e| panic!("{e:#}"));
    let m = &vae.model;
    let mut worst: f64 = 0.0;
    let mut check = |what: &str, a: &Tensor, b: &Tensor| {
        let e = rel_err(a, b);
        assert!(e <= VAE_TOL, "{dir} {what}: rel err {e:e} (bound {VAE_TOL:e})");
        worst = worst.max(e);
    };
    tch::no_grad(|| {
        let post = m.encode(&r["x"]);
        check("mean", &post.mean, &r["mean"]);
        check("logvar", &post.logvar, &r["logvar"]);
        check("std", &post.std, &r["std"]);
        check("sample(noise)", &post.sample(&r["noise"]), &r["sample"]);
        check("sample(seed 1234)", &post.sample_seeded(1234), &r["seeded"]);
        check("decode", &m.decode(&r["z"]), &r["decoded"]);
        check("forward", &m.forward(&r["x"]), &r["forward"]);
    });
    eprintln!("{dir}: worst rel err {worst:e}");
}

#[test]
fn vae_two_blocks_matches_diffusers() {
    check_vae("vae_a", "vae_a_io.safetensors");
}

#[test]
fn vae_three_blocks_without_quant_convs_matches_diffusers() {
    check_vae("vae_b", "vae_b_io.safetensors");
}

#[test]
fn vae_without_mid_attention_matches_diffusers() {
    check_vae("vae_c", "vae_c_io.safetensors");
    let vae = Vae::load(&reference().join("vae_c"), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(vae.model.config.scaling_factor, 0.13025);
    assert_eq!(vae.model.config.shift_factor, Some(0.1));
    let z = Tensor::randn([1, 4, 2, 2], (Kind::Float, Device::Cpu));
    let round = vae.model.unscale_latents(&vae.model.scale_latents(&z));
    assert!(rel_err(&round, &z) < 1e-6);
}

#[test]
fn vae_legacy_attention_names_load() {
    check_vae("vae_legacy", "vae_a_io.safetensors");
}

#[test]
fn broken_weights_name_the_tensor() {
    let tmp = common::tempdir();
    let dir = tmp.path().join("vae");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(reference().join("vae_a/config.json"), dir.join("config.json")).unwrap();
    // vae_b's weights do not fit vae_a's config
    std::fs::copy(reference().join("vae_b/diffusion_pytorch_model.safetensors"), dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let e = format!("{:#}", Vae::load(&dir, Device::Cpu, Kind::Float).err().unwrap());
    assert!(e.contains("mis-shaped") && e.contains("decoder.conv_in.weight: file [16, 3, 3, 3], model [16, 4, 3, 3]"), "{e}");
}

#[test]
fn inspect_model_counts_match_diffusers() {
    let (dir, expect) = pipeline();
    let out = sdkd(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for part in ["unet", "vae", "text_encoder"] {
        assert_eq!(got[part]["params"], expect[part]["params"], "{part} params");
        assert!(got[part]["params"].as_i64().unwrap() > 0);
    }
    assert_eq!(got["tokenizer"]["vocab_size"], expect["tokenizer"]["vocab_size"]);
    assert_eq!(got["tokenizer"]["pad_token_id"], expect["tokenizer"]["pad_token_id"]);
    assert_eq!(got["tokenizer"]["model_max_length"], expect["tokenizer"]["model_max_length"]);
    assert_eq!(got["scheduler"]["class"], expect["scheduler"]["class"]);
    assert_eq!(got["scheduler"]["prediction_type"], expect["scheduler"]["prediction_type"]);
    assert_eq!(got["scheduler"]["num_train_timesteps"], expect["scheduler"]["num_train_timesteps"]);
    // the table form runs too
    let out = sdkd(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("text_encoder"));
}

#[test]
fn inspect_sd2_style_pipeline() {
    // every non-default option of make_pipeline.py, as later tests use them
    let tmp = common::tempdir();
    let dir = tmp.path().join("pipe");
    let expect = tmp.path().join("expect.json");
    run_reference(
        "make_pipeline.py",
        &[dir.to_str().unwrap(), "--prediction-type", "v_prediction", "--linear-projection", "--upcast-attention",
          "--scheduler", "ddim", "--hidden-act", "gelu", "--pad-token", "!", "--stages", "4", "--legacy-vae-names",
          "--expect", expect.to_str().unwrap()],
    );
    let expect: Value = serde_json::from_str(&std::fs::read_to_string(&expect).unwrap()).unwrap();
    let out = sdkd(&["inspect", "--model", dir.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    for part in ["unet", "vae", "text_encoder"] {
        assert_eq!(got[part]["params"], expect[part]["params"], "{part} params");
    }
    assert_eq!(got["tokenizer"]["pad_token_id"], expect["tokenizer"]["pad_token_id"]);
    assert_eq!(got["tokenizer"]["pad_token"], "!");
    assert_eq!(got["text_encoder"]["hidden_act"], "gelu");
    assert_eq!(got["unet"]["config"]["use_linear_projection"], true);
    assert_eq!(got["scheduler"]["class"], "DDIMScheduler");
    assert_eq!(got["scheduler"]["prediction_type"], "v_prediction");
}

#[test]
fn pipeline_dir_loads_every_part() {
    let (dir, expect) = pipeline();
    let p = PipelineDir::open(dir).unwrap();
    assert_eq!(p.class_name(), Some("StableDiffusionPipeline"));
    let te = p.load_text_encoder(Device::Cpu, Kind::Float).unwrap();
    let tok = p.load_tokenizer().unwrap();
    let ids = tok.encode_batch(&["a toy panda standing on a pile of broccoli"], Device::Cpu);
    let emb = tch::no_grad(|| te.model.prompt_embeds(&ids, 0));
    assert_eq!(emb.size(), vec![1, 77, expect["text_encoder"]["hidden_size"].as_i64().unwrap()]);
    assert!(p.scheduler_config_path().unwrap().ends_with("scheduler/scheduler_config.json"));
    let vae = p.load_vae(Device::Cpu, Kind::Float).unwrap();
    let unet = p.load_unet(Device::Cpu, Kind::Float).unwrap();
    let f = vae.model.config.downscale_factor();
    let latents = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let eps = tch::no_grad(|| unet.model.predict(&latents, &Tensor::from(10i64), &emb));
    assert_eq!(eps.size(), vec![1, 4, 8, 8]);
    let img = tch::no_grad(|| vae.model.decode(&vae.model.unscale_latents(&eps)));
    assert_eq!(img.size(), vec![1, 3, 8 * f, 8 * f]);
}

/// A copy of the tiny pipeline with `edit` applied to it.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let (dir, _) = pipeline();
    let tmp = common::tempdir();
    let copy = tmp.path().join("pipe");
    copy_dir(dir, &copy);
    edit(&copy);
    tmp
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn inspect_fails(tmp: &tempfile::TempDir, needle: &str) {
    let out = sdkd(&["inspect", "--model", tmp.path().join("pipe").to_str().unwrap(), "--json"]);
    assert_clean_failure(&out, needle);
}

#[test]
fn missing_or_broken_parts_are_named() {
    let t = broken_copy(|p| std::fs::remove_dir_all(p.join("vae")).unwrap());
    inspect_fails(&t, "part \"vae\"");
    let t = broken_copy(|p| std::fs::write(p.join("text_encoder/config.json"), "{not json").unwrap());
    inspect_fails(&t, "part \"text_encoder\"");
    let t = broken_copy(|p| {
        let f = p.join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    });
    inspect_fails(&t, "part \"unet\"");
    let t = broken_copy(|p| std::fs::write(p.join("tokenizer/tokenizer.json"), "[]").unwrap());
    inspect_fails(&t, "part \"tokenizer\"");
    let t = broken_copy(|p| std::fs::remove_file(p.join("scheduler/scheduler_config.json")).unwrap());
    inspect_fails(&t, "part \"scheduler\"");
    let t = broken_copy(|p| std::fs::remove_file(p.join("model_index.json")).unwrap());
    inspect_fails(&t, "model_index.json");
}
