//! Bad input never loses a user's files and never panics (issue 20's cases): every data-loss
//! case checks that each file that was there before is byte-identical afterwards.
//!
//! The fixture is a tiny diffusers pipeline (tests/reference/make_pipeline.py), a synthetic
//! dataset, and a run trained for 4 steps with checkpoints every 2.
mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

struct Fixture {
    _dir: tempfile::TempDir,
    teacher: PathBuf,
    data: PathBuf,
    /// The run trained for 4 steps (`run.yaml` beside it).
    run: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempdir();
        let teacher = dir.path().join("tiny");
        run_reference("make_pipeline.py", &[teacher.to_str().unwrap(), "--stages", "4", "--sample-size", "8", "--scheduler", "ddpm"]);
        let data = dir.path().join("data");
        ok(&sdkd(&["synth", "--out", s(&data), "--count", "8", "--resolution", "16"]));
        let run = dir.path().join("run1");
        let f = Fixture { _dir: dir, teacher, data, run: run.clone() };
        ok(&sdkd(&["train", "--quiet", "--config", s(&config(&f, &run, 4, 42, 10))]));
        f
    })
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(o: &Output) {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A run YAML for `output_dir`, written beside it (one file per setting).
fn config(f: &Fixture, output_dir: &Path, max_steps: u64, seed: u64, keep: u64) -> PathBuf {
    let text = format!(
        "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\n\
         train:\n  batch_size: 2\n  grad_accum: 1\n  max_steps: {max_steps}\n  seed: {seed}\n  device: cpu\n  precision: fp32\n\
         checkpoint:\n  every: 2\n  keep: {keep}\nvalidation:\n  every: 0\n",
        f.teacher.display(),
        output_dir.display(),
        f.data.display()
    );
    let path = output_dir.with_extension(format!("{max_steps}-{seed}-{keep}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Every file under `dir`, relative path -> bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    assert!(!out.is_empty(), "nothing to compare in {}", dir.display());
    out
}

/// Every file of `before` is still there, byte for byte.
fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>) {
    for (rel, bytes) in before {
        let now = std::fs::read(dir.join(rel)).unwrap_or_else(|e| panic!("{} is gone: {e}", dir.join(rel).display()));
        assert!(now == *bytes, "{} changed", dir.join(rel).display());
    }
}

fn copy_tree(from: &Path, to: &Path) {
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

/// A copy of the fixture's run in a fresh temp dir (tests run in parallel; each owns its copy).
fn own_run(tmp: &Path) -> PathBuf {
    let run = tmp.join("run1");
    copy_tree(&fixture().run, &run);
    run
}

fn steps_of(run: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn train_refuses_an_output_dir_holding_another_run() {
    let f = fixture();
    let tmp = tempdir();
    let run = own_run(tmp.path());
    let before = snapshot(&run);
    // another config (seed), keep 1, 2 steps: once this overwrote step-2 and then deleted it
    let other = config(f, &run, 2, 7, 1);
    let o = sdkd(&["train", "--quiet", "--config", s(&other)]);
    assert_clean_failure(&o, s(&run));
    let e = stderr(&o);
    assert!(e.contains("step-2, step-4") && e.contains("--resume latest"), "{e}");
    assert_unchanged(&run, &before);
    // resuming it with another config names the key that differs
    let o = sdkd(&["train", "--quiet", "--config", s(&other), "--resume", "latest"]);
    assert_clean_failure(&o, "train.seed");
    assert_unchanged(&run, &before);
    // the same config without --resume is refused too (it would restart and overwrite the run)
    let same = config(f, &run, 4, 42, 10);
    assert_clean_failure(&sdkd(&["train", "--quiet", "--config", s(&same)]), "--resume latest");
    assert_unchanged(&run, &before);

    // a folder of the user's own files is never a run folder, not even with --overwrite
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "my notes").unwrap();
    let cfg = config(f, &mine, 2, 42, 1);
    for extra in [&[][..], &["--overwrite"][..], &["--resume", "latest"][..]] {
        let o = sdkd(&[&["train", "--quiet", "--config", s(&cfg)][..], extra].concat());
        assert_clean_failure(&o, "notes.txt");
    }
    assert_eq!(std::fs::read_to_string(mine.join("notes.txt")).unwrap(), "my notes");
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);

    // --overwrite replaces a run sdkd made, and only then
    ok(&sdkd(&["train", "--quiet", "--config", s(&other), "--overwrite"]));
    assert_eq!(steps_of(&run), vec!["step-2"]);
}

#[test]
fn the_keep_rule_deletes_only_the_current_runs_checkpoints() {
    use sdkd::distill::checkpoint::{Checkpoint, CheckpointWriter};
    let tmp = tempdir();
    let run = own_run(tmp.path());
    let old4 = Checkpoint::open(&run.join("checkpoints/step-4")).unwrap();
    let before = snapshot(&run.join("checkpoints/step-4"));
    // a checkpoint of another run (config hash) at step 3, written with keep 1: once the older
    // run's step-4 counted as the newest, and the keep rule deleted step-2 and the new step-3
    let mut state = Checkpoint::open(&run.join("checkpoints/step-2")).unwrap().read_state().unwrap();
    state.meta.config_hash = "0123456789abcdef".into();
    state.meta.step = 3;
    let before = [before, snapshot(&run.join("checkpoints/step-2"))];
    let written = CheckpointWriter::new(&run, 1).write(&state).unwrap();
    assert!(Checkpoint::open(&written).is_ok(), "the checkpoint just written must survive its own keep rule");
    assert!(Checkpoint::open(&old4.dir).is_ok(), "another run's step-4 must not be deleted");
    assert_unchanged(&run.join("checkpoints/step-4"), &before[0]);
    assert_unchanged(&run.join("checkpoints/step-2"), &before[1]);
}

#[test]
fn export_replaces_only_an_earlier_export_and_only_when_asked() {
    let tmp = tempdir();
    let run = own_run(tmp.path());
    let ckpt = run.join("checkpoints/step-4");
    let run_before = snapshot(&run);
    let export = |out: &Path, extra: &[&str]| sdkd(&[&["export", "--checkpoint", s(&ckpt), "--out", s(out)][..], extra].concat());

    // the user's own folder
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "my notes").unwrap();
    let mine_before = snapshot(&mine);
    for extra in [&[][..], &["--overwrite"][..], &["--format", "pipeline", "--overwrite"][..]] {
        assert_clean_failure(&export(&mine, extra), "notes.txt");
    }
    assert_unchanged(&mine, &mine_before);
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 1);

    // the run, the checkpoint itself, the folder holding it, a folder inside it: never
    for out in [run.clone(), ckpt.clone(), run.join("checkpoints"), ckpt.join("unet")] {
        for extra in [&[][..], &["--overwrite"][..]] {
            assert_clean_failure(&export(&out, extra), "sdkd will not write there");
        }
    }
    // nor the teacher pipeline of a pipeline export
    let teacher_before = snapshot(&fixture().teacher);
    let o = export(&fixture().teacher, &["--format", "pipeline", "--overwrite"]);
    assert_clean_failure(&o, "the teacher pipeline");
    assert_unchanged(&fixture().teacher, &teacher_before);
    assert_unchanged(&run, &run_before);

    // a new folder inside the run is fine
    ok(&export(&run.join("exports/bk"), &[]));
    assert_unchanged(&run, &run_before);

    // an earlier export: refused without --overwrite, replaced with it; not by another format
    let out = tmp.path().join("bk");
    ok(&export(&out, &[]));
    let first = snapshot(&out);
    let o = export(&out, &[]);
    assert_clean_failure(&o, "--overwrite");
    assert_unchanged(&out, &first);
    assert_clean_failure(&export(&out, &["--format", "pipeline", "--overwrite"]), "not a diffusers pipeline folder");
    assert_unchanged(&out, &first);
    ok(&export(&out, &["--overwrite", "--dtype", "fp16"]));
    assert_ne!(snapshot(&out), first);
    assert_unchanged(&run, &run_before);
}

