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

/// Every file of `before` is still there, byte for byte.
fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>) {
    for (rel, bytes) in before {
        let now = std::fs::read(dir.join(rel)).unwrap_or_else(|e| panic!("{} is gone: {e}", dir.join(rel).display()));
        assert!(now == *bytes, "{} changed", dir.join(rel).display());
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
    let o = sdkd(&["generate", "--model", s(&fixture().teacher), "--prompt", "a red circle", "--steps", "1", "--out", s(&out), "--device", "cpu", "--overwrite"]);
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

// ---- issue 29: the overwrite rule at every depth, outputs, foreign databases, hostile files ----

/// `--overwrite` of a folder sdkd made refuses while any file in it, at any depth, is one sdkd
/// did not write there (named), and leaves every file as it was; without them it replaces.
#[test]
fn overwrite_refuses_files_sdkd_did_not_write_at_any_depth() {
    let f = fixture();
    let tmp = tempdir();
    // a run: the user's files inside checkpoints/, samples/ and tb/ (once only the top was looked at)
    let run = own_run(tmp.path());
    let cfg = config(f, &run, 2, 7, 1);
    for (rel, needle) in [("checkpoints/notes.txt", "checkpoints/notes.txt"), ("checkpoints/step-2/mine.ckpt", "step-2/mine.ckpt"), ("samples/cat.png", "samples/cat.png"), ("tb/other.events", "tb/other.events")] {
        std::fs::create_dir_all(run.join(rel).parent().unwrap()).unwrap();
        std::fs::write(run.join(rel), "the user's").unwrap();
        let before = snapshot(&run);
        assert_clean_failure(&sdkd(&["train", "--quiet", "--config", s(&cfg), "--overwrite"]), needle);
        assert_unchanged(&run, &before);
        std::fs::remove_file(run.join(rel)).unwrap();
    }

    // export (a UNet folder and a pipeline folder), prune and synth: a model card, a licence, notes deep inside
    let ckpt = run.join("checkpoints/step-4");
    let export = |out: &Path, extra: &[&str]| sdkd(&[&["export", "--checkpoint", s(&ckpt), "--out", s(out), "--overwrite"][..], extra].concat());
    let prune = |out: &Path| sdkd(&["prune", "--teacher", s(&f.teacher), "--student", "bk_tiny", "--out", s(out), "--overwrite"]);
    let synth = |out: &Path| sdkd(&["synth", "--out", s(out), "--count", "2", "--resolution", "16", "--overwrite"]);
    // convert: a single file to a pipeline folder
    let single = tmp.path().join("single.safetensors");
    ok(&sdkd(&["convert", "--from", s(&f.teacher), "--to", s(&single)]));
    let convert = |out: &Path| sdkd(&["convert", "--from", s(&single), "--config", s(&f.teacher), "--to", s(out), "--overwrite"]);
    let cases: Vec<(PathBuf, &str, Box<dyn Fn(&Path) -> Output>)> = vec![
        (tmp.path().join("unet"), "README.md", Box::new(|o: &Path| export(o, &[]))),
        (tmp.path().join("pipe"), "unet/notes.txt", Box::new(|o: &Path| export(o, &["--format", "pipeline"]))),
        (tmp.path().join("pipe2"), "LICENSE", Box::new(|o: &Path| export(o, &["--format", "pipeline"]))),
        (tmp.path().join("pruned"), "README.md", Box::new(|o: &Path| prune(o))),
        (tmp.path().join("set"), "holiday.png", Box::new(|o: &Path| synth(o))),
        (tmp.path().join("converted"), "scheduler/notes.txt", Box::new(|o: &Path| convert(o))),
    ];
    for (out, added, make) in &cases {
        ok(&make(out));
        std::fs::write(out.join(added), "the user's own").unwrap();
        let before = snapshot(out);
        assert_clean_failure(&make(out), added);
        assert_unchanged(out, &before);
        // a file sdkd wrote, changed by the user (its size differs), is theirs too
        std::fs::remove_file(out.join(added)).unwrap();
        let written = if out.join("config.json").exists() { out.join("config.json") } else if out.join("metadata.jsonl").exists() { out.join("metadata.jsonl") } else { out.join("model_index.json") };
        let mut text = std::fs::read(&written).unwrap();
        text.extend_from_slice(b"\n");
        std::fs::write(&written, &text).unwrap();
        let before = snapshot(out);
        let name = written.file_name().unwrap().to_str().unwrap();
        assert_clean_failure(&make(out), name);
        assert_unchanged(out, &before);
        std::fs::write(&written, &text[..text.len() - 1]).unwrap();
        ok(&make(out)); // only sdkd's files: replaced
    }
}

/// A folder of another trainer's layout (Lightning, Hydra: config.yaml and checkpoints/) is not
/// a run sdkd made, even with --overwrite.
#[test]
fn train_overwrite_refuses_another_tools_checkpoints() {
    let f = fixture();
    let tmp = tempdir();
    let other = tmp.path().join("lightning");
    std::fs::create_dir_all(other.join("checkpoints")).unwrap();
    std::fs::create_dir_all(other.join("lightning_logs/version_0")).unwrap();
    std::fs::write(other.join("config.yaml"), "model:\n  lr: 0.001\n").unwrap();
    std::fs::write(other.join("checkpoints/epoch=3-step=400.ckpt"), vec![7u8; 1000]).unwrap();
    std::fs::write(other.join("lightning_logs/version_0/events.out.tfevents.1.host"), b"events").unwrap();
    let before = snapshot(&other);
    let cfg = config(f, &other, 2, 42, 1);
    for extra in [&[][..], &["--overwrite"][..], &["--resume", "latest"][..]] {
        let o = sdkd(&[&["train", "--quiet", "--config", s(&cfg)][..], extra].concat());
        assert_clean_failure(&o, "which sdkd did not make");
        assert_unchanged(&other, &before);
    }
}

/// `generate` writes no PNG over a file that is there: a named one, image-N.png in a folder, a
/// numbered sibling; with --overwrite only over an image an earlier `sdkd generate` wrote.
#[test]
fn generate_replaces_no_image_it_did_not_write() {
    let f = fixture();
    let tmp = tempdir();
    let photo = std::fs::read(f.data.join("000000.png")).unwrap();
    let gen = |out: &Path, extra: &[&str]| {
        sdkd(&[&["generate", "--model", s(&f.teacher), "--prompt", "x", "--steps", "1", "--seed", "1", "--out", s(out)][..], extra].concat())
    };
    let holiday = tmp.path().join("holiday.png");
    std::fs::write(&holiday, &photo).unwrap();
    let folder = tmp.path().join("imgs");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("image-0.png"), &photo).unwrap();
    std::fs::write(tmp.path().join("out-1.png"), &photo).unwrap();
    let before = snapshot(tmp.path());
    for extra in [&[][..], &["--overwrite"][..]] {
        assert_clean_failure(&gen(&holiday, extra), "holiday.png");
        assert_clean_failure(&gen(&folder, extra), "image-0.png");
        assert_clean_failure(&gen(&tmp.path().join("out.png"), &[extra, &["--samples", "2"][..]].concat()), "out-1.png");
        assert_unchanged(tmp.path(), &before);
    }
    // its own image: refused without --overwrite, replaced with it
    let mine = tmp.path().join("new.png");
    ok(&gen(&mine, &[]));
    let first = std::fs::read(&mine).unwrap();
    assert_clean_failure(&gen(&mine, &[]), "--overwrite");
    assert_eq!(std::fs::read(&mine).unwrap(), first);
    ok(&gen(&mine, &["--overwrite"]));
}

/// `keys` writes only into an sdkd key database: another application's SQLite file (its own
/// tables, or its own application_id) and a file that is not SQLite are refused, byte for byte.
#[test]
fn keys_refuse_another_applications_database() {
    let tmp = tempdir();
    let theirs = tmp.path().join("photos.sqlite");
    let c = rusqlite::Connection::open(&theirs).unwrap();
    c.execute_batch("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT); INSERT INTO photos (path) VALUES ('a.jpg');").unwrap();
    drop(c);
    let marked = tmp.path().join("marked.sqlite");
    let c = rusqlite::Connection::open(&marked).unwrap();
    c.execute_batch("PRAGMA application_id = 1234;").unwrap();
    drop(c);
    let text = tmp.path().join("notes.txt");
    std::fs::write(&text, "not a database at all, but long enough to look like one's header ........").unwrap();
    let before = snapshot(tmp.path());
    for (db, needle) in [(&theirs, "photos"), (&marked, "application_id"), (&text, "not an SQLite database")] {
        for args in [&["keys", "add", "--db", s(db), "--name", "a", "--credits", "5"][..], &["keys", "list", "--db", s(db)][..]] {
            assert_clean_failure(&sdkd(args), needle);
        }
    }
    assert_unchanged(tmp.path(), &before);
    // sdkd's own database is marked as sdkd's and reopens
    let db = tmp.path().join("keys.sqlite");
    ok(&sdkd(&["keys", "add", "--db", s(&db), "--name", "a", "--credits", "5"]));
    ok(&sdkd(&["keys", "add", "--db", s(&db), "--name", "b", "--credits", "5"]));
    let id: i64 = rusqlite::Connection::open(&db).unwrap().query_row("PRAGMA application_id", [], |r| r.get(0)).unwrap();
    assert_eq!(id, 0x7364_6b64);
    // a revoked key's credit says it is revoked
    ok(&sdkd(&["keys", "revoke", "--db", s(&db), "--name", "a"]));
    let o = sdkd(&["keys", "credit", "--db", s(&db), "--name", "a", "--add", "3"]);
    ok(&o);
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));
}

