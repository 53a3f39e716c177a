//! The trainer's building blocks against their references: AdamW / clip_grad_norm_ / diffusers
//! LR schedules (PyTorch in .venv), and TensorBoard event files read back by TensorBoard's own
//! EventAccumulator.
mod common;

use common::{python_command, read_tensors, rel_err, root, run_reference, tempdir};
use sdkd::config::{OptimConfig, Schedule};
use sdkd::distill::optim::{lr_at, AdamW, AdamWConfig, Ema};
use sdkd::distill::tensorboard::EventWriter;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

const STEPS: usize = 300;
const NAMES: [&str; 5] = ["a.weight", "a.bias", "b.conv", "c.scale", "unused"];

struct Replay {
    params: Vec<(String, Tensor)>,
    opt: AdamW,
    ema: Ema,
    norms: Vec<f64>,
    lrs: Vec<f64>,
}

fn optim_cfg() -> OptimConfig {
    OptimConfig { lr: 3e-2, schedule: Schedule::Linear, warmup_steps: 10, ..OptimConfig::default() }
}

fn start(init: &[(String, Tensor)]) -> Replay {
    let params: Vec<(String, Tensor)> =
        init.iter().map(|(n, t)| (n.clone(), t.copy().set_requires_grad(true))).collect();
    let shallow = |ps: &[(String, Tensor)]| ps.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    let opt = AdamW::new(shallow(&params), AdamWConfig::from(&optim_cfg())).unwrap();
    let ema = Ema::new(shallow(&params), 0.99).unwrap();
    Replay { params, opt, ema, norms: vec![], lrs: vec![] }
}

/// Steps `range` of the reference: gradients set through a backward of Σ p·g (exactly g), then
/// clip, AdamW at lr_at(step), EMA.
fn run(r: &mut Replay, refs: &BTreeMap<String, Tensor>, range: std::ops::Range<usize>) {
    for t in range {
        r.opt.zero_grad();
        let mut loss = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        for (name, p) in &r.params {
            if let Some(g) = refs.get(&format!("grad.{name}")) {
                loss += (p * g.get(t as i64)).sum(Kind::Float);
            }
        }
        loss.backward();
        r.norms.push(r.opt.clip_grad_norm(1.0).unwrap().double_value(&[]));
        let lr = lr_at(t as u64, &optim_cfg(), STEPS as u64);
        r.lrs.push(lr);
        r.opt.step(lr).unwrap();
        r.ema.update().unwrap();
    }
}