#[test]
fn prune_does_not_write_into_a_folder_it_did_not_make() {
    let f = fixture();
    let tmp = tempdir();
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "my notes").unwrap();
    let before = snapshot(&mine);
    let teacher_before = snapshot(&f.teacher);
    let prune = |out: &Path, extra: &[&str]| {
        sdkd(&[&["prune", "--teacher", s(&f.teacher), "--student", "bk_tiny", "--out", s(out)][..], extra].concat())
    };
    for extra in [&[][..], &["--overwrite"][..]] {
        assert_clean_failure(&prune(&mine, extra), "notes.txt");
        assert_clean_failure(&prune(&f.teacher, extra), "the teacher");
        assert_clean_failure(&prune(&f.teacher.join("unet"), extra), "the teacher");
    }
    assert_unchanged(&mine, &before);
    assert_unchanged(&f.teacher, &teacher_before);
    let out = tmp.path().join("pruned");
    ok(&prune(&out, &[]));
    assert_clean_failure(&prune(&out, &[]), "--overwrite");
    ok(&prune(&out, &["--overwrite"]));
}

#[test]
fn synth_does_not_write_over_a_users_image_folder() {
    let tmp = tempdir();
    let mine = tmp.path().join("photos");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("metadata.jsonl"), "{\"file_name\": \"000000.png\", \"text\": \"my cat\"}\n").unwrap();
    std::fs::copy(fixture().data.join("000000.png"), mine.join("000000.png")).unwrap();
    let before = snapshot(&mine);
    for extra in [&[][..], &["--overwrite"][..]] {
        let o = sdkd(&[&["synth", "--out", s(&mine), "--count", "2", "--resolution", "16"][..], extra].concat());
        assert_clean_failure(&o, "metadata.jsonl");
    }
    assert_unchanged(&mine, &before);
    assert_eq!(std::fs::read_dir(&mine).unwrap().count(), 2);
    // an earlier synthetic set is replaced, when asked
    let set = tmp.path().join("set");
    ok(&sdkd(&["synth", "--out", s(&set), "--count", "2", "--resolution", "16"]));
    assert_clean_failure(&sdkd(&["synth", "--out", s(&set), "--count", "3", "--resolution", "16"]), "--overwrite");
    ok(&sdkd(&["synth", "--out", s(&set), "--count", "3", "--resolution", "16", "--overwrite"]));
    assert_eq!(std::fs::read_to_string(set.join("metadata.jsonl")).unwrap().lines().count(), 3);
}