/// A `.ckpt` whose pickle nests 200,000 lists (a 400 KB file) is refused, not a stack overflow
/// (rc 134): the depth check fired, and dropping the nested values recursed.
#[test]
fn a_deeply_nested_pickle_is_an_error_not_a_stack_overflow() {
    use std::io::Write;
    let tmp = tempdir();
    const N: usize = 200_000;
    let mut root = b"\x80\x02".to_vec();
    root.extend(std::iter::repeat_n(b']', N));
    root.extend(std::iter::repeat_n(b'a', N - 1));
    let mut popped = root.clone();
    root.push(b'.');
    popped.extend_from_slice(b"0N."); // the nested value dropped by POP, then None
    for (name, pickle) in [("deep.ckpt", root), ("popped.ckpt", popped)] {
        let path = tmp.path().join(name);
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", opts).unwrap();
        zip.write_all(&pickle).unwrap();
        zip.start_file("archive/byteorder", opts).unwrap();
        zip.write_all(b"little").unwrap();
        zip.finish().unwrap();
        let o = sdkd(&["convert", "--from", s(&path), "--to", s(&tmp.path().join(format!("{name}.out")))]);
        assert_clean_failure(&o, name);
        assert!(!tmp.path().join(format!("{name}.out")).exists());
    }
}

