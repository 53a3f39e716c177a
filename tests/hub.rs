//! Models by hub id against a local stand-in of the Hugging Face Hub (`tests/reference/hub_server.py`,
//! 127.0.0.1 only) serving a tiny pipeline, with huggingface_hub and diffusers as the referee
//! (`tests/reference/hub_check.py`): the cache sdkd fills is the one Python reads and the
//! reverse, downloads resume, a bad sha256 is refused, concurrent processes fetch a blob once,
//! `variant: fp16`, the errors of 401/404/no network, the model card and `--push-to-hub`.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ID: &str = "tiny/sd";
const UNET_WEIGHTS: &str = "unet/diffusion_pytorch_model.safetensors";

/// The served repositories: `tiny/sd` (make_pipeline.py's pipeline with fp16 variants, a .bin
/// UNet and a README.md; hub_check.py repo), made once per test binary.
fn fixture() -> &'static Path {
    static ROOT: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_keep, root) = ROOT.get_or_init(|| {
        let dir = tempdir();
        let repo = dir.path().join("root/tiny/sd");
        run_reference("make_pipeline.py", &[repo.to_str().unwrap()]);
        run_reference("hub_check.py", &["repo", repo.to_str().unwrap()]);
        let root = dir.path().join("root");
        (dir, root)
    });
    root
}

fn repo_dir() -> PathBuf {
    fixture().join(ID)
}

/// A hub_server.py process; killed when dropped.
struct Hub {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl Hub {
    fn start(root: &Path, dir: &Path, extra: &[&str]) -> Hub {
        let port_file = dir.join(format!("port-{}", rand_suffix()));
        let log = dir.join(format!("hub-log-{}", rand_suffix()));
        let child = Command::new(python())
            .arg(root_dir().join("tests/reference/hub_server.py"))
            .arg(root)
            .args(["--port-file", port_file.to_str().unwrap(), "--log", log.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting hub_server.py");
        let start = Instant::now();
        while !port_file.exists() {
            assert!(start.elapsed() < Duration::from_secs(30), "hub_server.py did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = std::fs::read_to_string(&port_file).unwrap();
        Hub { child, endpoint: format!("http://127.0.0.1:{}", port.trim()), log }
    }

    /// The requests served so far: (method, path, Range header, Authorization sent).
    fn requests(&self) -> Vec<(String, String, Option<String>, bool)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["method"].as_str().unwrap().into(), v["path"].as_str().unwrap().into(), v["range"].as_str().map(String::from), v["auth"] == true)
            })
            .collect()
    }