#[test]
fn key_credits_past_i64_max_are_refused_and_a_missing_database_is_not_created() {
    let tmp = tempdir();
    let db = tmp.path().join("keys.sqlite");
    let typo = tmp.path().join("typo.sqlite");
    for args in [&["keys", "list", "--db", s(&typo)][..], &["keys", "credit", "--db", s(&typo), "--name", "a", "--add", "1"][..]] {
        assert_clean_failure(&sdkd(args), "does not exist");
    }
    assert!(!typo.exists(), "a missing key database must not be created");
    ok(&sdkd(&["keys", "add", "--db", s(&db), "--name", "rich", "--credits", &i64::MAX.to_string()]));
    let o = sdkd(&["keys", "credit", "--db", s(&db), "--name", "rich", "--add", "1"]);
    assert_clean_failure(&o, "nothing changed");
    let list = sdkd(&["keys", "list", "--db", s(&db)]);
    ok(&list);
    assert!(String::from_utf8_lossy(&list.stdout).contains(&i64::MAX.to_string()), "{}", String::from_utf8_lossy(&list.stdout));
    let o = sdkd(&["keys", "credit", "--db", s(&db), "--name", "rich", "--add", "-5"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains(&(i64::MAX - 5).to_string()));
}

#[test]
fn impossible_image_sizes_are_errors_not_panics() {
    let t = s(&fixture().teacher);
    let o = sdkd(&["generate", "--model", t, "--prompt", "x", "--steps", "1", "--width", "800000", "--height", "800000", "--out", "/nonexistent/x.png"]);
    assert_clean_failure(&o, "--width");
    assert!(stderr(&o).contains("width = 800000"), "{}", stderr(&o));
}

/// A batch or resolution no machine holds is refused before the loader allocates it (it used to
/// abort the process inside the loader), and the run's output_dir is not claimed.
#[test]
fn impossible_batch_sizes_are_errors_not_aborts() {
    let f = fixture();
    let tmp = tempdir();
    for (batch, resolution) in [(1_000_000_000u64, 16u64), (2, 800_000)] {
        let out = tmp.path().join(format!("run-{batch}-{resolution}"));
        let yaml = tmp.path().join(format!("run-{batch}-{resolution}.yaml"));
        let text = format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: {resolution}\n\
             train:\n  batch_size: {batch}\n  max_steps: 2\n  device: cpu\n  precision: fp32\nvalidation:\n  every: 0\n",
            f.teacher.display(),
            out.display(),
            f.data.display()
        );
        std::fs::write(&yaml, text).unwrap();
        let o = sdkd(&["train", "--quiet", "--config", s(&yaml)]);
        assert_clean_failure(&o, "train.batch_size");
        assert!(stderr(&o).contains(&format!("data.resolution = {resolution}")), "{}", stderr(&o));
        assert!(!out.exists(), "a refused run claimed {}", out.display());
    }
}