/// FID statistics no image set has (NaN, infinite, a covariance with a negative eigenvalue or
/// not symmetric) are refused when read, naming the array; once they scored or panicked.
#[test]
fn impossible_fid_statistics_are_refused() {
    use sdkd::eval::fid::Stats;
    use tch::{Kind, Tensor};
    let tmp = tempdir();
    let d = 8;
    let eye = Tensor::eye(d, (Kind::Double, tch::Device::Cpu));
    let mu = Tensor::zeros([d], (Kind::Double, tch::Device::Cpu));
    let asym = eye.copy();
    let _ = asym.get(0).get(1).fill_(0.5);
    let cases = [
        ("negative", mu.copy(), -&eye, "negative eigenvalue"),
        ("inf_mu", mu.fill(f64::INFINITY), eye.copy(), "mu"),
        ("nan_sigma", mu.copy(), eye.fill(f64::NAN), "sigma"),
        ("asymmetric", mu.copy(), asym, "symmetric"),
    ];
    for (name, m, sigma, needle) in cases {
        let path = tmp.path().join(format!("{name}.npz"));
        Tensor::write_npz(&[("mu", &m), ("sigma", &sigma)], &path).unwrap();
        let e = format!("{:#}", Stats::read_npz(&path).err().unwrap_or_else(|| panic!("{name}: accepted")));
        assert!(e.contains(needle) && e.contains(&format!("{name}.npz")), "{name}: {e}");
    }
    let good = tmp.path().join("good.npz");
    Tensor::write_npz(&[("mu", &mu), ("sigma", &eye)], &good).unwrap();
    let s = Stats::read_npz(&good).unwrap();
    assert!(sdkd::eval::fid::frechet_distance(&s, &s).unwrap().abs() < 1e-9);
}

