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

/// A copy of the folder `from` at `to` (a fixture a test may then damage).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Every file under `dir` (relative path) and its bytes; a folder without files is a test error
/// (comparing nothing would pass).
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    assert!(!out.is_empty(), "nothing to compare in {}", dir.display());
    out
}

pub fn read_tensors(path: &Path) -> std::collections::BTreeMap<String, tch::Tensor> {
    sdkd::models::weights::read_all(path).expect("reading reference tensors").into_iter().collect()
}

/// A fixture that several test binaries use, made once for all of them: `make` fills a fresh
/// folder, renamed to `<target>/tmp/fixtures/<name>-<key>` when complete, which later calls (in
/// this binary or another) read. `inputs` is what decides the contents (the generating scripts'
/// text, the pinned packages, the sdkd binary), hashed into `key`, so a change makes a new one.
/// Callers must only read it.
pub fn shared_fixture(name: &str, inputs: &[Vec<u8>], make: impl FnOnce(&Path)) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
    for b in inputs.iter().flat_map(|i| i.iter().chain(&[0xff])) {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    let dir = root.join(format!("{name}-{h:016x}"));
    if dir.is_dir() {
        return dir;
    }
    std::fs::create_dir_all(&root).expect("creating the fixtures folder");
    let tmp = root.join(format!(".{name}-{h:016x}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("creating a fixture folder");
    make(&tmp);
    if std::fs::rename(&tmp, &dir).is_err() {
        // another binary made it meanwhile: use theirs
        assert!(dir.is_dir(), "could not rename {} to {}", tmp.display(), dir.display());
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}

/// What a file holds, for `shared_fixture`'s inputs.
pub fn file_bytes(relative: &str) -> Vec<u8> {
    std::fs::read(root().join(relative)).unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

/// The sdkd binary of this test run, as a `shared_fixture` input (its size and modification time).
pub fn sdkd_identity() -> Vec<u8> {
    let m = std::fs::metadata(env!("CARGO_BIN_EXE_sdkd")).expect("the sdkd binary");
    let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    format!("{} {t}", m.len()).into_bytes()
}

/// The tiny perturbed diffusers UNets of `tests/reference/make_unets.py` (with their reference
/// outputs), made once for every test binary (students.rs and unet_parity.rs).
pub fn reference_unets() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let inputs = [file_bytes("tests/reference/make_unets.py"), file_bytes("scripts/constraints.txt")];
        shared_fixture("reference-unets", &inputs, |dir| run_reference("make_unets.py", &[dir.to_str().unwrap()]))
    })
}

/// A tiny 4-stage teacher pipeline (perturbed, DDPM) and 40 synthetic 16 px pairs, made once for
/// every test binary: the run of tests/train.rs and tests/distributed.rs.
pub struct TrainFixture {
    pub teacher: PathBuf,
    pub data: PathBuf,
}

pub fn train_fixture() -> &'static TrainFixture {
    static F: std::sync::OnceLock<TrainFixture> = std::sync::OnceLock::new();
    F.get_or_init(|| {
        let inputs = [file_bytes("tests/reference/make_pipeline.py"), file_bytes("scripts/constraints.txt"), sdkd_identity()];
        let dir = shared_fixture("train", &inputs, |dir| {
            let teacher = dir.join("teacher");
            run_reference("make_pipeline.py", &[teacher.to_str().unwrap(), "--stages", "4", "--sample-size", "8", "--scheduler", "ddpm"]);
            let data = dir.join("data");
            let o = sdkd(&["synth", "--out", data.to_str().unwrap(), "--count", "40", "--resolution", "16"]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        });
        TrainFixture { teacher: dir.join("teacher"), data: dir.join("data") }
    })
}

/// How `assert_trained_lora_in_diffusers` generates: the pipeline (SD or SDXL), the student preset
/// whose copy of the pipeline's UNet (`sdkd prune`) is the LoRA run's frozen base, the sampler and
/// the square image size.
pub struct LoraGeneration<'a> {
    pub model: &'a Path,
    pub student: &'a str,
    pub scheduler: &'a str,
    pub steps: u32,
    pub guidance: f64,
    pub size: u32,
}