#[test]
fn adamw_clip_schedules_and_ema_match_torch() {
    let dir = tempdir();
    run_reference("trainkit_optim.py", &[dir.path().to_str().unwrap()]);
    let refs = read_tensors(&dir.path().join("adamw.safetensors"));
    let init: Vec<(String, Tensor)> =
        NAMES.iter().map(|n| (n.to_string(), refs[&format!("init.{n}")].copy())).collect();

    let mut r = start(&init);
    run(&mut r, &refs, 0..STEPS);

    // Learning rates: the same doubles as diffusers' LambdaLR.
    let ref_lrs = Vec::<f64>::try_from(&refs["lrs"]).unwrap();
    assert_eq!(r.lrs, ref_lrs, "lr_at differs from diffusers' linear schedule with warmup");
    // Total norms before clipping, every step.
    let ref_norms = Vec::<f32>::try_from(&refs["norms"]).unwrap();
    let norm_err = r.norms.iter().zip(&ref_norms).map(|(a, &b)| ((a - b as f64) / b as f64).abs()).fold(0.0, f64::max);
    let clipped = ref_norms.iter().filter(|&&n| n > 1.0).count();
    eprintln!("clip_grad_norm: max rel err of total norm over {STEPS} steps {norm_err:.3e} ({clipped} steps clipped)");
    // the same float32 norm as torch's clip_grad_norm_ (both _foreach_norm), every step
    assert!(norm_err == 0.0 && clipped > 30 && clipped < STEPS - 30, "norm err {norm_err}, clipped {clipped}");

    // Parameters against each torch AdamW implementation, moments and steps against the default.
    let mut worst = BTreeMap::new();
    for variant in ["default", "foreach", "fused"] {
        for (name, p) in &r.params {
            let e = rel_err(&p.detach(), &refs[&format!("{variant}.final.{name}")]);
            let w = worst.entry(variant).or_insert(0.0f64);
            *w = w.max(e);
        }
    }
    eprintln!("AdamW final params, max rel err vs torch: {worst:?}");
    // docs/benchmarks.md: within 5e-7 of the single-tensor and foreach paths (measured 4.6e-7)
    for (variant, e) in &worst {
        assert!(*e <= 5e-7, "AdamW vs torch {variant}: rel err {e}");
    }
    // sdkd calls the kernel of torch.optim.AdamW(fused=True): bit-identical to it.
    for (name, p) in &r.params {
        assert!(p.detach().equal(&refs[&format!("fused.final.{name}")]), "AdamW differs from torch's fused AdamW in {name}");
    }
    for (name, t) in r.opt.state_tensors() {
        if let Some(want) = refs.get(&format!("fused_state.{name}")) {
            assert!(t.equal(want), "AdamW state {name} differs from torch's fused AdamW");
        }
    }
    let unused = &r.params.iter().find(|(n, _)| n == "unused").unwrap().1;
    assert!(unused.equal(&refs["init.unused"]), "a parameter that never had a gradient moved");
    let mut state_err = 0.0f64;
    let mut state_count = 0;
    for (name, t) in r.opt.state_tensors() {
        match refs.get(&format!("state.{name}")) {
            Some(want) if name.starts_with("step.") => {
                assert_eq!(t.int64_value(&[]), want.int64_value(&[]), "{name}");
                state_count += 1;
            }
            Some(want) => {
                state_err = state_err.max(rel_err(&t, want));
                state_count += 1;
            }
            None => assert!(name.ends_with(".unused"), "torch has no state {name}"),
        }
    }
    eprintln!("AdamW moments: max rel err {state_err:.3e} over {state_count} tensors");
    assert!(state_err <= 1e-6 && state_count == 12);

    let mut ema_err = 0.0f64;
    for (name, shadow) in r.ema.state_tensors() {
        ema_err = ema_err.max(rel_err(&shadow, &refs[&format!("ema.{name}")]));
    }
    eprintln!("EMA (decay 0.99, fp32 vs fp64 reference): max rel err {ema_err:.3e}");
    assert!(ema_err <= 1e-6, "EMA rel err {ema_err}");

    // Resume: 150 steps, state through safetensors files into fresh objects, 150 more steps —
    // bit-identical to the uninterrupted run.
    let mut a = start(&init);
    run(&mut a, &refs, 0..STEPS / 2);
    let save = |file: &str, named: Vec<(String, Tensor)>| {
        let path = dir.path().join(file);
        sdkd::models::weights::save(&path, &named, None).unwrap();
        path
    };
    let opt_file = save("optimizer.safetensors", a.opt.state_tensors());
    let ema_file = save("ema.safetensors", a.ema.state_tensors());
    let student_file = save("student.safetensors", a.params.iter().map(|(n, t)| (n.clone(), t.detach())).collect());
    drop(a);
    let mut b = start(&init);
    let vars = b.params.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
    sdkd::models::weights::load_strict(&vars, &[student_file]).unwrap();
    b.opt.load_state_file(&opt_file).unwrap();
    b.ema.load_state_file(&ema_file).unwrap();
    run(&mut b, &refs, STEPS / 2..STEPS);
    for ((name, x), (_, y)) in r.params.iter().zip(&b.params) {
        assert!(x.equal(y), "resumed run differs in {name}");
    }
    for ((name, x), (_, y)) in r.opt.state_tensors().iter().zip(&b.opt.state_tensors()) {
        assert!(x.equal(y), "resumed optimizer state differs in {name}");
    }
    for ((name, x), (_, y)) in r.ema.state_tensors().iter().zip(&b.ema.state_tensors()) {
        assert!(x.equal(y), "resumed EMA differs in {name}");
    }
}

