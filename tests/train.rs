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
    let out = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(dir).output().unwrap();
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

/// Starts `sdkd train` on `cfg` and returns once its first checkpoint (step 3) exists under `dir`.
fn train_until_first_checkpoint(cfg: &Path, dir: &Path) -> std::process::Child {
    let child = Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(["train", "--quiet", "--config", cfg.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = dir.join("run/checkpoints/step-3");
    let t0 = std::time::Instant::now();
    while !first.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

#[test]
fn sigterm_checkpoints_and_resume_finishes_the_same_run() {
    let straight = tempdir();
    train(&["--config", config(straight.path(), 30, "").to_str().unwrap()]);
    let cut = tempdir();
    let cfg = config(cut.path(), 30, "");
    // wait until training is under way (its first checkpoint exists), then stop it
    let child = train_until_first_checkpoint(&cfg, cut.path());
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "SIGTERM exits 0 after a checkpoint: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("interrupted at step"), "{stdout}");
    assert!(!cut.path().join("run/final").exists(), "an interrupted run is not final");
    train(&["--config", cfg.to_str().unwrap(), "--resume", "latest"]);
    assert_same_checkpoint(&straight.path().join("run/checkpoints/step-30"), &cut.path().join("run/checkpoints/step-30"));
}

/// A second signal exits at once with 130 (README, "A distillation run"; docs/distributed.md),
/// without waiting for the step or its checkpoint; the checkpoints already written stay complete
/// and the newest loads.
#[test]
fn a_second_signal_exits_at_once_with_130() {
    let tmp = tempdir();
    let cfg = config(tmp.path(), 10_000, "");
    let child = train_until_first_checkpoint(&cfg, tmp.path());
    // two different signals, so that the second cannot merge with a still-pending first
    unsafe {
        libc_kill(child.id() as i32, 15);
        libc_kill(child.id() as i32, 2);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(130), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("interrupted at step"), "the first signal's orderly stop was not waited for: {stdout}");
    let run = tmp.path().join("run");
    sdkd::distill::checkpoint::resolve(&run, "latest").unwrap().read_state().unwrap();
}

/// Bad command-line usage (clap's errors) exits 2, not 1.
#[test]
fn usage_errors_exit_2() {
    for args in [&["train"][..], &["frobnicate"], &["train", "--config", "run.yaml", "--no-such-flag"], &["eval", "fid", "--dims", "sixty"]] {
        let out = sdkd(args);
        assert_eq!(out.status.code(), Some(2), "sdkd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
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
    std::fs::write(&bad, text.replace("  resolution: 16\n", "  resolution: 16\n  dropped_caption: blank\n")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--config", bad.to_str().unwrap()]), "dropped_caption");
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

/// The random Inception network and the tiny open_clip model of the eval tests, made once.
fn eval_networks() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static NETS: std::sync::OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        let dir = tempdir();
        let (net, clip) = (dir.path().join("net"), dir.path().join("clip"));
        std::thread::scope(|s| {
            s.spawn(|| run_reference("eval_reference.py", &[net.to_str().unwrap(), "--weights-only"]));
            s.spawn(|| run_reference("clip_score_reference.py", &[clip.to_str().unwrap()]));
        });
        let (inception, clip) = (net.join("inception.pth"), clip.join("model/open_clip_model.safetensors"));
        (dir, inception, clip)
    })
}

/// `validation.eval` at steps 2 and 4 with FID, IS and CLIP: TensorBoard gets the scalars at both
/// steps, `eval/step-N/report.json` holds them, only the newest step keeps its images, and the
/// last evaluation is exactly what `sdkd eval --model --unet <checkpoint> --ema` measures on the
/// run's final checkpoint (the same decoded pixels, and FID/IS/CLIP within 1e-6 relative).
#[test]
fn validation_eval_logs_the_metrics_sdkd_eval_gives_for_the_checkpoint() {
    let (_, inception, clip) = eval_networks();
    let f = train_fixture();
    let tmp = tempdir();
    let prompts = f.data.join("metadata.jsonl");
    let eval = format!(
        "validation:\n  every: 0\n  eval:\n    every: 2\n    prompts: {}\n    count: 10\n    metrics: [fid, is, clip]\n    real: {}\n    inception: {}\n    clip: {}\n    steps: 4\n    batch_size: 3\n",
        prompts.display(), f.data.display(), inception.display(), clip.display()
    );
    train(&["--config", config(tmp.path(), 4, &eval).to_str().unwrap()]);
    let run = tmp.path().join("run");
    let tb = tensorboard(&run.join("tb"));
    for tag in ["eval/fid", "eval/is", "eval/is_std", "eval/clip_score"] {
        let steps: Vec<i64> = tb["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag} in {tb}")).iter().map(|e| e[0].as_i64().unwrap()).collect();
        assert_eq!(steps, [2, 4], "{tag}");
    }
    let report = |step: u64| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(run.join(format!("eval/step-{step}/report.json"))).unwrap()).unwrap() };
    let (r2, r4) = (report(2), report(4));
    assert_eq!(r4["model"], "student EMA");
    assert_eq!(r4["count"], 10);
    assert!(!run.join("eval/step-2/images").exists(), "an older evaluation kept its images");
    assert_eq!(std::fs::read_dir(run.join("eval/step-4/images")).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count(), 10);
    let last = tb["scalars"]["eval/fid"][1][1].as_f64().unwrap();
    assert!((last - r4["fid"].as_f64().unwrap()).abs() <= 1e-4 * last.abs().max(1.0), "TensorBoard {last} vs report {}", r4["fid"]);
    assert_ne!(r2["fid"], r4["fid"], "two steps of training left the FID unchanged");

    // the same protocol by hand on the final checkpoint's EMA
    let out = tmp.path().join("by-hand");
    let resolution = r4["settings"]["resolution"].as_i64().unwrap().to_string();
    let o = sdkd(&["eval", "--model", f.teacher.to_str().unwrap(), "--unet", run.join("checkpoints/step-4").to_str().unwrap(), "--ema",
        "--prompts", prompts.to_str().unwrap(), "--count", "10", "--steps", "4", "--resolution", &resolution, "--metrics", "fid,is,clip",
        "--real", f.data.to_str().unwrap(), "--inception", inception.to_str().unwrap(), "--clip", clip.to_str().unwrap(),
        "--device", "cpu", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for k in 0..10 {
        let name = format!("{k:06}.png");
        let (a, b) = (image::open(run.join("eval/step-4/images").join(&name)).unwrap().to_rgb8(), image::open(out.join("images").join(&name)).unwrap().to_rgb8());
        assert!(a == b, "image {name} differs between validation.eval and sdkd eval --unet --ema");
    }
    let by_hand: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    for key in ["fid", "is_mean", "is_std", "clip_score"] {
        let (a, b) = (r4[key].as_f64().unwrap(), by_hand[key].as_f64().unwrap());
        println!("{key}: validation.eval {a}, sdkd eval {b}");
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{key}: validation.eval {a} vs sdkd eval {b}");
    }
}

/// A `validation.eval` that cannot run is refused before the first step, naming the key or file.
#[test]
fn validation_eval_bad_settings_fail_before_training() {
    let (_, inception, _) = eval_networks();
    let f = train_fixture();
    let tmp = tempdir();
    let prompts = f.data.join("metadata.jsonl");
    let cases = [
        (format!("    prompts: {}\n    metrics: [fid]\n    inception: {}\n", prompts.display(), inception.display()), "validation.eval.real"),
        (format!("    prompts: {}\n    metrics: [is]\n    inception: /nonexistent/pt_inception.pth\n", prompts.display()), "/nonexistent/pt_inception.pth"),
        (format!("    prompts: {}\n    metrics: [fidd]\n", prompts.display()), "fidd"),
        (format!("    prompts: {}\n    metrics: [is]\n    inception: {}\n    count: 1000\n", prompts.display(), inception.display()), "validation.eval.count"),
        (format!("    prompts: {}\n    metrics: [is]\n    inception: {}\n    count: 5\n", prompts.display(), inception.display()), "splits need at least 10"),
        (format!("    metrics: [is]\n    inception: {}\n", inception.display()), "validation.eval.prompts"),
        (format!("    prompts: {}\n    metrics: [is]\n    inception: {}\n    steps: 2\n", prompts.display(), inception.display()), "validation.eval.scheduler pndm"),
    ];
    for (i, (body, needle)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("case{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let count = if body.contains("count:") { "" } else { "    count: 10\n" };
        let cfg = config(&dir, 2, &format!("validation:\n  every: 0\n  eval:\n    every: 1\n{count}{body}"));
        assert_clean_failure(&sdkd(&["train", "--config", cfg.to_str().unwrap()]), needle);
        assert!(!dir.join("run/checkpoints").exists(), "case {i} trained before failing");
    }
}

/// A `lora:` KD run (bk_small pruned from the teacher and frozen, rank-2 adapters on the default
/// targets): checkpoints hold only the adapters (PEFT's names), their optimizer state and the
/// base's reference; four steps straight equal two, a resume and two more, bit for bit; `final/`
/// is a diffusers LoRA file; a whole-student checkpoint is not resumed as a LoRA run.
#[test]
fn lora_run_checkpoints_adapters_only_and_resumes_bit_exact() {
    let lora = |dir: &Path, steps: u64| {
        let cfg = config(dir, steps, "validation:\n  every: 0\nlora:\n  rank: 2\n  alpha: 4\n");
        std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("  ema_decay: 0.9\n", "")).unwrap();
        cfg
    };
    let straight = tempdir();
    train(&["--config", lora(straight.path(), 4).to_str().unwrap()]);
    let split = tempdir();
    train(&["--config", lora(split.path(), 2).to_str().unwrap()]);
    train(&["--config", lora(split.path(), 4).to_str().unwrap(), "--resume", "latest"]);
    let (a, b) = (straight.path().join("run/checkpoints/step-4"), split.path().join("run/checkpoints/step-4"));
    for f in ["lora.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&a.join(f), &b.join(f));
    }
    assert!(!a.join("student.safetensors").exists(), "a LoRA checkpoint holds no student");
    let adapters = read_tensors(&a.join("lora.safetensors"));
    assert!(adapters.keys().all(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")), "{:?}", adapters.keys().take(3).collect::<Vec<_>>());
    assert!(adapters.contains_key("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"));
    assert!(adapters.iter().any(|(k, v)| k.ends_with("lora_B.weight") && v.abs().max().double_value(&[]) > 0.0), "B moved off zero");
    let optimizer = read_tensors(&a.join("optimizer.safetensors"));
    assert_eq!(optimizer.len(), 3 * adapters.len(), "AdamW state for the adapters alone");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(a.join("state.json")).unwrap()).unwrap();
    assert!(state["lora_base"]["source"].as_str().unwrap().starts_with("teacher "), "{state}");
    assert_eq!(state["lora_base"]["checksum"].as_str().map(str::len), Some(16));
    assert!(straight.path().join("run/final/pytorch_lora_weights.safetensors").exists());
    // a whole-student run's checkpoint into this LoRA run: refused naming what differs
    let whole = tempdir();
    train(&["--config", config(whole.path(), 3, "").to_str().unwrap()]);
    let from = whole.path().join("run/checkpoints/step-3");
    let o = sdkd(&["train", "--quiet", "--config", lora(tempdir().path(), 4).to_str().unwrap(), "--resume", from.to_str().unwrap()]);
    assert_clean_failure(&o, "lora");
}