    /// GETs of the LFS bytes of `file` (the CDN path of its sha256), with their Range headers.
    fn blob_gets(&self, file: &str) -> Vec<Option<String>> {
        let sha = sha256_hex(&std::fs::read(repo_dir().join(file)).unwrap());
        self.requests().into_iter().filter(|(m, p, _, _)| m == "GET" && p == &format!("/_lfs/{sha}")).map(|r| r.2).collect()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn root_dir() -> PathBuf {
    common::root()
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

/// A command with only the hub environment given (no token, proxy or offline mode inherited).
fn with_hub_env(mut cmd: Command, cache: &Path, endpoint: &str, extra: &[(&str, &str)]) -> Command {
    for k in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN_PATH", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        cmd.env_remove(k);
    }
    // a HOME without a login token
    cmd.env("HOME", cache.parent().unwrap()).env("HF_HUB_CACHE", cache).env("HF_ENDPOINT", endpoint).env("HF_HUB_DISABLE_TELEMETRY", "1");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd
}

fn sdkd_hub(args: &[&str], cache: &Path, endpoint: &str, extra: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkd"));
    cmd.args(args);
    with_hub_env(cmd, cache, endpoint, extra).output().expect("running sdkd")
}

fn python_hub(args: &[&str], cache: &Path, endpoint: &str, extra: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(python());
    cmd.arg(root_dir().join("tests/reference/hub_check.py")).args(args);
    let out = with_hub_env(cmd, cache, endpoint, extra).output().expect("running python");
    assert!(out.status.success(), "hub_check.py {args:?}:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "sdkd failed:\n{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn repo_cache(cache: &Path) -> PathBuf {
    cache.join("models--tiny--sd")
}

/// The one snapshot of tiny/sd in `cache` and `refs/main`'s commit.
fn snapshot(cache: &Path) -> (String, PathBuf) {
    let commit = std::fs::read_to_string(repo_cache(cache).join("refs/main")).expect("refs/main");
    let snap = repo_cache(cache).join("snapshots").join(&commit);
    assert!(snap.is_dir(), "{}", snap.display());
    (commit, snap)
}

/// Relative paths of the files under `dir`.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = vec![];
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The pixels of a PNG.
fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8().into_raw()
}

/// The files a pipeline command fetches from tiny/sd: no `.bin`, no fp16 variant.
const PIPELINE_FILES: [&str; 11] = [
    "README.md",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

#[test]
fn sdkd_fills_an_empty_cache_that_python_loads() {
    let tmp = tempdir();
    let hub = Hub::start(fixture(), tmp.path(), &[]);
    let cache = tmp.path().join("cache");
    ok(&sdkd_hub(&["inspect", "--model", ID, "--json"], &cache, &hub.endpoint, &[]));
    let (commit, snap) = snapshot(&cache);
    assert_eq!(commit.len(), 40);
    assert_eq!(files_under(&snap), PIPELINE_FILES, "only the files a pipeline needs");
    // Python's layout: relative links into blobs/, named by the sha256 of LFS files
    for f in PIPELINE_FILES {
        let link = std::fs::read_link(snap.join(f)).unwrap();
        assert!(link.is_relative() && link.starts_with(".."), "{f} -> {}", link.display());
        let bytes = std::fs::read(snap.join(f)).unwrap();
        assert_eq!(bytes, std::fs::read(repo_dir().join(f)).unwrap(), "{f}");
        if f.ends_with(".safetensors") {
            assert_eq!(link.file_name().unwrap().to_str().unwrap(), sha256_hex(&bytes), "{f}");
        }
    }
    // huggingface_hub finds it, diffusers loads the same tensors as from the folder
    let out = python_hub(&["load", ID, repo_dir().to_str().unwrap()], &cache, "http://127.0.0.1:9", &[("HF_HUB_OFFLINE", "1")]);
    assert!(out.contains("\"tensors\": 384"), "{out}");
    // offline-first: a second command finds everything in the cache and asks the hub nothing
    let served = hub.requests().len();
    ok(&sdkd_hub(&["inspect", "--model", ID, "--json"], &cache, &hub.endpoint, &[]));
    ok(&sdkd_hub(&["inspect", "--model", &format!("{ID}@{commit}"), "--json"], &cache, &hub.endpoint, &[]));
    assert_eq!(hub.requests().len(), served, "requests after the first download");
}

#[test]
fn a_python_snapshot_serves_sdkd_offline_with_the_folder_s_image() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    {
        let hub = Hub::start(fixture(), tmp.path(), &[]);
        python_hub(&["snapshot", ID], &cache, &hub.endpoint, &[]);
    }
    // no server now, and offline
    let offline = [("HF_HUB_OFFLINE", "1")];
    let gen = |model: &str, out: &Path| {
        let o = sdkd_hub(
            &["generate", "--model", model, "--prompt", "a red cube", "--steps", "2", "--seed", "1", "--device", "cpu", "--out", out.to_str().unwrap()],
            &cache,
            "http://127.0.0.1:9",
            &offline,
        );
        ok(&o);
    };
    let (commit, _) = snapshot(&cache);
    let (a, b, c) = (tmp.path().join("id.png"), tmp.path().join("commit.png"), tmp.path().join("folder.png"));
    gen(ID, &a);
    gen(&format!("{ID}@{commit}"), &b);
    gen(repo_dir().to_str().unwrap(), &c);
    assert_eq!(pixels(&a), pixels(&c));
    assert_eq!(pixels(&b), pixels(&c));
    // offline, what the cache lacks is an error that says so
    let o = sdkd_hub(&["inspect", "--model", "tiny/other"], &cache, "http://127.0.0.1:9", &offline);
    assert_clean_failure(&o, "HF_HUB_OFFLINE is set");
}

#[test]
fn an_interrupted_download_resumes_and_a_bad_sha256_is_refused() {
    let tmp = tempdir();
    let cut = format!("cut:{UNET_WEIGHTS}:4096");
    let corrupt = format!("corrupt:{UNET_WEIGHTS}:1");
    let hub = Hub::start(fixture(), tmp.path(), &["--fault", &cut, "--fault", &corrupt.replace(UNET_WEIGHTS, "vae/diffusion_pytorch_model.safetensors")]);
    let cache = tmp.path().join("cache");
    let o = sdkd_hub(&["inspect", "--unet", &format!("{ID}/unet"), "--json"], &cache, &hub.endpoint, &[]);
    ok(&o);
    // the UNet's connection dropped at 4096 bytes; the next request asked for the rest
    assert_eq!(hub.blob_gets(UNET_WEIGHTS), [None, Some("bytes=4096-".to_string())]);
    let (_, snap) = snapshot(&cache);
    assert_eq!(std::fs::read(snap.join(UNET_WEIGHTS)).unwrap(), std::fs::read(repo_dir().join(UNET_WEIGHTS)).unwrap());

    // the VAE's first copy has a flipped byte: refused (sha256 against the ETag), fetched again
    let vae = "vae/diffusion_pytorch_model.safetensors";
    let o = sdkd_hub(&["inspect", "--model", ID, "--json"], &cache, &hub.endpoint, &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("sha256"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(hub.blob_gets(vae), [None, None]);
    assert_eq!(std::fs::read(snap.join(vae)).unwrap(), std::fs::read(repo_dir().join(vae)).unwrap());

    // a blob that never arrives intact: exit 1, nothing kept under its name
    let hub = Hub::start(fixture(), tmp.path(), &["--fault", &format!("corrupt:{vae}:9")]);
    let cache = tmp.path().join("cache2");
    let o = sdkd_hub(&["inspect", "--model", ID], &cache, &hub.endpoint, &[]);
    assert_clean_failure(&o, "sha256");
    let sha = sha256_hex(&std::fs::read(repo_dir().join(vae)).unwrap());
    assert!(!repo_cache(&cache).join("blobs").join(&sha).exists());
}

#[test]
fn two_processes_fetch_each_blob_once() {
    let tmp = tempdir();
    // each GET of the UNet's bytes waits 1.5 s, so the two processes overlap
    let hub = Hub::start(fixture(), tmp.path(), &["--fault", &format!("slow:{UNET_WEIGHTS}:1500")]);
    let cache = tmp.path().join("cache");
    let spawn = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkd"));
        cmd.args(["inspect", "--model", ID, "--json"]).stdout(Stdio::null()).stderr(Stdio::piped());
        with_hub_env(cmd, &cache, &hub.endpoint, &[]).spawn().unwrap()
    };
    let (a, b) = (spawn(), spawn());
    for child in [a, b] {
        let o = child.wait_with_output().unwrap();
        ok(&o);
    }
    for f in PIPELINE_FILES.iter().filter(|f| f.ends_with(".safetensors")) {
        assert_eq!(hub.blob_gets(f).len(), 1, "GETs of {f}");
    }
    let (_, snap) = snapshot(&cache);
    assert_eq!(std::fs::read(snap.join(UNET_WEIGHTS)).unwrap(), std::fs::read(repo_dir().join(UNET_WEIGHTS)).unwrap());
    let leftovers: Vec<String> = files_under(&repo_cache(&cache).join("blobs")).into_iter().filter(|f| f.contains("incomplete")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn gated_missing_and_unreachable_hubs_are_named() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let hub = Hub::start(fixture(), tmp.path(), &["--token", "hf_secret"]);
    // 401: gated or private, and how to authenticate
    let o = sdkd_hub(&["inspect", "--model", ID], &cache, &hub.endpoint, &[]);
    assert_clean_failure(&o, "gated or private");
    assert_clean_failure(&o, "HF_TOKEN");
    // the token file `huggingface-cli login` writes; never sent to the CDN host
    let hf_home = tmp.path().join("hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_secret\n").unwrap();
    ok(&sdkd_hub(&["inspect", "--unet", &format!("{ID}/unet")], &cache, &hub.endpoint, &[("HF_HOME", hf_home.to_str().unwrap())]));
    let reqs = hub.requests();
    assert!(reqs.iter().any(|r| r.1.starts_with("/api/") && r.3));
    assert!(reqs.iter().filter(|r| r.1.starts_with("/_lfs/")).all(|r| !r.3), "the token went to the CDN");
    // a wrong token
    let o = sdkd_hub(&["inspect", "--model", ID], &cache, &hub.endpoint, &[("HF_TOKEN", "hf_wrong")]);
    assert_clean_failure(&o, "the token from HF_TOKEN was sent and refused");

    let hub = Hub::start(fixture(), tmp.path(), &[]);
    // 404s: the repository, the revision, a file
    assert_clean_failure(&sdkd_hub(&["inspect", "--model", "tiny/nope"], &cache, &hub.endpoint, &[]), "tiny/nope: repository not found");
    assert_clean_failure(&sdkd_hub(&["inspect", "--model", "tiny/sd@v9"], &cache, &hub.endpoint, &[]), "tiny/sd: revision v9 not found");
    assert_clean_failure(&sdkd_hub(&["convert", "--from", "tiny/sd/nope.safetensors", "--to", tmp.path().join("x").to_str().unwrap()], &cache, &hub.endpoint, &[]), "has no nope.safetensors");
    // nothing listening
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("http://127.0.0.1:{port}");
    let o = sdkd_hub(&["inspect", "--model", "tiny/elsewhere"], &cache, &dead, &[]);
    assert_clean_failure(&o, &format!("cannot reach the hub at {dead}"));
    assert_clean_failure(&o, "HF_HUB_OFFLINE=1");
}

#[test]
fn a_run_from_a_hub_id_records_its_commit_and_exports_a_card_that_pushes() {
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    let served = tmp.path().join("served");
    copy_dir(fixture(), &served);
    let hub = Hub::start(&served, tmp.path(), &[]);
    let data = tmp.path().join("data");
    ok(&sdkd(&["synth", "--out", data.to_str().unwrap(), "--count", "4", "--resolution", "16"]));
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "teacher: {ID}\nvariant: fp16\nstudent: {}\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\n\
             train:\n  batch_size: 2\n  grad_accum: 1\n  max_steps: 1\n  device: cpu\n  precision: fp32\n\
             validation:\n  every: 0\n",
            // the teacher's own architecture (the 2-stage tiny UNet has nothing a preset prunes)
            repo_dir().join("unet/config.json").display(),
            run.display(),
            data.display()
        ),
    )
    .unwrap();
    ok(&sdkd_hub(&["train", "--quiet", "--config", cfg.to_str().unwrap()], &cache, &hub.endpoint, &[]));
    // variant fp16: the fp16 weights only
    let (commit, snap) = snapshot(&cache);
    let weights: Vec<String> = files_under(&snap).into_iter().filter(|f| f.ends_with(".safetensors")).collect();
    assert_eq!(weights, ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors"]);
    // the checkpoint's config records the id and the commit
    let recorded: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(run.join("config.yaml")).unwrap()).unwrap();
    assert_eq!((recorded["teacher"].as_str(), recorded["revision"].as_str()), (Some(ID), Some(commit.as_str())));

    // export: a pipeline with its card, then pushed
    let out = tmp.path().join("export");
    let token = [("HF_TOKEN", "hf_writer")];
    let ckpt = run.join("checkpoints/step-1");
    let o = sdkd_hub(
        &["export", "--checkpoint", ckpt.to_str().unwrap(), "--format", "pipeline", "--out", out.to_str().unwrap(), "--push-to-hub", "me/student"],
        &cache,
        &hub.endpoint,
        &token,
    );
    ok(&o);
    let card: serde_json::Value = serde_json::from_str(&python_hub(&["card", out.join("README.md").to_str().unwrap()], &cache, &hub.endpoint, &[])).unwrap();
    assert_eq!(card["base_model"], ID);
    assert_eq!(card["license"], "creativeml-openrail-m");
    assert_eq!((card["library_name"].as_str(), card["pipeline_tag"].as_str()), (Some("diffusers"), Some("text-to-image")));
    assert!(card["tags"].as_array().unwrap().iter().any(|t| t == "distillation"), "{card}");
    let text = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(text.contains("% of the teacher)"), "{text}");
    // the repository holds every exported file, byte for byte, the card included
    let pushed = served.join("me/student");
    let mut local = files_under(&out);
    local.retain(|f| f != ".sdkd.json");
    assert_eq!(files_under(&pushed), local);
    for f in &local {
        assert_eq!(std::fs::read(pushed.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
    let lfs_puts = hub.requests().iter().filter(|r| r.0 == "PUT").count();
    assert_eq!(lfs_puts, local.iter().filter(|f| f.ends_with(".safetensors")).count());
    // a second push of the same files is refused without --overwrite, naming them
    let out2 = tmp.path().join("export2");
    let args = ["export", "--checkpoint", ckpt.to_str().unwrap(), "--format", "unet", "--out", out2.to_str().unwrap(), "--push-to-hub", "me/student"];
    let o = sdkd_hub(&args, &cache, &hub.endpoint, &token);
    assert_clean_failure(&o, "already holds README.md");
    assert_eq!(std::fs::read(pushed.join("README.md")).unwrap(), std::fs::read(out.join("README.md")).unwrap());
    let mut args = args.to_vec();
    args.push("--overwrite");
    ok(&sdkd_hub(&args, &cache, &hub.endpoint, &token));
    assert_eq!(std::fs::read(pushed.join("README.md")).unwrap(), std::fs::read(out2.join("README.md")).unwrap());
    // the server's upload protocol is huggingface_hub's own: its upload_folder commits there too
    python_hub(&["upload", out2.to_str().unwrap(), "py/student"], &cache, &hub.endpoint, &[("HF_TOKEN", "hf_writer"), ("HF_HUB_DISABLE_XET", "1")]);
    for f in ["README.md", "diffusion_pytorch_model.safetensors"] {
        assert_eq!(std::fs::read(served.join("py/student").join(f)).unwrap(), std::fs::read(out2.join(f)).unwrap(), "{f}");
    }
    // no token: the push says how to get one
    let out3 = tmp.path().join("export3");
    let o = sdkd_hub(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out3.to_str().unwrap(), "--push-to-hub", "me/other"], &cache, &hub.endpoint, &[]);
    assert_clean_failure(&o, "needs a token");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let (p, q) = (e.path(), to.join(e.file_name()));
        if p.is_dir() {
            copy_dir(&p, &q);
        } else {
            std::fs::copy(&p, &q).unwrap();
        }
    }
}
