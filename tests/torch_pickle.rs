//! The `torch.save` reader against files PyTorch writes (tests/reference/make_torch_files.py):
//! every dtype, strided and offset views, nested and Lightning-layout dicts, protocols 2 and 4,
//! and the files it must refuse (legacy format, truncated, a pickle calling `os.system`).
mod common;

use common::{read_tensors, run_reference, tempdir};
use sdkd::torch_pickle::{load, load_state_dict, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn files() -> &'static Path {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_keep, path) = DIR.get_or_init(|| {
        let dir = tempdir();
        run_reference("make_torch_files.py", &[dir.path().to_str().unwrap()]);
        let path = dir.path().to_path_buf();
        (dir, path)
    });
    path
}

/// Loads `<name>.<ext>` and checks every tensor equals (dtype, shape, values) the expected one.
fn assert_matches_expected(file: &str, stem: &str) -> BTreeMap<String, Tensor> {
    let got: BTreeMap<String, Tensor> = load_state_dict(&files().join(file)).unwrap().into_iter().collect();
    let want = read_tensors(&files().join(format!("{stem}.expected.safetensors")));
    assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{file}: names");
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.size(), w.size(), "{file}: {name} shape");
        if g.kind() == Kind::Float8e4m3fn {
            assert_eq!(w.kind(), Kind::Float);
            assert!(g.to_kind(Kind::Float).equal(w), "{file}: {name} values");
        } else {
            assert_eq!(g.kind(), w.kind(), "{file}: {name} dtype");
            assert!(g.equal(w), "{file}: {name} values differ");
        }
    }
    got
}

#[test]
fn every_dtype_reads_bit_exact() {
    let got = assert_matches_expected("dtypes.pth", "dtypes");
    assert_eq!(got.len(), 12);
    assert_eq!(got["bf16"].kind(), Kind::BFloat16);
    assert_eq!(got["scalar"].size(), Vec::<i64>::new());
    // float8 is pickled as an untyped storage plus a dtype (_rebuild_tensor_v3)
    let f8 = assert_matches_expected("float8.pth", "float8");
    assert_eq!(f8["f8"].kind(), Kind::Float8e4m3fn);
}

#[test]
fn views_keep_their_strides_offsets_and_shared_storage() {
    let got = assert_matches_expected("views.pth", "views");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(files().join("expected.json")).unwrap()).unwrap();
    for (name, m) in meta["views"].as_object().unwrap() {
        let t = &got[name];
        let want_stride: Vec<i64> = serde_json::from_value(m["stride"].clone()).unwrap();
        assert_eq!(t.stride(), want_stride, "{name} stride");
        assert_eq!(t.storage_offset(), m["offset"].as_i64().unwrap(), "{name} offset");
    }
    assert!(!got["t"].is_contiguous());
    // all four views were one storage in PyTorch, and are one here: writing through one shows in the others
    let base = got["base"].shallow_clone();
    let _ = base.get(4).get(7).fill_(-1.0);
    assert_eq!(got["row"].double_value(&[7]), -1.0);
    assert_eq!(got["t"].double_value(&[7, 4]), -1.0);
}

#[test]
fn nested_dicts_and_lists_flatten_with_dots_protocol_4() {
    let got = assert_matches_expected("nested.pth", "nested");
    assert!(got.contains_key("model.unet.0.weight") && got.contains_key("model.extra.1"));
    let v = load(&files().join("nested.pth")).unwrap();
    assert!(matches!(v.get("name"), Some(Value::Str(s)) if s == "tiny"));
}

#[test]
fn lightning_checkpoint_gives_its_state_dict_and_scalars() {
    let got = assert_matches_expected("lightning.ckpt", "lightning");
    assert!(got.keys().all(|k| k.starts_with("model.diffusion_model.")), "only state_dict: {:?}", got.keys());
    let v = load(&files().join("lightning.ckpt")).unwrap();
    assert_eq!(v.get("global_step").and_then(Value::as_int), Some(3));
    assert_eq!(v.get("epoch").and_then(Value::as_int), Some(1));
    let hp = v.get("hyper_parameters").unwrap();
    assert!(matches!(hp.get("lr"), Some(Value::Float(f)) if *f == 1e-4));
    assert!(matches!(hp.get("betas"), Some(Value::Tuple(t)) if matches!(t[..], [Value::Float(a), Value::Float(b)] if a == 0.9 && b == 0.999)));
    assert!(matches!(hp.get("ema"), Some(Value::Bool(true))));
    assert!(matches!(hp.get("none"), Some(Value::None)));
    assert!(matches!(hp.get("neg"), Some(Value::Int(-7))));
    // 2**70 as LONG1's little-endian bytes
    assert!(matches!(hp.get("big"), Some(Value::BigInt(b)) if b.len() == 9 && b[8] == 0x40 && b[..8].iter().all(|&x| x == 0)));
    assert!(matches!(hp.get("blob"), Some(Value::Bytes(b)) if b == &[0x00, 0xff, b'a', b'b']));
    let Some(Value::List(opt)) = v.get("optimizer_states") else { panic!("optimizer_states") };
    let Some(Value::Dict(state)) = opt[0].get("state") else { panic!("state") };
    assert!(matches!(state[0].0, Value::Int(0)));
    assert_eq!(state[0].1.get("step").unwrap().as_tensor().unwrap().double_value(&[]), 3.0);
}

fn error_of(name: &str) -> String {
    format!("{:#}", load_state_dict(&files().join(name)).err().unwrap_or_else(|| panic!("{name} loaded")))
}

#[test]
fn refuses_legacy_truncated_and_code_calling_files() {
    let legacy = error_of("legacy.pth");
    assert!(legacy.contains("legacy.pth") && legacy.contains("legacy") && legacy.contains("torch.save(torch.load(f)"), "{legacy}");
    let truncated = error_of("truncated.pth");
    assert!(truncated.contains("truncated.pth") && truncated.contains("truncated"), "{truncated}");
    let evil = error_of("evil.pth");
    assert!(evil.contains("posix.system") && evil.contains("allow-list"), "{evil}");
    assert!(!files().join("MARKER").exists(), "the pickle's command ran");
    let missing = error_of("no-such.pth");
    assert!(missing.contains("no-such.pth"), "{missing}");
    let dir = tempdir();
    let not_torch = dir.path().join("notes.bin");
    std::fs::write(&not_torch, b"hello").unwrap();
    let e = format!("{:#}", load(&not_torch).unwrap_err());
    assert!(e.contains("notes.bin") && e.contains("not a torch.save file"), "{e}");
}

#[test]
fn hand_written_pickles_outside_torch_save_are_refused_cleanly() {
    // a zip with a data.pkl that pops an empty stack, and one whose GLOBAL is builtins.eval
    let dir = tempdir();
    for (name, pickle, needle) in [
        ("pop.pth", &b"\x80\x020."[..], "empty stack"),
        ("eval.pth", &b"\x80\x02cbuiltins\neval\nq\x00."[..], "builtins.eval"),
        ("nostop.pth", &b"\x80\x02}q\x00"[..], "truncated"),
    ] {
        let path = dir.path().join(name);
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        std::io::Write::write_all(&mut z, pickle).unwrap();
        z.finish().unwrap();
        let e = format!("{:#}", load(&path).unwrap_err());
        assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
    }
}
