//! Data-parallel `sdkd train` on the CPU over Gloo on loopback (docs/distributed.md): 2 ranks ×
//! accum 1 (one torchrun, or two single-process "nodes") compute the run of 1 process × accum 2,
//! with both ranks bit-identical after every step; a run resumes across world sizes at the same
//! global batch; SIGTERM to one rank stops all with one checkpoint; kill -9 of a rank fails the
//! survivor within train.dist_timeout_s, naming it; bad launch environments and resumes are
//! exit-1 errors; `optim.shard_state` (ZeRO-1) on 2 ranks computes the same run, its checkpoint
//! resumes as 1 process, and on 1 process it is the unsharded step bit for bit.
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

/// `cfg` with `optim.shard_state: true` (ZeRO-1), in place.
fn sharded(cfg: PathBuf) -> PathBuf {
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("warmup_steps: 2\n"));
    std::fs::write(&cfg, text.replace("warmup_steps: 2\n", "warmup_steps: 2\n  shard_state: true\n")).unwrap();
    cfg
}

/// Rank 0's report of its share of the AdamW moments under `optim.shard_state` on 2 ranks: half
/// of them, give or take a padding element per bucket.
fn assert_half_the_moments(log: &str) {
    let line = log.lines().find(|l| l.starts_with("optim.shard_state: rank 0 keeps ")).unwrap_or_else(|| panic!("no share reported:\n{log}"));
    let words: Vec<&str> = line.split(' ').collect();
    let (mine, whole): (i64, i64) = (words[4].parse().unwrap(), words[7].parse().unwrap());
    assert!(line.ends_with("(2 rank(s))") && whole > 4_000_000 && (2 * mine - whole).abs() <= 4 * 2 * 8, "{line}");
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn torchrun() -> PathBuf {
    root().join(".venv/bin/torchrun")
}

/// `torchrun --no-python ... sdkd train --config cfg`, its output captured.
fn torchrun_cmd(torchrun_args: &[&str], cfg: &Path) -> Command {
    let mut c = Command::new(torchrun());
    c.arg("--no-python")
        .args(torchrun_args)
        .args([env!("CARGO_BIN_EXE_sdkd"), "train", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn torchrun_train(torchrun_args: &[&str], cfg: &Path) -> Child {
    torchrun_cmd(torchrun_args, cfg).spawn().unwrap()
}

/// A job id whose SLURM port (15000 + id mod 20000, as `distributed::Launch` derives it when
/// MASTER_PORT is unset) nobody listens on now.
fn free_slurm_job() -> u16 {
    // tests run in parallel: each call starts its search elsewhere
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = ((std::process::id() % 20000) as u16 + 211 * CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 20000;
    (0..20000u16)
        .map(|i| (start + i) % 20000)
        .find(|id| std::net::TcpListener::bind(("127.0.0.1", 15000 + id)).is_ok())
        .expect("a free port in 15000-34999")
}

/// Task `rank` of a `world`-task SLURM job on this node, with the variables srun sets (no
/// MASTER_ADDR/MASTER_PORT: the store is on the node list's first host at the job's port), one
/// intra-op thread as torchrun would give it.
fn rank_train(rank: usize, world: usize, job: u16, cfg: &Path, extra_args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(["train", "--config", cfg.to_str().unwrap()])
        .args(extra_args)
        .env("OMP_NUM_THREADS", "1")
        .env("SLURM_PROCID", rank.to_string())
        .env("SLURM_NTASKS", world.to_string())
        .env("SLURM_LOCALID", rank.to_string())
        .env("SLURM_NTASKS_PER_NODE", world.to_string())
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("SLURM_JOB_ID", job.to_string())
        .env_remove("MASTER_ADDR")
        .env_remove("MASTER_PORT")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
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

/// One process, at one intra-op thread as each rank has (see `reference`).
fn train_one(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkd")).args(["train", "--config", cfg.to_str().unwrap()]).args(args).env("OMP_NUM_THREADS", "1").output().unwrap();
    succeeded(out, "one process, one thread")
}

/// loss/total and grad_norm per step, read by TensorBoard's own reader.
fn losses(run: &Path) -> [Vec<(i64, f64)>; 2] {
    let out = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(run.join("tb")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    ["loss/total", "grad_norm"].map(|tag| v["scalars"][tag].as_array().unwrap().iter().map(|e| (e[0].as_i64().unwrap(), e[1].as_f64().unwrap())).collect())
}

/// The 1-process × accum 2 run of 10 steps every data-parallel run here is held to, at one
/// intra-op thread as each rank has (torchrun sets OMP_NUM_THREADS=1). At LibTorch's default
/// thread count (all cores) the one process's kernels sum in another order, and the two runs
/// drift apart: measured 3e-4 relative after 6 steps (bk_tiny, lr 1e-3).
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

/// Every step's loss and gradient norm (before clipping: a wrongly scaled gradient that AdamW
/// and clipping hide shows there) within 1e-5 relative of the reference's.
fn assert_losses_match(run: &Path, steps: impl IntoIterator<Item = i64>) {
    let steps: Vec<i64> = steps.into_iter().collect();
    let (ours, theirs) = (losses(run), losses(reference()));
    for ((ours, theirs), tag) in ours.into_iter().zip(theirs).zip(["loss", "grad_norm"]) {
        let ours: Vec<_> = ours.into_iter().filter(|(s, _)| steps.contains(s)).collect();
        assert_eq!(ours.len(), steps.len(), "{tag}: {ours:?}");
        for (s, l) in ours {
            let r = theirs.iter().find(|(t, _)| *t == s).unwrap().1;
            assert!(((l - r) / r).abs() <= 1e-5, "step {s}: {tag} {l} vs {r} of one process × accum 2");
        }
    }
}

/// The ranks compared their student and EMA checksums after each of `steps`.
fn assert_identical_every_step(log: &str, steps: std::ops::RangeInclusive<u64>) {
    for s in steps {
        assert!(log.contains(&format!("step {s}: student and EMA bit-identical on all 2 ranks")), "step {s} not checked:\n{log}");
    }
}

/// `method: lcm` on 2 Gloo ranks × accum 1 equals 1 process × accum 2: each rank draws its
/// micro-batches' solver indices, noise and w from the micro-batch's own key, so after 3 steps
/// the student, its EMA and the LCD target network are within 1e-5 relative of the one process's,
/// and so is every step's consistency loss.
#[test]
fn two_ranks_distil_lcm_as_one_process_with_doubled_accum() {
    let (one, two) = (tempdir(), tempdir());
    let lcm = "method: lcm\ncheckpoint:\n  every: 3\n  keep: 1\n";
    train_one(&config(one.path(), 2, 3, lcm), &["--quiet"]);
    let port = free_port().to_string();
    let child = torchrun_train(&["--nproc-per-node", "2", "--master-port", &port], &config(two.path(), 1, 3, lcm));
    let log = succeeded(child.wait_with_output().unwrap(), "torchrun --nproc-per-node 2, method: lcm");
    assert!(log.contains("step 3: student and EMA bit-identical on all 2 ranks"), "{log}");
    let (a, b) = (step_dir(&one.path().join("run"), 3), step_dir(&two.path().join("run"), 3));
    for f in ["student.safetensors", "ema.safetensors", "target.safetensors"] {
        let (ta, tb) = (read_tensors(&a.join(f)), read_tensors(&b.join(f)));
        assert!(ta.contains_key("time_embedding.cond_proj.weight") && ta.keys().eq(tb.keys()), "{f}");
        for (k, v) in &ta {
            let e = rel_err(&tb[k], v);
            assert!(e <= 1e-5, "{f} {k}: 2 ranks vs 1 process, rel. error {e:e}");
        }
    }
    let consistency = |run: &Path| -> Vec<f64> {
        let out = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(run.join("tb")).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["scalars"]["loss/consistency"].as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect()
    };
    let (l1, l2) = (consistency(&one.path().join("run")), consistency(&two.path().join("run")));
    assert_eq!(l1.len(), 3);
    for (x, y) in l1.iter().zip(&l2) {
        assert!(((x - y) / x).abs() <= 1e-5, "consistency loss {y} on 2 ranks vs {x}");
    }
}

#[test]
fn two_ranks_compute_the_run_of_one_process_with_doubled_accum() {
    let reference = reference();
    let tmp = tempdir();
    let port = free_port().to_string();
    let states = tmp.path().join("rank-state");
    let mut cmd = torchrun_cmd(&["--nproc-per-node", "2", "--master-port", &port], &config(tmp.path(), 1, 10, ""));
    let child = cmd.env(sdkd::distill::trainer::RANK_STATE_DIR, &states).spawn().unwrap();
    let log = succeeded(child.wait_with_output().unwrap(), "torchrun --nproc-per-node 2");
    let run = tmp.path().join("run");
    assert_identical_every_step(&log, 1..=10);
    // the same, read from each rank's own copy (not through sdkd's checksum): rank 1's student
    // and EMA equal rank 0's at the start and after every step, and rank 0's are the checkpoints'
    // (the last 3 kept)
    for step in 0..=10 {
        let (r0, r1) = (read_tensors(&states.join(format!("rank-0/step-{step}.safetensors"))), read_tensors(&states.join(format!("rank-1/step-{step}.safetensors"))));
        assert!(r0.len() > 100 && r0.keys().any(|k| k.starts_with("ema.")), "step {step}: {} tensors", r0.len());
        assert_eq!(r0.keys().collect::<Vec<_>>(), r1.keys().collect::<Vec<_>>());
        for (k, v) in &r0 {
            assert!(v.equal(&r1[k]), "step {step}: rank 1's {k} differs from rank 0's");
        }
        if step >= 8 {
            for (k, v) in read_tensors(&step_dir(&run, step).join("student.safetensors")) {
                assert!(v.equal(&r0[&format!("student.{k}")]), "step {step}: checkpoint's {k} vs rank 0's");
            }
        }
    }
    assert_eq!(log.matches("finished at step 10").count(), 1, "only rank 0 reports:\n{log}");
    assert_losses_match(&run, 1..=10);
    assert_close_checkpoints(&step_dir(&run, 10), &step_dir(reference, 10));
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(step_dir(&run, 10).join("state.json")).unwrap()).unwrap();
    assert_eq!(state["world_size"].as_u64(), Some(2), "{state}");
}

/// Two torchrun "nodes" of one rank each, under `optim.shard_state` (ZeRO-1: each rank keeps the
/// AdamW moments of half the parameters, gradients reduce-scattered, parameters all-gathered):
/// the ranks stay bit-identical after every step, and losses, student and EMA equal the run of 1
/// process × accum 2 within 1e-5.
#[test]
fn two_nodes_on_loopback_compute_the_same_run() {
    let reference = reference();
    let tmp = tempdir();
    let cfg = sharded(config(tmp.path(), 1, 10, ""));
    let port = free_port().to_string();
    let nodes: Vec<Child> = ["0", "1"]
        .iter()
        .map(|node| {
            torchrun_train(&["--nnodes", "2", "--node-rank", node, "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", &port], &cfg)
        })
        .collect();
    let logs: Vec<String> = nodes.into_iter().map(|n| succeeded(n.wait_with_output().unwrap(), "a torchrun --nnodes 2 node")).collect();
    assert_identical_every_step(&logs[0], 1..=10);
    assert_half_the_moments(&logs[0]);
    assert!(!logs[1].contains("finished at step"), "node 1 holds rank 1, which reports nothing:\n{}", logs[1]);
    let run = tmp.path().join("run");
    assert_losses_match(&run, 1..=10);
    assert_close_checkpoints(&step_dir(&run, 10), &step_dir(reference, 10));
}

/// 2 ranks under `optim.shard_state` for 4 steps, then 1 process × accum 2 (unsharded) to step 8,
/// equal the reference run: the sharded checkpoint holds the whole AdamW state. The same
/// checkpoint resumed by 1 process with `shard_state` gives the unsharded resume's student, EMA
/// and optimizer state bit for bit.
#[test]
fn a_run_resumes_across_world_sizes_at_the_same_global_batch() {
    let reference = reference();
    let tmp = tempdir();
    let port = free_port().to_string();
    let child = torchrun_train(&["--nproc-per-node", "2", "--master-port", &port], &sharded(config(tmp.path(), 1, 4, "")));
    assert_half_the_moments(&succeeded(child.wait_with_output().unwrap(), "2 ranks, steps 1-4"));
    let run = tmp.path().join("run");
    let (ours, theirs) = (read_tensors(&step_dir(&run, 4).join("optimizer.safetensors")), read_tensors(&step_dir(reference, 4).join("optimizer.safetensors")));
    assert!(ours.keys().eq(theirs.keys()) && ours.len() > 300, "the whole state, named as unsharded AdamW names it");
    for (k, v) in &ours {
        let e = rel_err(v, &theirs[k]);
        assert!(e <= 1e-4, "step 4: {k}: rel. error {e:e} against 1 process × accum 2");
    }
    // one process with shard_state whose accum cannot make the 2 sharded ranks' global batch:
    // refused, naming the accum that would, and nothing written
    let refused = tempdir();
    let out = sdkd(&["train", "--config", sharded(config(refused.path(), 3, 9, "")).to_str().unwrap(), "--resume", step_dir(&run, 4).to_str().unwrap()]);
    assert_clean_failure(&out, "was made with a global batch of 4 (batch_size 2 × grad_accum 1 × 2 process(es)); this run's is 6");
    assert_clean_failure(&out, "with 1 process(es) that is train.grad_accum: 2");
    assert!(!refused.path().join("run").exists(), "a refused resume writes nothing");
    // one process with shard_state, from the same checkpoint, into a folder of its own
    let one = tempdir();
    train_one(&sharded(config(one.path(), 2, 8, "")), &["--resume", step_dir(&run, 4).to_str().unwrap()]);
    let log = train_one(&config(tmp.path(), 2, 8, ""), &["--resume", "latest"]);
    assert!(log.contains("resuming from") && log.contains("step 4"), "{log}");
    assert_losses_match(&run, 1..=8);
    assert_close_checkpoints(&step_dir(&run, 8), &step_dir(reference, 8));
    for step in 6..=8 {
        for f in ["student.safetensors", "ema.safetensors", "optimizer.safetensors"] {
            let (a, b) = (read_tensors(&step_dir(&one.path().join("run"), step).join(f)), read_tensors(&step_dir(&run, step).join(f)));
            assert!(a.len() > 100 && a.keys().eq(b.keys()), "{f}");
            for (k, v) in &a {
                assert!(v.equal(&b[k]), "step {step}: {f} {k}: 1 process with shard_state differs from without");
            }
        }
    }
    // another global batch is another run: in its folder, and from its checkpoint into a new one
    let out = sdkd(&["train", "--config", config(tmp.path(), 3, 9, "").to_str().unwrap(), "--resume", "latest"]);
    assert_clean_failure(&out, "a run resumes only with the same global batch");
    let elsewhere = tempdir();
    let out = sdkd(&["train", "--config", config(elsewhere.path(), 3, 9, "").to_str().unwrap(), "--resume", step_dir(&run, 8).to_str().unwrap()]);
    assert_clean_failure(&out, "was made with a global batch of 4");
    assert_clean_failure(&out, "this run's is 6");
    assert!(!elsewhere.path().join("run").exists(), "a refused resume writes nothing");
}

/// SIGTERM to rank 1, then (resumed) to rank 0: each time every rank exits 0 after one
/// checkpoint, and the run resumed once more finishes as the reference's.
#[test]
fn sigterm_to_one_rank_stops_all_with_one_checkpoint_and_the_run_resumes() {
    let reference = reference();
    let tmp = tempdir();
    let no_periodic = "checkpoint:\n  every: 1000\n  keep: 3\n";
    let cfg = config(tmp.path(), 1, 10, no_periodic);
    let mut stopped = 0;
    for (victim, resume) in [(1usize, false), (0, true)] {
        let job = free_slurm_job();
        let args: &[&str] = if resume { &["--resume", "latest"] } else { &[] };
        let mut ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, job, &cfg, args)).collect();
        // once rank 0 has logged a step past the one it started from, SIGTERM the victim alone
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
            let step = line.strip_prefix("step ").and_then(|l| l.split('/').next()).and_then(|n| n.parse::<u64>().ok());
            if step.is_some_and(|s| s >= stopped + 2) {
                unsafe { libc_kill(ranks[victim].id() as i32, 15) };
                break;
            }
        }
        let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        let log0 = reader.join().unwrap();
        for (r, out) in outs.iter().enumerate() {
            assert_eq!(out.status.code(), Some(0), "SIGTERM to rank {victim}: rank {r} exits 0:\n{log0}\n{}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(String::from_utf8_lossy(&outs[0].stdout).contains("interrupted at step"), "{log0}");
        let ckpts = sdkd::distill::checkpoint::list(&tmp.path().join("run")).unwrap();
        assert_eq!(ckpts.len(), 1 + usize::from(resume), "one checkpoint per stop: {ckpts:?}");
        let newest = ckpts.iter().map(|c| c.0).max().unwrap();
        assert!((stopped + 1..10).contains(&newest), "SIGTERM to rank {victim}: stopped at step {newest}, after {stopped}");
        stopped = newest;
    }
    // resumed on 2 ranks again, it finishes the reference's run
    let job = free_slurm_job();
    let ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, job, &cfg, &["--resume", "latest"])).collect();
    for c in ranks {
        succeeded(c.wait_with_output().unwrap(), "resumed rank");
    }
    assert_close_checkpoints(&step_dir(&tmp.path().join("run"), 10), &step_dir(reference, 10));
}

/// kill -9 of rank 1, then (another run) of rank 0, which hosts the rendezvous store: the
/// survivor exits 1 naming the lost rank within train.dist_timeout_s (5 s) + 6 s (measured:
/// 3.2 s after rank 1's death; 8.6 s after rank 0's, whose store the survivor waits on for the
/// timeout before naming it), and every checkpoint folder left is complete.
#[test]
fn a_killed_rank_fails_the_survivor_within_the_timeout_naming_it() {
    for victim in [1, 0] {
        let tmp = tempdir();
        let cfg = config(tmp.path(), 1, 500, "");
        let job = free_slurm_job();
        let mut ranks: Vec<Child> = (0..2).map(|r| rank_train(r, 2, job, &cfg, &["--quiet"])).collect();
        let second = step_dir(&tmp.path().join("run"), 2);
        let t0 = Instant::now();
        while !second.exists() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(10));
        }
        ranks[victim].kill().unwrap(); // SIGKILL
        let killed = Instant::now();
        let _ = ranks[victim].wait();
        let survivor = ranks.remove(1 - victim).wait_with_output().unwrap();
        let took = killed.elapsed();
        let err = String::from_utf8_lossy(&survivor.stderr);
        eprintln!("rank {victim} killed: the survivor exited after {took:?}");
        assert_eq!(survivor.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("lost rank {victim} of 2")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(took < Duration::from_secs(5 + 6), "the survivor took {took:?} (train.dist_timeout_s: 5)");
        // every checkpoint folder there is complete, and the newest loads
        let run = tmp.path().join("run");
        let complete = sdkd::distill::checkpoint::list(&run).unwrap();
        let folders = std::fs::read_dir(run.join("checkpoints")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("step-")).count();
        assert!(!complete.is_empty() && complete.len() == folders, "{complete:?} of {folders} folders");
        let newest = sdkd::distill::checkpoint::resolve(&run, "latest").unwrap();
        newest.read_state().unwrap();
    }
}

/// The negative control of the rank check: rank 1 started with another learning rate takes
/// another AdamW step from the same averaged gradients. Step 1's learning rate is 0 on both (the
/// first of 2 warm-up steps), so the ranks part at step 2: that comparison fails both ranks with
/// exit 1, naming rank 1, and the ranks' own copies show what the checksum reported: equal at the
/// start and after step 1, not after step 2.
#[test]
fn a_diverged_rank_is_caught_by_the_rank_check() {
    let tmp = tempdir();
    let (cfg, other) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&cfg).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let cfg = config(&cfg, 1, 3, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("lr: 1.0e-3"));
    std::fs::write(other.join("run.yaml"), text.replace("lr: 1.0e-3", "lr: 2.0e-3")).unwrap();
    let states = tmp.path().join("rank-state");
    let port = free_port();
    let ranks: Vec<Child> = [(0, cfg.clone()), (1, other.join("run.yaml"))]
        .into_iter()
        .map(|(r, c)| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sdkd"));
            cmd.args(["train", "--quiet", "--config", c.to_str().unwrap()])
                .envs([("OMP_NUM_THREADS", "1"), ("RANK", &r.to_string()), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", &port.to_string())])
                .env(sdkd::distill::trainer::RANK_STATE_DIR, &states)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().unwrap()
        })
        .collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert_clean_failure(&out, "at step 2, the student and EMA of rank(s) 1 differ from rank 0's");
        eprintln!("rank {r}: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
    }
    let differing = |step: u64| -> usize {
        let (a, b) = (read_tensors(&states.join(format!("rank-0/step-{step}.safetensors"))), read_tensors(&states.join(format!("rank-1/step-{step}.safetensors"))));
        a.iter().filter(|(k, v)| !v.equal(&b[*k])).count()
    };
    assert_eq!(differing(0), 0, "rank 0's weights broadcast at the start");
    assert_eq!(differing(1), 0, "step 1 at learning rate 0");
    assert!(differing(2) > 100, "step 2: {} tensors differ", differing(2));
    assert!(!states.join("rank-0/step-3.safetensors").exists(), "the run went on after the divergence");
}

/// ZeRO-1's pieces (`distill::zero::Shards`) on two Gloo ranks in this process (threads), with
/// 40-byte buckets so that parameters of 5, 3, 12, 1 and 7 elements fall in three buckets and
/// are cut between the ranks: 3 clipped steps from different gradients on each rank equal one
/// unsharded AdamW on the averaged gradients (parameters and global norm within 1e-6, the sum
/// of per-rank squared norms being the only other rounding), on both ranks; the gathered state
/// equals the unsharded one; loaded into fresh shards on both ranks it gathers back bit for bit,
/// and so does the unsharded AdamW's state (a one-process checkpoint resumed on 2 sharded ranks).
#[test]
fn sharded_adamw_on_two_ranks_equals_adamw_on_the_averaged_gradients() {
    use sdkd::distill::optim::{clip_grad_norm, clip_grads, clip_to_total, AdamW, AdamWConfig};
    use sdkd::distill::zero::Shards;
    use sdkd::distributed::{Backend, Launch, ProcessGroup, Ranks};
    use tch::{Kind, Tensor};
    let shapes: [&[i64]; 5] = [&[5], &[3], &[3, 4], &[1], &[7]];
    let port = free_port();
    let tmp = tempdir();
    let (state_file, one_process_file) = (tmp.path().join("optimizer.safetensors"), tmp.path().join("one-process-optimizer.safetensors"));
    let cfg = AdamWConfig { weight_decay: 0.1, ..AdamWConfig::default() };
    let values = |shape: &[i64], seed: f64| Tensor::arange_start(1, 1 + shape.iter().product::<i64>(), (Kind::Float, tch::Device::Cpu)).f_mul_scalar(seed).unwrap().sin().view(shape);
    let initial = || -> Vec<(String, Tensor)> { shapes.iter().enumerate().map(|(i, s)| (format!("p{i}"), values(s, 0.3 + i as f64).set_requires_grad(true))).collect() };
    let grad_of = |rank: usize, step: usize, i: usize| values(shapes[i], 1.0 + (rank * 7 + step * 3 + i) as f64);
    let shallow = |ps: &[(String, Tensor)]| -> Vec<(String, Tensor)> { ps.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect() };
    let set_grads = |ps: &[(String, Tensor)], g: &dyn Fn(usize) -> Tensor| {
        for (i, (_, p)) in ps.iter().enumerate() {
            (p * g(i)).sum(Kind::Float).backward();
        }
    };
    std::thread::scope(|scope| {
        for rank in 0..2usize {
            let (state_file, one_process_file, params) = (state_file.clone(), one_process_file.clone(), initial());
            scope.spawn(move || {
                let launch = Launch { rank, world_size: 2, local_rank: rank, local_world_size: 2, master_addr: "127.0.0.1".into(), master_port: port, store_is_external: false, store_prefix: "zero/".into(), launcher: "test" };
                let ranks = Ranks { group: ProcessGroup::join(&launch, Backend::Gloo, Duration::from_secs(20)).unwrap() };
                let (shards, pieces) = Shards::new(shallow(&params), 2, rank, 40).unwrap();
                let mut opt = AdamW::new(pieces, cfg).unwrap();
                let reference: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.detach().copy().set_requires_grad(true))).collect();
                let mut unsharded = AdamW::new(shallow(&reference), cfg).unwrap();
                for step in 0..3 {
                    set_grads(&params, &|i| grad_of(rank, step, i));
                    let grads = shards.reduce_gradients(Some(&ranks)).unwrap();
                    let total = shards.global_norm(&clip_grads(&grads, None).unwrap(), Some(&ranks)).unwrap();
                    clip_to_total(&grads, &total, 0.5).unwrap();
                    opt.step_with(1e-2, &grads).unwrap();
                    shards.gather_params(Some(&ranks)).unwrap();
                    set_grads(&reference, &|i| (grad_of(0, step, i) + grad_of(1, step, i)) * 0.5);
                    let expected = clip_grad_norm(&unsharded.params(), 0.5).unwrap();
                    unsharded.step(1e-2).unwrap();
                    unsharded.zero_grad();
                    assert!((total.double_value(&[]) - expected.double_value(&[])).abs() <= 1e-6 * expected.double_value(&[]) && expected.double_value(&[]) > 0.5, "step {step}: global norm {total} vs {expected}");
                    for ((n, p), (_, q)) in params.iter().zip(&reference) {
                        let e = (p - q).abs().max().double_value(&[]);
                        assert!(e <= 1e-6, "rank {rank}, step {step}: {n} off by {e:e}");
                    }
                }
                let gathered = shards.gather_state(&opt, Some(&ranks)).unwrap();
                assert_eq!(gathered.is_some(), rank == 0, "the whole state on rank 0 alone");
                if let Some(state) = &gathered {
                    let want = unsharded.state_tensors();
                    assert_eq!(state.iter().map(|(n, _)| n).collect::<Vec<_>>(), want.iter().map(|(n, _)| n).collect::<Vec<_>>());
                    for ((n, a), (_, b)) in state.iter().zip(&want) {
                        assert!(a.size() == b.size() && (a - b).abs().max().double_value(&[]) <= 1e-6, "{n}: {a} vs {b}");
                    }
                    sdkd::models::weights::save(&state_file, state, None).unwrap();
                    sdkd::models::weights::save(&one_process_file, &unsharded.state_tensors(), None).unwrap();
                }
                ranks.group.barrier().unwrap();
                // the sharded state, and one process's unsharded state (another world size),
                // each loaded into fresh shards, gather back bit for bit
                let unsharded_state = unsharded.state_tensors();
                for (file, want) in [(&state_file, gathered.as_ref()), (&one_process_file, Some(&unsharded_state))] {
                    let (fresh, pieces) = Shards::new(shallow(&params), 2, rank, 40).unwrap();
                    let mut loaded = AdamW::new(pieces, cfg).unwrap();
                    assert_eq!(fresh.load_state_file(&mut loaded, file).unwrap(), None);
                    let again = fresh.gather_state(&loaded, Some(&ranks)).unwrap();
                    assert_eq!(again.is_some(), rank == 0);
                    if let (Some(again), Some(want)) = (&again, want) {
                        assert_eq!(again.len(), want.len());
                        for ((n, a), (m, b)) in again.iter().zip(want) {
                            assert!(n == m && a.equal(b), "{n} of {} after a load into 2 ranks' shards", file.display());
                        }
                    }
                }
                assert!(params.iter().zip(initial()).all(|((_, p), (_, q))| !p.equal(&q)), "every parameter moved");
            });
        }
    });
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

/// `sdkd --version` states the build's process groups. The main build is against the `.venv`'s
/// CUDA torch wheel with the CUDA and NCCL headers `make setup` adds, so it has NCCL.
#[test]
fn the_build_states_its_process_groups() {
    let out = sdkd(&["--version"]);
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{version}");
    eprintln!("{}", version.trim());
    assert!(version.starts_with(&format!("sdkd {} (LibTorch ", env!("CARGO_PKG_VERSION"))), "{version}");
    let cuda = root().join(".venv/libtorch/lib/libtorch_cuda.so").exists();
    assert_eq!(cuda, version.contains(", CUDA,"), "{version}");
    let groups = if cuda { "process groups: gloo nccl)" } else { "process groups: gloo)" };
    assert!(version.trim_end().ends_with(groups), "{version}: expected {groups}");
}