/// A LoRA sdkd trained (a `lora:` run whose frozen base is `g.student` pruned from `g.model`),
/// exported from `checkpoint` in both layouts (diffusers; kohya, with SGM names on SDXL), read by
/// diffusers' `load_lora_weights` and fused (`StableDiffusionPipeline` or
/// `StableDiffusionXLPipeline`, by the pipeline's class): diffusers' image equals
/// `sdkd generate --lora`'s pixel for pixel (CPU, fp32), and differs from the base's.
pub fn assert_trained_lora_in_diffusers(checkpoint: &Path, g: &LoraGeneration) {
    let work = tempdir();
    let w = |name: &str| work.path().join(name).display().to_string();
    let ok = |o: Output, what: &str| assert!(o.status.success(), "{what}:\n{}", String::from_utf8_lossy(&o.stderr));
    ok(sdkd(&["prune", "--teacher", g.model.to_str().unwrap(), "--student", g.student, "--out", &w("base")]), "prune");
    for format in ["diffusers", "kohya"] {
        let out = w(&format!("{format}.safetensors"));
        ok(sdkd(&["export", "--checkpoint", checkpoint.to_str().unwrap(), "--lora", "--lora-format", format, "--out", &out]), format);
    }
    let (model, base_unet) = (g.model.display().to_string(), w("base"));
    let (steps, guidance, size) = (g.steps.to_string(), g.guidance.to_string(), g.size.to_string());
    let generate = |lora: Option<String>, out: &str| {
        let mut args: Vec<&str> = vec!["generate", "--model", &model, "--unet", &base_unet, "--prompt", "a red square"];
        args.extend(["--scheduler", g.scheduler, "--steps", &steps, "--guidance-scale", &guidance]);
        args.extend(["--seed", "3", "--width", &size, "--height", &size, "--out", out]);
        if let Some(l) = &lora {
            args.extend(["--lora", l.as_str()]);
        }
        // one thread, as the references: the models are tiny
        ok(Command::new(env!("CARGO_BIN_EXE_sdkd")).args(&args).env("OMP_NUM_THREADS", "1").output().unwrap(), "generate");
        image::open(out).unwrap().to_rgb8()
    };
    let cases: Vec<_> = ["diffusers", "kohya"]
        .iter()
        .map(|format| {
            serde_json::json!({
                "model": g.model, "unet": w("base"), "prompt": "a red square", "negative_prompt": null,
                "scheduler": g.scheduler, "steps": g.steps, "guidance_scale": g.guidance, "seed": 3, "width": g.size, "height": g.size,
                "samples": 1, "out": w(&format!("ref-{format}")), "loras": [[w(&format!("{format}.safetensors")), 1.0]],
            })
        })
        .collect();
    std::fs::write(w("cases.json"), serde_json::to_string(&cases).unwrap()).unwrap();
    let xl = sdkd::models::PipelineDir::open(g.model).unwrap().is_xl();
    // sd-scripts names an SDXL UNet's layers by SGM's blocks, SD-1.x/2.x's by diffusers'
    let kohya: Vec<String> = read_tensors(Path::new(&w("kohya.safetensors"))).into_keys().collect();
    let blocks = if xl { ["lora_unet_input_blocks_", "lora_unet_output_blocks_"] } else { ["lora_unet_down_blocks_", "lora_unet_up_blocks_"] };
    for prefix in blocks {
        assert!(kohya.iter().any(|k| k.starts_with(prefix)), "no {prefix} key in the kohya file: {:?}", &kohya[..3]);
    }
    if xl {
        run_reference("sdxl.py", &["generate", &w("cases.json")]);
    } else {
        run_reference("generate_reference.py", &[&w("cases.json")]);
    }
    let base = generate(None, &w("base.png"));
    for format in ["diffusers", "kohya"] {
        let ours = generate(Some(w(&format!("{format}.safetensors"))), &w(&format!("ours-{format}.png")));
        let theirs = image::open(w(&format!("ref-{format}-0.png"))).unwrap().to_rgb8();
        assert!(ours == theirs, "{format} layout: sdkd generate --lora and diffusers' load_lora_weights differ");
        assert!(ours != base, "{format} layout: the trained LoRA did not change the image");
    }
}