#[test]
fn lr_schedules_match_diffusers() {
    let dir = tempdir();
    run_reference("trainkit_optim.py", &[dir.path().to_str().unwrap()]);
    let text = std::fs::read_to_string(dir.path().join("schedules.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let mut worst = 0.0f64;
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let schedule = match name {
            "constant" | "constant_with_warmup" => Schedule::Constant,
            "cosine" => Schedule::Cosine,
            "linear" => Schedule::Linear,
            other => panic!("unknown schedule {other}"),
        };
        let cfg = OptimConfig {
            lr: case["lr"].as_f64().unwrap(),
            schedule,
            warmup_steps: case["warmup"].as_u64().unwrap(),
            ..OptimConfig::default()
        };
        let total = case["total"].as_u64().unwrap();
        // IEEE bit patterns: serde_json's default float parsing may be off by one ulp.
        for (step, want) in case["lr_bits"].as_array().unwrap().iter().enumerate() {
            let want = f64::from_bits(want.as_u64().unwrap());
            let got = lr_at(step as u64, &cfg, total);
            let err = (got - want).abs() / cfg.lr;
            worst = worst.max(err);
            assert!(err == 0.0, "{name} warmup {} total {total} step {step}: {got} vs {want}", cfg.warmup_steps);
        }
    }
    eprintln!(
        "lr_at vs diffusers get_scheduler: {} schedules, max abs err / lr {worst:.3e} (bit-identical)",
        cases.len()
    );
}

#[test]
fn tensorboard_events_read_by_event_accumulator() {
    let dir = tempdir();
    let tb = dir.path().join("tb");
    {
        let mut w = EventWriter::create(&tb, None).unwrap();
        for step in 0..10u64 {
            w.add_scalar("loss/total", 1.0 / (step as f32 + 1.0), step).unwrap();
            w.add_scalar("lr", 5e-5 * step as f32, step).unwrap();
        }
        // A 3x2 RGB image, row-major HWC: red, green, blue / white, black, grey.
        let px: [u8; 18] = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 128, 128, 128];
        w.add_image_rgb("samples/grid", &px, 3, 2, 4).unwrap();
        w.flush().unwrap();
    }
    // A resumed run from step 6: TensorBoard must drop the first run's steps >= 6 and show the
    // new values (SessionLog START purges orphaned events).
    {
        let mut w = EventWriter::create(&tb, Some(6)).unwrap();
        for step in 6..8u64 {
            w.add_scalar("loss/total", 100.0 + step as f32, step).unwrap();
        }
    }
    let script = root().join("tests/reference/trainkit_tb_read.py");
    let out = python_command().arg(&script).arg(&tb).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scalars = |tag: &str| -> Vec<(u64, f64)> {
        got["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalars {tag} in {got}"))
            .iter()
            .map(|e| (e[0].as_u64().unwrap(), e[1].as_f64().unwrap()))
            .collect()
    };
    let loss = scalars("loss/total");
    let mut want: Vec<(u64, f64)> = (0..6).map(|s| (s, (1.0 / (s as f32 + 1.0)) as f64)).collect();
    want.extend((6..8).map(|s| (s, (100.0 + s as f32) as f64)));
    assert_eq!(loss, want, "loss/total as TensorBoard reads it");
    let lr = scalars("lr");
    assert_eq!(lr.iter().map(|e| e.0).collect::<Vec<_>>(), (0..6).collect::<Vec<u64>>());
    assert_eq!(lr[3].1, (5e-5f32 * 3.0) as f64);
    let image = &got["images"]["samples/grid"][0];
    assert_eq!(
        (image["step"].as_u64(), image["width"].as_u64(), image["height"].as_u64()),
        (Some(4), Some(3), Some(2))
    );
    let decoded: Vec<u64> = image["pixels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(decoded, [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 128, 128, 128].map(|v| v as u64));
}

/// The child half of `checkpoints_survive_kill_9`: writes checkpoints of a few MB in a loop until
/// killed. Does nothing unless the parent test sets SDKD_TEST_CKPT_LOOP.
#[test]
#[ignore = "helper process of checkpoints_survive_kill_9"]
fn checkpoint_writer_loop() {
    use sdkd::distill::checkpoint::{CheckpointWriter, StateMeta, TrainState};
    let Ok(out) = std::env::var("SDKD_TEST_CKPT_LOOP") else { return };
    let first: u64 = std::env::var("SDKD_TEST_CKPT_FIRST").unwrap().parse().unwrap();
    let w = CheckpointWriter::new(std::path::Path::new(&out), 2);
    for step in first.. {
        let t = |v: f64| Tensor::full([256, 1024], v, (Kind::Float, tch::Device::Cpu));
        let state = TrainState {
            meta: StateMeta {
                step,
                epoch: 0,
                data_cursor: serde_json::json!(step),
                seed: 0,
                config_hash: "h".into(),
                config: serde_json::Value::Null,
                sdkd_version: "test".into(),
                loss_scale: None,
                world_size: 1,
                lora_base: None,
            },
            unet_config: serde_json::json!({"step": step}),
            student: vec![("w".into(), t(step as f64))],
            ema: Some(vec![("w".into(), t(-(step as f64)))]),
            target: None,
            optimizer: vec![("exp_avg.w".into(), t(0.5 * step as f64))],
        };
        w.write(&state).unwrap();
    }
}