#[test]
fn integer_or_bool_unet_tensors_are_refused_by_name() {
    let tmp = tempdir();
    let pipe = tmp.path().join("pipe");
    copy_tree(&fixture().teacher, &pipe);
    let file = pipe.join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = sdkd::models::weights::read_all(&file).unwrap();
    let name = "conv_in.weight";
    let i = tensors.iter().position(|(n, _)| n == name).unwrap();
    for kind in [tch::Kind::Int, tch::Kind::Bool] {
        tensors[i].1 = tensors[i].1.to_kind(kind);
        sdkd::models::weights::save(&file, &tensors, None).unwrap();
        assert_clean_failure(&sdkd(&["inspect", "--model", s(&pipe)]), name);
        let o = sdkd(&["generate", "--model", s(&pipe), "--prompt", "x", "--steps", "1", "--out", s(&tmp.path().join("x.png"))]);
        assert_clean_failure(&o, name);
        assert!(!tmp.path().join("x.png").exists());
    }
}

/// 75 one-token words (what fits between BOS and EOS), then the end that CLIP's limit drops.
fn long_prompt() -> (String, &'static str) {
    let head = vec!["red"; 75].join(" ");
    (format!("{head} a little blue square at the end"), "a little blue square at the end")
}

#[test]
fn a_truncated_prompt_is_reported_by_generate() {
    let tmp = tempdir();
    let (prompt, tail) = long_prompt();
    let out = tmp.path().join("x.png");
    let o = sdkd(&["generate", "--model", s(&fixture().teacher), "--prompt", &prompt, "--steps", "1", "--out", s(&out), "--device", "cpu"]);
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("--prompt") && e.contains("truncated") && e.contains(tail), "{e}");
    let o = sdkd(&["generate", "--model", s(&fixture().teacher), "--prompt", "a red circle", "--steps", "1", "--out", s(&out), "--device", "cpu"]);
    ok(&o);
    assert!(!stderr(&o).contains("truncated"), "{}", stderr(&o));
}

#[test]
fn a_truncated_prompt_is_reported_in_the_serve_json() {
    use std::io::{BufRead, BufReader, Read, Write};
    let tmp = tempdir();
    let db = tmp.path().join("keys.sqlite");
    let o = sdkd(&["keys", "add", "--db", s(&db), "--name", "a", "--credits", "2"]);
    ok(&o);
    let key = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(["serve", "--model", s(&fixture().teacher), "--db", s(&db), "--listen", "127.0.0.1:0", "--device", "cpu"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().to_string();
    let (prompt, tail) = long_prompt();
    let post = |prompt: &str| -> serde_json::Value {
        let body = serde_json::json!({"prompt": prompt, "num_inference_steps": 20, "img_width": 64, "img_height": 64, "seed": 1}).to_string();
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        let head = format!(
            "POST /v1/txt2img HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nx-api-key: {key}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(format!("{head}{body}").as_bytes()).unwrap();
        let mut raw = vec![];
        stream.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        serde_json::from_slice(&raw[split + 4..]).unwrap()
    };
    let answer = post(&prompt);
    let short = post("a red circle");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(answer["truncated"]["prompt"].as_str(), Some(tail), "{answer:?}");
    assert!(short.get("truncated").is_none() && short["images"].is_array(), "{short:?}");
}

#[test]
fn resume_latest_names_the_damaged_checkpoint_it_skips() {
    let f = fixture();
    let tmp = tempdir();
    let run = own_run(tmp.path());
    let student = run.join("checkpoints/step-4/student.safetensors");
    let bytes = std::fs::read(&student).unwrap();
    std::fs::write(&student, &bytes[..bytes.len() / 2]).unwrap();
    let o = sdkd(&["train", "--quiet", "--config", s(&config(f, &run, 4, 42, 10)), "--resume", "latest"]);
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("skipping") && e.contains("step-4") && e.contains("student.safetensors"), "{e}");
    assert!(e.contains("step-2"), "it resumes from step-2: {e}");
}