/// Sizes no machine holds are refused by name before anything is allocated: `plan` at an
/// absurd data.resolution (once its probe panicked or was OOM-killed), `bench --latent-size`.
#[test]
fn plan_and_bench_refuse_sizes_no_machine_holds() {
    let f = fixture();
    let tmp = tempdir();
    let yaml = tmp.path().join("huge.yaml");
    std::fs::write(
        &yaml,
        format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 800000\ntrain:\n  batch_size: 1\n  device: cpu\n  precision: fp32\nvalidation:\n  every: 0\n",
            f.teacher.display(),
            tmp.path().join("out").display(),
            f.data.display()
        ),
    )
    .unwrap();
    assert_clean_failure(&sdkd(&["plan", "--config", s(&yaml), "--device", "cpu"]), "data.resolution = 800000");
    for mode in ["infer", "train"] {
        let o = sdkd(&["bench", "--mode", mode, "--teacher", s(&f.teacher), "--student", "bk_small", "--latent-size", "100000", "--steps", "1", "--warmup", "0"]);
        assert_clean_failure(&o, "--latent-size 100000");
    }
}

/// Files sdkd writes get the process umask's mode, as any tool's (0666 & !umask): the
/// safetensors files once were 0600 whatever the umask.
#[test]
fn written_files_follow_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let f = fixture();
    let tmp = tempdir();
    for (umask, want) in [(0o002u32, 0o664u32), (0o022, 0o644)] {
        let out = tmp.path().join(format!("pruned-{umask:o}"));
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sdkd"));
        cmd.args(["prune", "--teacher", s(&f.teacher), "--student", "bk_tiny", "--out", s(&out)]);
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask as libc::mode_t);
                Ok(())
            });
        }
        ok(&cmd.output().unwrap());
        for rel in snapshot(&out).keys() {
            let mode = std::fs::metadata(out.join(rel)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{} has mode {mode:o} under umask {umask:o}", rel.display());
        }
    }
}

/// Zero counts that would do nothing (or everything) are refused by flag, as their config keys are.
#[test]
fn zero_counts_are_refused_by_flag() {
    let f = fixture();
    let tmp = tempdir();
    let t = s(&f.teacher);
    let out = tmp.path().join("out");
    let db = tmp.path().join("keys.sqlite");
    let prompts = f.data.join("metadata.jsonl");
    ok(&sdkd(&["keys", "add", "--db", s(&db), "--name", "a"]));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["eval", "--images", s(&f.data), "--out", s(&out), "--batch-size", "0"], "--batch-size 0"),
        (vec!["eval", "--model", t, "--prompts", s(&prompts), "--out", s(&out), "--batch-size", "0"], "--batch-size 0"),
        (vec!["eval", "fid", s(&f.data), s(&f.data), "--batch-size", "0"], "--batch-size 0"),
        (vec!["serve", "--model", t, "--db", s(&db), "--max-request-seconds", "0"], "--max-request-seconds 0"),
        (vec!["preprocess", "--teacher", t, "--data", s(&f.data), "--resolution", "16", "--out", s(&out), "--min-size", "0"], "--min-size"),
    ];
    for (args, needle) in cases {
        assert_clean_failure(&sdkd(&args), needle);
    }
    assert!(!out.exists());
}

/// A run's output_dir never lies inside what the run reads (the teacher, the data), as export
/// and prune refuse it; nothing is created there.
#[test]
fn train_refuses_an_output_dir_inside_what_it_reads() {
    let f = fixture();
    let tmp = tempdir();
    let teacher_before = snapshot(&f.teacher);
    let data_before = snapshot(&f.data);
    for (inside, needle) in [(f.teacher.join("runs/a"), "teacher"), (f.data.join("run"), "data.path")] {
        let yaml = tmp.path().join("c.yaml");
        let text = format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\ntrain:\n  batch_size: 2\n  max_steps: 2\n  device: cpu\nvalidation:\n  every: 0\n",
            f.teacher.display(),
            inside.display(),
            f.data.display()
        );
        std::fs::write(&yaml, text).unwrap();
        assert_clean_failure(&sdkd(&["train", "--quiet", "--config", s(&yaml)]), needle);
        assert!(!inside.exists(), "{} was created", inside.display());
    }
    assert_unchanged(&f.teacher, &teacher_before);
    assert_unchanged(&f.data, &data_before);
}

