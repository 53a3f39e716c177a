//! Shared test helpers: the project's `.venv` Python (diffusers/transformers are the referee)
//! and the `sdkd` binary.
#![allow(dead_code)]
pub mod serve_http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `.venv` interpreter that `make setup` made.
pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} missing: run `make setup`", p.display());
    p
}

/// Runs `tests/reference/<script>` with `args` in the `.venv`, failing the test with its output.
pub fn run_reference(script: &str, args: &[&str]) {
    let out = Command::new(python())
        .arg(root().join("tests/reference").join(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("PYTHONHASHSEED", "0")
        .output()
        .expect("running python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the `sdkd` binary built for this test run.
pub fn sdkd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdkd")).args(args).output().expect("running sdkd")
}

/// Asserts the CLI failed cleanly: exit code 1, a message naming `needle`, no panic.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, got {:?}; stderr:\n{stderr}", out.status.code());
    assert!(!stderr.contains("panicked"), "panic on bad input:\n{stderr}");
    assert!(stderr.contains(needle), "stderr does not name {needle:?}:\n{stderr}");
}

/// max |a - b| / max |b|: the relative error the parity tests bound.
pub fn rel_err(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let a = a.to_kind(tch::Kind::Double);
    let b = b.to_kind(tch::Kind::Double);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    (a - &b).abs().max().double_value(&[]) / scale
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("sdkd-test-").tempdir().expect("tempdir")
}

pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    sdkd::models::weights::read_all(path).expect("reading reference tensors").into_iter().collect()
}

/// The tiny perturbed diffusers UNets of `tests/reference/make_unets.py` (with their reference
/// outputs), generated once per test binary.
pub fn reference_unets() -> &'static Path {
    static DIR: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_keep, path) = DIR.get_or_init(|| {
        let dir = tempdir();
        run_reference("make_unets.py", &[dir.path().to_str().unwrap()]);
        let path = dir.path().to_path_buf();
        (dir, path)
    });
    path
}

/// A tiny 4-stage teacher pipeline (perturbed, DDPM) and 40 synthetic 16 px pairs, made once per
/// test binary: the run of tests/train.rs and tests/distributed.rs.
pub struct TrainFixture {
    _dir: tempfile::TempDir,
    pub teacher: PathBuf,
    pub data: PathBuf,
}

pub fn train_fixture() -> &'static TrainFixture {
    static F: std::sync::OnceLock<TrainFixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let dir = tempdir();
        let teacher = dir.path().join("teacher");
        run_reference("make_pipeline.py", &[teacher.to_str().unwrap(), "--stages", "4", "--sample-size", "8", "--scheduler", "ddpm"]);
        let data = dir.path().join("data");
        let o = sdkd(&["synth", "--out", data.to_str().unwrap(), "--count", "40", "--resolution", "16"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        TrainFixture { _dir: dir, teacher, data }
    })
}
