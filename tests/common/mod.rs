//! Shared test helpers: the project's `.venv` Python (diffusers/transformers are the referee)
//! and the `sdkd` binary.
#![allow(dead_code)]
pub mod lcd;
pub mod serve_http;

use std::ffi::{OsStr, OsString};
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
    let out = python_command().arg(root().join("tests/reference").join(script)).args(args).output().expect("running python");
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What every reference Python runs with: the hub offline, hashing fixed.
const PYTHON_ENV: [(&str, &str); 3] = [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("PYTHONHASHSEED", "0")];

/// `python ARGS...` in the `.venv` (a script and its arguments, or `-c CODE ...`), with the hub
/// offline and hashing fixed, built like a `Command`. It runs in a child forked from
/// tests/reference/zygote.py, which imported torch, diffusers and transformers once for every
/// test binary (several seconds of CPU per reference run otherwise); `SDKD_TEST_ZYGOTE=0` runs a
/// fresh interpreter instead, as does any failure to reach the server.
pub fn python_command() -> PythonCommand {
    PythonCommand { args: Vec::new(), envs: vec![] }
}

pub struct PythonCommand {
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
}

impl PythonCommand {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn output(mut self) -> std::io::Result<Output> {
        for (k, v) in PYTHON_ENV {
            self.envs.push((k.to_string(), v.to_string()));
        }
        if std::env::var("SDKD_TEST_ZYGOTE").as_deref() != Ok("0") {
            if let Some(out) = zygote::run(&self.args, &self.envs) {
                return Ok(out);
            }
        }
        Command::new(python()).args(&self.args).envs(self.envs.iter().map(|(k, v)| (k, v))).output()
    }
}

mod zygote {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    /// The server's socket, shared by every test binary of this checkout and remade when the
    /// server script or the pinned packages change.
    fn socket_path() -> PathBuf {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let mut inputs = vec![file_bytes("tests/reference/zygote.py"), file_bytes("scripts/constraints.txt")];
        let sock = dir.join(format!("zygote-{:016x}.sock", inputs_key(&inputs)));
        if sock.as_os_str().len() < 100 {
            return sock;
        }
        // a Unix socket's path holds at most 107 bytes: a deep checkout uses the temp folder
        inputs.push(dir.as_os_str().as_encoded_bytes().to_vec());
        std::env::temp_dir().join(format!("sdkd-zygote-{:016x}.sock", inputs_key(&inputs)))
    }

    /// Connects to the server, starting it (one process at a time, under a file lock) if none
    /// answers. None when it cannot be started.
    fn connect() -> Option<UnixStream> {
        // a server that could not start is not tried again by this process
        static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if FAILED.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let stream = start_or_connect();
        if stream.is_none() {
            FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        stream
    }

    fn start_or_connect() -> Option<UnixStream> {
        let sock = socket_path();
        if let Ok(s) = UnixStream::connect(&sock) {
            return Some(s);
        }
        std::fs::create_dir_all(sock.parent()?).ok()?;
        let lock = std::fs::File::create(sock.with_extension("lock")).ok()?;
        // SAFETY: flock on a file this function owns; released when `lock` is dropped.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return None;
        }
        if let Ok(s) = UnixStream::connect(&sock) {
            return Some(s);
        }
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(sock.with_extension("log")).ok()?;
        let mut child = Command::new(python())
            .arg(root().join("tests/reference/zygote.py"))
            .arg(&sock)
            .envs(PYTHON_ENV)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().ok()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .ok()?;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(300) {
            if let Ok(s) = UnixStream::connect(&sock) {
                return Some(s);
            }
            if child.try_wait().ok()?.is_some() {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }

    /// One run through the server, or None (then the caller runs Python itself).
    pub fn run(args: &[OsString], envs: &[(String, String)]) -> Option<Output> {
        let mut env: std::collections::BTreeMap<String, String> = std::env::vars().collect();
        env.extend(envs.iter().cloned());
        let argv: Vec<String> = args.iter().map(|a| a.to_str().map(String::from)).collect::<Option<_>>()?;
        let dir = tempfile::tempdir().ok()?;
        let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
        let request = serde_json::json!({
            "argv": argv,
            "cwd": std::env::current_dir().ok()?,
            "env": env,
            "stdout": stdout,
            "stderr": stderr,
        });
        let mut stream = connect()?;
        stream.write_all(format!("{request}\n").as_bytes()).ok()?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).ok()?;
        let code: i32 = line.trim().parse().ok()?;
        Some(Output {
            status: std::process::ExitStatus::from_raw(code << 8),
            stdout: std::fs::read(&stdout).ok()?,
            stderr: std::fs::read(&stderr).ok()?,
        })
    }
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
    let h = inputs_key(inputs);
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

/// FNV-1a of `inputs`, each followed by a 0xff separator: the key of what they decide.
fn inputs_key(inputs: &[Vec<u8>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in inputs.iter().flat_map(|i| i.iter().chain(&[0xff])) {
        h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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
