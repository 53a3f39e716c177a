//! Data-parallel `sdkd train` on the CPU over Gloo on loopback (docs/distributed.md): 2 ranks ×
//! accum 1 (one torchrun, or two single-process "nodes") compute the run of 1 process × accum 2,
//! with both ranks bit-identical after every step; a run resumes across world sizes at the same
//! global batch; SIGTERM to one rank stops all with one checkpoint; kill -9 of a rank fails the
//! survivor within train.dist_timeout_s, naming it; bad launch environments and resumes are
//! exit-1 errors.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};


/// A tiny run: global batch 4 = batch 2 × `accum` × world; a constant lr after the warm-up (so
/// max_steps does not change the schedule), a loss and a checkpoint every step unless `extra`
/// says otherwise.
fn config(dir: &Path, accum: usize, max_steps: u64, extra: &str) -> PathBuf {
    let f = train_fixture();
    let text = format!(
        "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\n\
         train:\n  batch_size: 2\n  grad_accum: {accum}\n  max_steps: {max_steps}\n  seed: 7\n  device: cpu\n  precision: fp32\n  ema_decay: 0.9\n  dist_timeout_s: 5\n\
         optim:\n  lr: 1.0e-3\n  schedule: constant\n  warmup_steps: 2\n\
         log:\n  every: 1\nvalidation:\n  every: 0\n{}",
        f.teacher.display(),
        dir.join("run").display(),
        f.data.display(),
        if extra.is_empty() { "checkpoint:\n  every: 1\n  keep: 3\n" } else { extra }
    );
    let path = dir.join(format!("run-{accum}-{max_steps}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn torchrun() -> PathBuf {
    root().join(".venv/bin/torchrun")
}

/// `torchrun --no-python ... sdkd train --config cfg`, its output captured.
fn torchrun_train(torchrun_args: &[&str], cfg: &Path) -> Child {
    Command::new(torchrun())
        .arg("--no-python")
        .args(torchrun_args)
        .args([env!("CARGO_BIN_EXE_sdkd"), "train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Rank `rank` of `world` started as srun would (its launch environment set by hand).
fn rank_train(rank: usize, world: usize, port: u16, cfg: &Path, extra_args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(extra_args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn succeeded(out: Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{what}: {:?}\n{}\n{err}", out.status.code(), String::from_utf8_lossy(&out.stdout));
    format!("{}{err}", String::from_utf8_lossy(&out.stdout))
}

fn train_one(cfg: &Path, args: &[&str]) -> String {
    succeeded(sdkd(&[&["train", "--config", cfg.to_str().unwrap()], args].concat()), "one process")
}

/// loss/total per step, read by TensorBoard's own reader.
fn losses(run: &Path) -> Vec<(i64, f64)> {
    let out = Command::new(python()).arg(root().join("tests/reference/trainkit_tb_read.py")).arg(run.join("tb")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["scalars"]["loss/total"].as_array().unwrap().iter().map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap())).collect()
}

/// The 1-process × accum 2 run of 10 steps every data-parallel run here is held to.
fn reference() -> &'static Path {
    static R: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_keep, run) = R.get_or_init(|| {
        let dir = tempdir();
        train_one(&config(dir.path(), 2, 10, "checkpoint:\n  every: 1\n  keep: 10\n"), &["--quiet"]);
        let run = dir.path().join("run");
        (dir, run)
    });
    run
}

fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join(format!("checkpoints/step-{step}"))
}

/// Student and EMA of two checkpoints within 1e-5 relative, tensor by tensor.
fn assert_close_checkpoints(a: &Path, b: &Path) {
    for f in ["student.safetensors", "ema.safetensors"] {
        let (ta, tb) = (read_tensors(&a.join(f)), read_tensors(&b.join(f)));
        assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
        for (k, v) in &ta {
            let e = rel_err(v, &tb[k]);
            assert!(e <= 1e-5, "{f} {k}: rel. error {e:e} between {} and {}", a.display(), b.display());
        }
    }
}

/// Every step's loss within 1e-5 relative of the reference's.
fn assert_losses_match(run: &Path, steps: impl IntoIterator<Item = i64>) {
    let steps: Vec<i64> = steps.into_iter().collect();
    let (ours, theirs) = (losses(run), losses(reference()));
    let ours: Vec<_> = ours.into_iter().filter(|(s, _)| steps.contains(s)).collect();
    assert_eq!(ours.len(), steps.len(), "{ours:?}");
    for (s, l) in ours {
        let r = theirs.iter().find(|(t, _)| *t == s).unwrap().1;
        assert!(((l - r) / r).abs() <= 1e-5, "step {s}: loss {l} vs {r} of one process × accum 2");
    }
}

/// The ranks compared their student and EMA checksums after each of `steps`.
fn assert_identical_every_step(log: &str, steps: std::ops::RangeInclusive<u64>) {
    for s in steps {
        assert!(log.contains(&format!("step {s}: student and EMA bit-identical on all 2 ranks")), "step {s} not checked:\n{log}");
    }
}

#[test]
fn two_ranks_compute_the_run_of_one_process_with_doubled_accum() {
    let reference = reference();
    let tmp = tempdir();
    let port = free_port().to_string();
    let child = torchrun_train(&["--nproc-per-node", "2", "--master-port", &port], &config(tmp.path(), 1, 10, ""));
    let log = succeeded(child.wait_with_output().unwrap(), "torchrun --nproc-per-node 2");
    let run = tmp.path().join("run");
    assert_identical_every_step(&log, 1..=10);
    assert_eq!(log.matches("finished at step 10").count(), 1, "only rank 0 reports:\n{log}");
    assert_losses_match(&run, 1..=10);
    assert_close_checkpoints(&step_dir(&run, 10), &step_dir(reference, 10));
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(step_dir(&run, 10).join("state.json")).unwrap()).unwrap();
    assert_eq!(state["world_size"].as_u64(), Some(2), "{state}");
}

#[test]
fn two_nodes_on_loopback_compute_the_same_run() {
    let reference = reference();
    let tmp = tempdir();
    let cfg = config(tmp.path(), 1, 10, "");
    let port = free_port().to_string();
    let nodes: Vec<Child> = ["0", "1"]
        .iter()
        .map(|node| {
            torchrun_train(&["--nnodes", "2", "--node-rank", node, "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", &port], &cfg)
        })
        .collect();
    let logs: Vec<String> = nodes.into_iter().map(|n| succeeded(n.wait_with_output().unwrap(), "a torchrun --nnodes 2 node")).collect();
    assert_identical_every_step(&logs[0], 1..=10);
    assert!(!logs[1].contains("finished at step"), "node 1 holds rank 1, which reports nothing:\n{}", logs[1]);
    let run = tmp.path().join("run");
    assert_losses_match(&run, 1..=10);
    assert_close_checkpoints(&step_dir(&run, 10), &step_dir(reference, 10));
}

#[test]
fn a_run_resumes_across_world_sizes_at_the_same_global_batch() {
    let reference = reference();
    // 2 ranks × accum 1 for 4 steps, then 1 process × accum 2 to step 8
    let tmp = tempdir();
    let port = free_port().to_string();
    let child = torchrun_train(&["--nproc-per-node", "2", "--master-port", &port], &config(tmp.path(), 1, 4, ""));
    succeeded(child.wait_with_output().unwrap(), "2 ranks, steps 1-4");
    let log = train_one(&config(tmp.path(), 2, 8, ""), &["--resume", "latest"]);
    assert!(log.contains("resuming from") && log.contains("step 4"), "{log}");
    let run = tmp.path().join("run");
    assert_losses_match(&run, 1..=8);
    assert_close_checkpoints(&step_dir(&run, 8), &step_dir(reference, 8));
    // another global batch is another run: in its folder, and from its checkpoint into a new one
    let out = sdkd(&["train", "--config", config(tmp.path(), 3, 9, "").to_str().unwrap(), "--resume", "latest"]);
    assert_clean_failure(&out, "a run resumes only with the same global batch");
    let elsewhere = tempdir();
    let from = step_dir(&run, 8);
    let out = sdkd(&["train", "--config", config(elsewhere.path(), 3, 9, "").to_str().unwrap(), "--resume", from.to_str().unwrap()]);
    assert_clean_failure(&out, "was made with a global batch of 4");
    assert_clean_failure(&out, "this run's is 6");
    assert!(!elsewhere.path().join("run").exists(), "a refused resume writes nothing");
}

#[test]
fn sigterm_to_one_rank_stops_all_with_one_checkpoint_and_the_run_resumes() {
    let reference = reference();
    let tmp = tempdir();
    let no_periodic = "checkpoint:\n  every: 1000\n  keep: 3\n";
    let cfg = config(tmp.path(), 1, 10, no_periodic);
    let port = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, port, &cfg, &[])).collect();
    // once rank 0 has logged step 2, SIGTERM rank 1 alone
    let stderr = ranks[0].stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let t0 = Instant::now();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(120).saturating_sub(t0.elapsed())) {
        if line.starts_with("step 2/10") {
            unsafe { libc_kill(ranks[1].id() as i32, 15) };
            break;
        }
    }
    let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let log0 = reader.join().unwrap();
    for (r, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(0), "rank {r} exits 0 after a signal:\n{log0}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(String::from_utf8_lossy(&outs[0].stdout).contains("interrupted at step"), "{log0}");
    let ckpts = sdkd::distill::checkpoint::list(&tmp.path().join("run")).unwrap();
    assert_eq!(ckpts.len(), 1, "one checkpoint: {ckpts:?}");
    let stopped = ckpts[0].0;
    assert!((1..10).contains(&stopped), "stopped at step {stopped}");
    // resumed on 2 ranks again, it finishes the reference's run
    let port = free_port();
    let ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, port, &cfg, &["--resume", "latest"])).collect();
    for c in ranks {
        succeeded(c.wait_with_output().unwrap(), "resumed rank");
    }
    assert_close_checkpoints(&step_dir(&tmp.path().join("run"), 10), &step_dir(reference, 10));
}