/// A latent cache decides the resolution (a data.resolution that differs is named, not recorded
/// in config.yaml as if used), and a data.cache that is no cache says so.
#[test]
fn a_latent_cache_is_checked_against_the_config() {
    let f = fixture();
    let tmp = tempdir();
    let cache = tmp.path().join("cache");
    ok(&sdkd(&["preprocess", "--teacher", s(&f.teacher), "--data", s(&f.data), "--resolution", "16", "--out", s(&cache)]));
    let run = |cache: &Path, resolution: u32| {
        let out = tmp.path().join(format!("run-{resolution}"));
        let yaml = tmp.path().join(format!("cache-{resolution}.yaml"));
        std::fs::write(
            &yaml,
            format!(
                "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  cache: {}\n  resolution: {resolution}\ntrain:\n  batch_size: 2\n  max_steps: 1\n  device: cpu\n  precision: fp32\nvalidation:\n  every: 0\n",
                f.teacher.display(),
                out.display(),
                cache.display()
            ),
        )
        .unwrap();
        (sdkd(&["train", "--quiet", "--config", s(&yaml)]), out)
    };
    let (o, out) = run(&cache, 32);
    assert_clean_failure(&o, "data.resolution = 32");
    assert!(stderr(&o).contains("16 px"), "{}", stderr(&o));
    assert!(!out.exists());
    let (o, _) = run(&f.data, 16);
    assert_clean_failure(&o, "data.cache");
    assert!(stderr(&o).contains("not an sdkd latent cache"), "{}", stderr(&o));
    let (o, out) = run(&cache, 16);
    ok(&o);
    assert!(std::fs::read_to_string(out.join("config.yaml")).unwrap().contains("resolution: 16"));
}