/// A checkpoint folder still being written: sdkd's crash-safe writer fills `.step-N.tmp-<pid>`.
fn is_temp_checkpoint(name: &str) -> bool {
    name.starts_with(".step-") && name.contains(".tmp-")
}

/// Stops `child` (SIGSTOP) at a moment its temporary checkpoint folder exists in `dir`, so the
/// SIGKILL that follows lands mid-write.
fn stop_while_writing(child: &std::process::Child, dir: &std::path::Path) {
    let pid = child.id() as i32;
    let t0 = std::time::Instant::now();
    loop {
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        // a stopped process shows state T in /proc; only then is the listing final
        while !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap().contains(") T ") {
            std::thread::yield_now();
        }
        let writing = std::fs::read_dir(dir).unwrap().any(|e| is_temp_checkpoint(&e.unwrap().file_name().to_string_lossy()));
        if writing {
            return;
        }
        assert!(t0.elapsed().as_secs() < 60, "never caught the writer inside a write");
        unsafe { libc::kill(pid, libc::SIGCONT) };
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The step of the newest complete checkpoint (None also while the writer is pruning it).
fn newest_step(out: &std::path::Path) -> Option<u64> {
    use sdkd::distill::checkpoint::{latest, Checkpoint};
    latest(out).ok().flatten().and_then(|p| Checkpoint::open(&p).ok()).map(|c| c.meta.step)
}

/// kill -9 at arbitrary moments of checkpoint writing: the newest complete checkpoint is always
/// loadable and self-consistent, and a restarted writer cleans what the killed one left. The
/// last kill is timed to land mid-write (the writer is stopped while its temp folder exists), so
/// there always is something stale to clean.
#[test]
fn checkpoints_survive_kill_9() {
    use sdkd::distill::checkpoint::{latest, Checkpoint};
    let out = tempdir();
    let mut next = 1u64;
    for round in 0..6u64 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "checkpoint_writer_loop", "--test-threads=1"])
            .env("SDKD_TEST_CKPT_LOOP", out.path())
            .env("SDKD_TEST_CKPT_FIRST", next.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for a checkpoint of this round, then kill after a varying delay.
        let t0 = std::time::Instant::now();
        while newest_step(out.path()).is_none_or(|s| s < next) {
            assert!(t0.elapsed().as_secs() < 60, "writer made no checkpoint");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        std::thread::sleep(std::time::Duration::from_millis(7 + 23 * round));
        if round == 5 {
            stop_while_writing(&child, &out.path().join("checkpoints"));
        }
        child.kill().unwrap(); // SIGKILL (also to a stopped process)
        child.wait().unwrap();
        let dir = latest(out.path()).unwrap().expect("a complete checkpoint survives");
        let c = Checkpoint::open(&dir).unwrap();
        let s = c.read_state().unwrap();
        let step = c.meta.step as f64;
        assert_eq!(s.student[0].1.double_value(&[255, 1023]), step);
        assert_eq!(s.ema.as_ref().unwrap()[0].1.double_value(&[0, 0]), -step);
        assert_eq!(s.optimizer[0].1.double_value(&[7, 7]), 0.5 * step);
        assert_eq!(c.unet_config["step"].as_u64(), Some(c.meta.step));
        next = c.meta.step + 1;
    }
    // One more writer run: it cleans the killed writers' temporary folders.
    let stale: Vec<String> = std::fs::read_dir(out.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    eprintln!("after 6 kills: {next} steps written, stale folders left by the kills: {stale:?}");
    assert!(stale.iter().any(|n| is_temp_checkpoint(n)), "the last kill left no temp folder: {stale:?}");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "checkpoint_writer_loop", "--test-threads=1"])
        .env("SDKD_TEST_CKPT_LOOP", out.path())
        .env("SDKD_TEST_CKPT_FIRST", next.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while newest_step(out.path()).is_none_or(|s| s <= next) {
        assert!(t0.elapsed().as_secs() < 60, "writer made no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for name in &stale {
        assert!(!out.path().join("checkpoints").join(name).exists(), "{name} was not cleaned");
    }
}