#[test]
fn a_killed_rank_fails_the_survivor_within_the_timeout_naming_it() {
    let tmp = tempdir();
    let cfg = config(tmp.path(), 1, 500, "");
    let port = free_port();
    let mut ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, port, &cfg, &["--quiet"])).collect();
    let second = step_dir(&tmp.path().join("run"), 2);
    let t0 = Instant::now();
    while !second.exists() && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    ranks[1].kill().unwrap(); // SIGKILL
    let killed = Instant::now();
    let _ = ranks[1].wait();
    let survivor = ranks.remove(0).wait_with_output().unwrap();
    let took = killed.elapsed();
    let err = String::from_utf8_lossy(&survivor.stderr);
    assert_eq!(survivor.status.code(), Some(1), "{err}");
    assert!(err.contains("lost rank 1 of 2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(took < Duration::from_secs(5 + 3), "the survivor took {took:?} (train.dist_timeout_s: 5)");
    // every checkpoint folder there is complete, and the newest loads
    let run = tmp.path().join("run");
    let complete = sdkd::distill::checkpoint::list(&run).unwrap();
    let folders = std::fs::read_dir(run.join("checkpoints")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("step-")).count();
    assert!(!complete.is_empty() && complete.len() == folders, "{complete:?} of {folders} folders");
    let newest = sdkd::distill::checkpoint::resolve(&run, "latest").unwrap();
    newest.read_state().unwrap();
}

#[test]
fn bad_launch_environments_are_exit_1_errors() {
    let tmp = tempdir();
    let cfg = config(tmp.path(), 1, 2, "");
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sdkd"));
        c.args(["train", "--config", cfg.to_str().unwrap()]);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    assert_clean_failure(&run(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]), "RANK=2 is not below WORLD_SIZE=2");
    assert_clean_failure(&run(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "29500")]), "MASTER_ADDR is not");
    assert_clean_failure(&run(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_NODELIST", "localhost")]), "SLURM_PROCID=4 is not below SLURM_NTASKS=4");
    assert!(!tmp.path().join("run").exists(), "a refused launch writes nothing");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