/// A UNet whose weights are NaN makes no image: the load names the tensor.
#[test]
fn non_finite_weights_are_refused_by_name() {
    let tmp = tempdir();
    let pipe = tmp.path().join("pipe");
    copy_tree(&fixture().teacher, &pipe);
    let file = pipe.join("unet/diffusion_pytorch_model.safetensors");
    let tensors: Vec<(String, tch::Tensor)> =
        sdkd::models::weights::read_all(&file).unwrap().into_iter().map(|(n, t)| (n, t.fill(f64::NAN))).collect();
    sdkd::models::weights::save(&file, &tensors, None).unwrap();
    let out = tmp.path().join("x.png");
    let o = sdkd(&["generate", "--model", s(&pipe), "--prompt", "x", "--steps", "1", "--out", s(&out)]);
    assert_clean_failure(&o, "NaN or infinite");
    assert!(stderr(&o).contains("conv_in.weight"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// A webdataset `.txt` caption that is not UTF-8 is a bad sample naming its shard and key (it
/// was trained on as U+FFFD).
#[test]
fn a_non_utf8_caption_in_a_shard_is_a_bad_sample() {
    use sdkd::data::{open_image_rows, DataFormat, DataOptions, Filters};
    let tmp = tempdir();
    let shard = tmp.path().join("00000.tar");
    let png = std::fs::read(fixture().data.join("000000.png")).unwrap();
    let mut tar = tar::Builder::new(std::fs::File::create(&shard).unwrap());
    for (key, txt) in [("a0", &b"a red circle"[..]), ("a1", &b"caf\xe9 \xff"[..])] {
        for (ext, data) in [("png", &png[..]), ("txt", txt)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, format!("{key}.{ext}"), data).unwrap();
        }
    }
    tar.finish().unwrap();
    drop(tar);
    let opts = DataOptions { format: Some(DataFormat::Webdataset), caption: None, image_column: None, filters: Filters::default() };
    let rows = open_image_rows(s(tmp.path()), "data.shards", &opts).unwrap();
    assert_eq!(rows.decode(0).unwrap().1, "a red circle");
    let bad = rows.decode(1).err().expect("a caption that is not UTF-8 is a bad sample");
    assert!(bad.reason.contains("a1") && bad.reason.contains("UTF-8") && bad.file.ends_with("00000.tar"), "{bad:?}");
}

/// A parquet caption column that holds numbers is named as such (it was "null text").
#[test]
fn a_parquet_caption_column_of_numbers_is_named() {
    let tmp = tempdir();
    let file = tmp.path().join("train-00000-of-00001.parquet");
    let script = format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         png = open({:?}, 'rb').read()\n\
         t = pa.table({{'image': [{{'bytes': png, 'path': None}}], 'text': pa.array([7], pa.int64())}})\n\
         pq.write_table(t, {:?})\n",
        s(&fixture().data.join("000000.png")),
        s(&file)
    );
    let py = python_command().args(["-c", &script]).output().unwrap();
    ok(&py);
    let opts = sdkd::data::DataOptions { format: Some(sdkd::data::DataFormat::Parquet), caption: None, image_column: None, filters: Default::default() };
    let e = format!("{:#}", sdkd::data::open_image_rows(s(tmp.path()), "data.shards", &opts).err().expect("refused"));
    assert!(e.contains("\"text\"") && e.contains("INT64") && e.contains("not text"), "{e}");
}

/// `data.filter` conditions no value passes (NaN) are refused when the config loads, by key.
#[test]
fn a_nan_filter_is_refused_by_key() {
    let f = fixture();
    let tmp = tempdir();
    let yaml = tmp.path().join("nan.yaml");
    std::fs::write(
        &yaml,
        format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  shards: {}\n  filter: {{aesthetic_score: \">= nan\"}}\n  resolution: 16\ntrain:\n  device: cpu\nvalidation:\n  every: 0\n",
            f.teacher.display(),
            tmp.path().join("out").display(),
            tmp.path().display()
        ),
    )
    .unwrap();
    assert_clean_failure(&sdkd(&["train", "--quiet", "--config", s(&yaml)]), "data.filter.aesthetic_score");
}

/// A checkpoint whose bytes changed at the same size (a flipped bit) is named when a run resumes
/// from it, by the CRC-32 its state.json records: `latest` skips it, a named one is refused.
#[test]
fn a_checkpoint_flipped_at_equal_size_is_named_on_resume() {
    let f = fixture();
    let tmp = tempdir();
    let run = own_run(tmp.path());
    let student = run.join("checkpoints/step-4/student.safetensors");
    let mut bytes = std::fs::read(&student).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&student, &bytes).unwrap();
    let cfg = config(f, &run, 4, 42, 10);
    let o = sdkd(&["train", "--quiet", "--config", s(&cfg), "--resume", s(&run.join("checkpoints/step-4"))]);
    assert_clean_failure(&o, "CRC-32");
    assert!(stderr(&o).contains("student.safetensors"), "{}", stderr(&o));
    let o = sdkd(&["train", "--quiet", "--config", s(&cfg), "--resume", "latest"]);
    ok(&o);
    let e = stderr(&o);
    assert!(e.contains("skipping") && e.contains("step-4") && e.contains("CRC-32"), "{e}");
}

/// An imagefolder's sidecar `.txt` caption that is not UTF-8 is a bad sample naming the file, as
/// in shards (it was trained on as U+FFFD); the other samples load.
#[test]
fn a_non_utf8_sidecar_caption_is_a_bad_sample() {
    let tmp = tempdir();
    let png = std::fs::read(fixture().data.join("000000.png")).unwrap();
    for (name, txt) in [("a", &b"a red circle"[..]), ("b", &b"caf\xe9 \xff"[..])] {
        std::fs::write(tmp.path().join(format!("{name}.png")), &png).unwrap();
        std::fs::write(tmp.path().join(format!("{name}.txt")), txt).unwrap();
    }
    let folder = sdkd::data::ImageFolder::open(tmp.path()).unwrap();
    assert_eq!(folder.decode(0).unwrap().1, "a red circle");
    let bad = folder.decode(1).err().expect("a caption that is not UTF-8 is a bad sample");
    assert!(bad.reason.contains("b.txt") && bad.reason.contains("UTF-8") && bad.file.ends_with("b.png"), "{bad:?}");
    // through the CLI: counted and warned, naming the file, the other sample cached
    let out = tmp.path().join("cache");
    let o = sdkd(&["preprocess", "--teacher", s(&fixture().teacher), "--data", s(tmp.path()), "--resolution", "16", "--out", s(&out)]);
    ok(&o);
    assert!(stderr(&o).contains("b.txt") && String::from_utf8_lossy(&o.stdout).contains("1 bad samples skipped"), "{}{}", stderr(&o), String::from_utf8_lossy(&o.stdout));
}
