//! `sdkd bench` on a tiny UNet config: valid JSON with positive numbers in train and infer
//! modes, clean errors for bad students, and the PyTorch reference (scripts/bench_reference.py)
//! timing the same student (same parameter count, hooks on the same feature names). No timing
//! assertions: this machine's speed is not under test.
mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// A two-stage SD-shaped UNet small enough for seconds-long tests.
fn tiny_config(dir: &Path) -> String {
    let cfg = serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "attention_head_dim": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,
        "sample_size": 8
    });
    let path = dir.join("tiny_unet.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

fn bench_json(args: &[&str]) -> Value {
    let mut all = vec!["bench", "--json", "--batch-size", "1", "--latent-size", "8", "--steps", "2", "--warmup", "1"];
    if !args.contains(&"--device") {
        all.extend(["--device", "cpu"]);
    }
    all.extend_from_slice(args);
    let out = sdkd(&all);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "sdkd {all:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}):\n{stdout}"))
}

fn assert_positive_timings(r: &Value) {
    for key in ["steps_per_s", "step_ms_median", "step_ms_min", "peak_mem_mb"] {
        let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {r}"));
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    let steps = r["step_ms"].as_array().expect("step_ms list");
    assert_eq!(steps.len(), 2, "one time per timed step");
    assert!((r["steps_per_s"].as_f64().unwrap() * r["step_ms_median"].as_f64().unwrap() - 1000.0).abs() < 1e-6);
}

#[test]
fn train_and_infer_report_json() {
    let dir = tempdir();
    let cfg = tiny_config(dir.path());

    let r = bench_json(&["--teacher", &cfg, "--student", "bk_small"]);
    assert_positive_timings(&r);
    assert_eq!(r["mode"], "train");
    let (tp, sp) = (r["teacher"]["params"].as_i64().unwrap(), r["student"]["params"].as_i64().unwrap());
    assert!(sp > 0 && sp < tp, "student {sp} params, teacher {tp}");
    let pairs = r["student"]["feature_pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 4, "bk_small pairs every down and up block: {pairs:?}");

    // The reference times the same student: same parameter count from the config sdkd reports.
    let student_cfg = dir.path().join("student.json");
    let pairs_file = dir.path().join("pairs.json");
    std::fs::write(&student_cfg, r["student"]["config"].to_string()).unwrap();
    std::fs::write(&pairs_file, r["student"]["feature_pairs"].to_string()).unwrap();
    let out = Command::new(python())
        .arg(root().join("scripts/bench_reference.py"))
        .args(["--teacher", &cfg, "--student", student_cfg.to_str().unwrap(), "--pairs", pairs_file.to_str().unwrap()])
        .args(["--batch-size", "1", "--latent-size", "8", "--steps", "2", "--warmup", "1", "--threads", "1"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "bench_reference.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let reference: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_positive_timings(&reference);
    assert_eq!(reference["params"].as_i64(), Some(sp), "the reference builds another student than sdkd");
    assert_eq!(reference["threads"], 1);

    let t = bench_json(&["--mode", "infer", "--teacher", &cfg, "--student", "teacher", "--threads", "1"]);
    assert_positive_timings(&t);
    assert_eq!((t["mode"].as_str(), t["unet_batch"].as_i64(), t["threads"].as_i64()), (Some("infer"), Some(2), Some(1)));
    assert_eq!(t["unet"]["params"].as_i64(), Some(tp));
    let s = bench_json(&["--mode", "infer", "--teacher", &cfg, "--student", "bk_small"]);
    assert_positive_timings(&s);
    assert_eq!(s["unet"]["params"].as_i64(), Some(sp));
}

#[test]
fn bad_arguments_are_clean_errors() {
    let dir = tempdir();
    let cfg = tiny_config(dir.path());
    let base = ["bench", "--device", "cpu", "--latent-size", "8", "--steps", "1", "--warmup", "0", "--teacher"];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        sdkd(&args)
    };
    assert_clean_failure(&run(&[&cfg, "--student", "bk_huge"]), "bk_huge");
    assert_clean_failure(&run(&[&cfg, "--student", "teacher"]), "--mode infer");
    assert_clean_failure(&run(&["/nonexistent/unet", "--student", "bk_small"]), "/nonexistent/unet");
    assert_clean_failure(&run(&[&cfg, "--student", "bk_small", "--batch-size", "0"]), "--batch-size");
}

/// On a CUDA machine (scripts/gpu-check.sh runs `--include-ignored cuda`): the bf16 training step
/// and the inference step on the GPU, with the GPU memory figure.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn bench_on_cuda_reports_gpu_memory() {
    assert!(tch::Cuda::is_available(), "no CUDA device");
    let dir = tempdir();
    let cfg = tiny_config(dir.path());
    let r = bench_json(&["--teacher", &cfg, "--student", "bk_small", "--device", "cuda", "--precision", "bf16"]);
    assert_positive_timings(&r);
    assert_eq!(r["device"], "Cuda(0)");
    assert!(r.get("gpu_mem_mb").is_some(), "no GPU memory field: {r}");
    let t = bench_json(&["--mode", "infer", "--teacher", &cfg, "--student", "teacher", "--device", "cuda", "--precision", "bf16"]);
    assert_positive_timings(&t);
}
