//! `sdkd train` end to end on a tiny perturbed teacher pipeline and the synthetic set: the loss
//! falls, resume is bit-exact (also into a new output folder and after SIGTERM), TensorBoard reads
//! the logs, and bad configs and foreign checkpoints are clean errors.
mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;


fn config(dir: &Path, max_steps: u64, extra: &str) -> PathBuf {
    let f = train_fixture();
    let text = format!(
        "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\n\
         train:\n  batch_size: 4\n  grad_accum: 2\n  max_steps: {max_steps}\n  seed: 7\n  device: cpu\n  precision: fp32\n  ema_decay: 0.9\n\
         optim:\n  lr: 1.0e-3\n  schedule: cosine\n  warmup_steps: 2\n\
         checkpoint:\n  every: 3\n  keep: 2\nlog:\n  every: 1\n{}",
        f.teacher.display(),
        dir.join("run").display(),
        f.data.display(),
        if extra.is_empty() { "validation:\n  every: 0\n" } else { extra }
    );
    let path = dir.join(format!("run-{max_steps}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn train(args: &[&str]) {
    let o = sdkd(&[&["train", "--quiet"], args].concat());
    assert!(o.status.success(), "train {args:?}:\n{}", String::from_utf8_lossy(&o.stderr));
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (read_tensors(a), read_tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{}", a.display());
    for (k, v) in &ta {
        assert!(v.equal(&tb[k]), "{} differs between {} and {}", k, a.display(), b.display());
    }
}

fn assert_same_checkpoint(a: &Path, b: &Path) {
    for f in ["student.safetensors", "ema.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&a.join(f), &b.join(f));
    }
}

fn tensorboard(dir: &Path) -> serde_json::Value {
    let out = Command::new(python()).arg(root().join("tests/reference/trainkit_tb_read.py")).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn loss_falls_and_tensorboard_reads_every_term() {
    let tmp = tempdir();
    let validation = "validation:\n  every: 12\n  prompts: [\"a red circle\", \"two blue squares\"]\n  steps: 3\n  guidance_scale: 2.0\n";
    train(&["--config", config(tmp.path(), 24, validation).to_str().unwrap()]);
    let tb = tensorboard(&tmp.path().join("run/tb"));
    // validation grids: a teacher row over a student row, one column per prompt
    let images = tb["images"]["validation"].as_array().unwrap();
    assert_eq!(images.iter().map(|i| i["step"].as_i64().unwrap()).collect::<Vec<_>>(), vec![12, 24]);
    let grid = image::open(tmp.path().join("run/samples/step-24.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (images[1]["width"].as_u64().unwrap() as u32, images[1]["height"].as_u64().unwrap() as u32));
    assert!(grid.width() >= 2 * 16 && grid.height() >= 2 * 16, "two prompts side by side, teacher and student rows");
    let s = &tb["scalars"];
    for tag in ["loss/total", "loss/task", "loss/output_kd", "loss/feature_kd", "lr", "grad_norm", "samples_per_s", "data/skipped_samples"] {
        assert_eq!(s[tag].as_array().map(|a| a.len()), Some(24), "{tag}: {}", s[tag]);
    }
    // one curve per feature pair: bk_small pairs 4 down and 4 up blocks
    let pairs = s.as_object().unwrap().keys().filter(|k| k.starts_with("feature_kd/")).count();
    assert_eq!(pairs, 8);
    let total: Vec<f64> = s["loss/total"].as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect();
    let first: f64 = total[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = total[20..].iter().sum::<f64>() / 4.0;
    assert!(last < 0.8 * first, "loss did not fall: first {first}, last {last} ({total:?})");
    let run = tmp.path().join("run");
    assert!(run.join("final/unet/config.json").exists() && run.join("final/unet_ema/diffusion_pytorch_model.safetensors").exists());
    assert!(run.join("config.yaml").exists());
    let ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut ckpts = ckpts;
    ckpts.sort();
    assert_eq!(ckpts, vec!["step-21", "step-24"], "keep: 2");
}

#[test]
fn resume_is_bit_exact_also_into_a_new_folder() {
    // validation sampling in between must not disturb the training randomness
    let v = "validation:\n  every: 2\n  prompts: [\"a red circle\"]\n  steps: 2\n";
    let straight = tempdir();
    train(&["--config", config(straight.path(), 6, v).to_str().unwrap()]);
    let split = tempdir();
    train(&["--config", config(split.path(), 3, "").to_str().unwrap()]);
    train(&["--config", config(split.path(), 6, "").to_str().unwrap(), "--resume", "latest"]);
    assert_same_checkpoint(&straight.path().join("run/checkpoints/step-6"), &split.path().join("run/checkpoints/step-6"));
    // from split's step-3 into a fresh output folder
    let moved = tempdir();
    let from = split.path().join("run/checkpoints/step-3");
    train(&["--config", config(moved.path(), 6, "").to_str().unwrap(), "--resume", from.to_str().unwrap()]);
    assert_same_checkpoint(&straight.path().join("run/checkpoints/step-6"), &moved.path().join("run/checkpoints/step-6"));
    assert_same_tensors(
        &straight.path().join("run/final/unet/diffusion_pytorch_model.safetensors"),
        &moved.path().join("run/final/unet/diffusion_pytorch_model.safetensors"),
    );
}

#[test]
fn sigterm_checkpoints_and_resume_finishes_the_same_run() {
    let straight = tempdir();
    train(&["--config", config(straight.path(), 30, "").to_str().unwrap()]);
    let cut = tempdir();
    let cfg = config(cut.path(), 30, "");
    let child = Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(["train", "--quiet", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // wait until training is under way (its first checkpoint exists), then stop it
    let first = cut.path().join("run/checkpoints/step-3");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "SIGTERM exits 0 after a checkpoint: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    assert!(!cut.path().join("run/final").exists(), "an interrupted run is not final");
    train(&["--config", cfg.to_str().unwrap(), "--resume", "latest"]);
    assert_same_checkpoint(&straight.path().join("run/checkpoints/step-30"), &cut.path().join("run/checkpoints/step-30"));
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn bad_configs_and_foreign_checkpoints_are_clean_errors() {
    let tmp = tempdir();
    let cfg = config(tmp.path(), 3, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(&bad, text.replace("  batch_size: 4", "  batch_sise: 4")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap()]), "batch_sise");
    std::fs::write(&bad, text.replace("student: bk_small", "student: bk_giant")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap()]), "bk_giant");
    std::fs::write(&bad, text.replace(&train_fixture().data.display().to_string(), "/nonexistent/data")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap()]), "/nonexistent/data");
    std::fs::write(&bad, text.replace("  resolution: 16\n", "  resolution: 16\n  caption_dropout: 1.5\n")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap()]), "data.caption_dropout");
    // a checkpoint of a bk_small run cannot resume a bk_tiny run
    train(&["--config", cfg.to_str().unwrap()]);
    std::fs::write(&bad, text.replace("student: bk_small", "student: bk_tiny")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap(), "--resume", "latest"]), "student");
    assert_clean_failure(&sdkd(&["train", "--config", cfg.to_str().unwrap(), "--resume", "/nonexistent/ckpt"]), "/nonexistent/ckpt");
}

/// `optim.state_dtype: bf16`: the moments are stored in bf16 and resume stays bit-exact; a run
/// resumed with the other state dtype converts the moments and says so.
#[test]
fn bf16_optimizer_state_resumes_bit_exact_and_converts_on_a_dtype_change() {
    let with_state = |path: PathBuf, dtype: &str| {
        let text = std::fs::read_to_string(&path).unwrap().replace("  warmup_steps: 2\n", &format!("  warmup_steps: 2\n  state_dtype: {dtype}\n"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let straight = tempdir();
    train(&["--config", with_state(config(straight.path(), 6, ""), "bf16").to_str().unwrap()]);
    let split = tempdir();
    train(&["--config", with_state(config(split.path(), 3, ""), "bf16").to_str().unwrap()]);
    train(&["--config", with_state(config(split.path(), 6, ""), "bf16").to_str().unwrap(), "--resume", "latest"]);
    let step6 = straight.path().join("run/checkpoints/step-6");
    assert_same_checkpoint(&step6, &split.path().join("run/checkpoints/step-6"));
    let moments = read_tensors(&step6.join("optimizer.safetensors"));
    assert!(moments.iter().filter(|(k, _)| k.starts_with("exp_avg")).all(|(_, t)| t.kind() == tch::Kind::BFloat16));
    // the bf16-state checkpoint of step 3 resumed with fp32 state (the other direction and the
    // values converted: tests/memory.rs)
    let other = tempdir();
    let from = split.path().join("run/checkpoints/step-3");
    let cfg = with_state(config(other.path(), 6, ""), "fp32");
    let out = sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap(), "--resume", from.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("saved as BFloat16, converted to Float") && stderr.contains("optim.state_dtype = \"fp32\""), "{stderr}");
    let moments = read_tensors(&other.path().join("run/checkpoints/step-6/optimizer.safetensors"));
    assert!(moments.iter().filter(|(k, _)| k.starts_with("exp_avg")).all(|(_, t)| t.kind() == tch::Kind::Float && t.isfinite().all().int64_value(&[]) == 1));
}

/// `data.caption_dropout`: which samples train on the empty prompt is a pure function of (seed,
/// step, sample), so a resumed run is bit-exact; and it changes the run (the dropped samples
/// really see another conditioning).
#[test]
fn caption_dropout_resumes_bit_exact_and_changes_the_run() {
    let with_dropout = |path: PathBuf, p: f64| {
        let text = std::fs::read_to_string(&path).unwrap().replace("  resolution: 16\n", &format!("  resolution: 16\n  caption_dropout: {p}\n"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let straight = tempdir();
    train(&["--config", with_dropout(config(straight.path(), 6, ""), 0.5).to_str().unwrap()]);
    let split = tempdir();
    train(&["--config", with_dropout(config(split.path(), 3, ""), 0.5).to_str().unwrap()]);
    train(&["--config", with_dropout(config(split.path(), 6, ""), 0.5).to_str().unwrap(), "--resume", "latest"]);
    let step6 = straight.path().join("run/checkpoints/step-6");
    assert_same_checkpoint(&step6, &split.path().join("run/checkpoints/step-6"));
    let plain = tempdir();
    train(&["--config", config(plain.path(), 3, "").to_str().unwrap()]);
    let (a, b) = (read_tensors(&split.path().join("run/checkpoints/step-3/student.safetensors")), read_tensors(&plain.path().join("run/checkpoints/step-3/student.safetensors")));
    assert!(a.iter().any(|(k, v)| !v.equal(&b[k])), "caption_dropout 0.5 trained the same student as no dropout");
}
