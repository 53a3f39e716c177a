//! Pipeline and UNet folders that diffusers' StableDiffusionPipeline loads as they are: from
//! `prune --format pipeline` and from `export` of a training checkpoint (student and EMA).
mod common;

use common::*;

#[test]
fn pruned_and_trained_students_export_as_loadable_pipelines() {
    let tmp = tempdir();
    let teacher = tmp.path().join("teacher");
    run_reference("make_pipeline.py", &[teacher.to_str().unwrap(), "--stages", "4", "--sample-size", "8"]);
    let t = teacher.to_str().unwrap();

    let pruned = tmp.path().join("pruned");
    let o = sdkd(&["prune", "--teacher", t, "--student", "bk_tiny", "--out", pruned.to_str().unwrap(), "--format", "pipeline"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run_reference("check_pipeline.py", &[pruned.to_str().unwrap()]);
    assert!(pruned.join("vae/config.json").exists() && pruned.join("tokenizer").is_dir());

    let data = tmp.path().join("data");
    assert!(sdkd(&["synth", "--out", data.to_str().unwrap(), "--count", "8", "--resolution", "16"]).status.success());
    let run = tmp.path().join("run");
    let cfg = tmp.path().join("run.yaml");
    std::fs::write(
        &cfg,
        format!(
            "teacher: {t}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\n\
             train:\n  batch_size: 2\n  grad_accum: 1\n  max_steps: 2\n  device: cpu\n  precision: fp32\n  ema_decay: 0.5\n\
             validation:\n  every: 0\n",
            run.display(),
            data.display()
        ),
    )
    .unwrap();
    let o = sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ckpt = run.join("checkpoints/step-2");
    for (flag, file) in [(None, "student.safetensors"), (Some("--ema"), "ema.safetensors")] {
        let out = tmp.path().join(format!("export-{file}"));
        let mut args = vec!["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--format", "pipeline"];
        args.extend(flag);
        let o = sdkd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        run_reference("check_pipeline.py", &[out.to_str().unwrap(), ckpt.join(file).to_str().unwrap()]);
    }
    // a UNet folder in fp16
    let out = tmp.path().join("unet16");
    let o = sdkd(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "fp16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(read_tensors(&out.join("diffusion_pytorch_model.safetensors")).values().all(|t| t.kind() == tch::Kind::Half));
    assert_clean_failure(&sdkd(&["export", "--checkpoint", tmp.path().join("nope").to_str().unwrap(), "--out", out.to_str().unwrap()]), "nope");
}
