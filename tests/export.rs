//! Pipeline and UNet folders that diffusers' StableDiffusionPipeline loads as they are: from
//! `prune --format pipeline` and from `export` of a training checkpoint (student and EMA); an LCM
//! student's pipeline that diffusers samples with its own `LCMScheduler` config; `--fuse` merging
//! a LoRA into the exported UNet.
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
    export_fuse_merges_a_lora(tmp.path(), &ckpt);
}

/// `export --fuse FILE:0.5` writes the student with W + 0.5 · alpha/r · B·A for each adapted
/// layer (a linear and a 3×3 conv, in kohya's layout) and every other tensor as it was; a LoRA
/// with a text-encoder adapter is refused naming its key, and nothing is written.
fn export_fuse_merges_a_lora(tmp: &std::path::Path, ckpt: &std::path::Path) {
    use sdkd::lora::{Adapter, Component, Layout, LoraSet};
    use tch::{Device, Kind, Tensor};
    let base = read_tensors(&ckpt.join("student.safetensors"));
    let config = sdkd::models::UNetConfig::from_path(&ckpt.join("unet/config.json")).unwrap();
    tch::manual_seed(3);
    let mut set = LoraSet::new();
    for (module, alpha) in [("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 6.0), ("down_blocks.0.resnets.0.conv1", 2.0)] {
        let w = base[&format!("{module}.weight")].size();
        let mut down = vec![3, w[1]];
        down.extend_from_slice(&w[2..]);
        let up: Vec<i64> = if w.len() == 4 { vec![w[0], 3, 1, 1] } else { vec![w[0], 3] };
        set.insert(Component::Unet, module, Adapter::new(Tensor::randn(&down, (Kind::Float, Device::Cpu)), Tensor::randn(&up, (Kind::Float, Device::Cpu)), alpha));
    }
    let lora = tmp.join("style.safetensors");
    set.write(&lora, Layout::Kohya, &config).unwrap();
    let out = tmp.join("fused");
    let o = sdkd(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", out.to_str().unwrap(), "--fuse", &format!("{}:0.5", lora.display())]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let fused = read_tensors(&out.join("diffusion_pytorch_model.safetensors"));
    assert_eq!(fused.len(), base.len());
    for (name, w) in &base {
        match set.get(Component::Unet, name.strip_suffix(".weight").unwrap_or("")) {
            Some(a) => {
                let (d, u) = (a.down.flatten(1, -1), a.up.flatten(1, -1));
                let delta = (u.matmul(&d) * (a.alpha / 3.0 * 0.5)).reshape(w.size());
                assert!(fused[name].allclose(&(w + delta), 1e-6, 1e-6, false), "{name}: not W + 0.5·alpha/r·B·A");
                assert!(!fused[name].equal(w), "{name} unchanged");
            }
            None => assert!(fused[name].equal(w), "{name} changed"),
        }
    }
    let te = tmp.join("with-te.safetensors");
    let key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    let tensors = vec![(format!("{key}.lora_A.weight"), Tensor::ones([2, 32], (Kind::Float, Device::Cpu))), (format!("{key}.lora_B.weight"), Tensor::ones([32, 2], (Kind::Float, Device::Cpu)))];
    sdkd::models::weights::save(&te, &tensors, None).unwrap();
    let refused = tmp.join("fused-te");
    assert_clean_failure(&sdkd(&["export", "--checkpoint", ckpt.to_str().unwrap(), "--out", refused.to_str().unwrap(), "--fuse", te.to_str().unwrap()]), key);
    assert!(!refused.exists(), "a refused --fuse wrote {}", refused.display());
}

/// An LCM student (a UNet with `time_cond_proj_dim`, made from the teacher's as diffusers' LCD
/// scripts make it) exported as a pipeline carries `time_cond_proj_dim` and an `LCMScheduler`
/// config: diffusers' `StableDiffusionPipeline.from_pretrained` loads it as it is and samples it
/// pixel-identically to `sdkd generate --scheduler lcm` on the export.
#[test]
fn lcm_student_exports_a_pipeline_diffusers_samples_with_lcm() {
    use sdkd::export::{write_student, ExportFormat};
    use sdkd::models::{weights, UNetConfig};
    let tmp = tempdir();
    let p = |s: &str| tmp.path().join(s);
    let s = |p: &std::path::Path| p.display().to_string();
    run_reference("make_pipeline.py", &[&s(&p("teacher")), "--stages", "2", "--sample-size", "8"]);
    run_reference("lcm_unet.py", &[&s(&p("teacher/unet")), &s(&p("student"))]);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p("student/config.json")).unwrap()).unwrap();
    let config = UNetConfig::from_json(&json).unwrap();
    let tensors = weights::read_all(&p("student/diffusion_pytorch_model.safetensors")).unwrap();
    write_student(&p("export"), ExportFormat::Pipeline, &p("teacher"), &config, &tensors, None, "lcm student", Default::default()).unwrap();

    let read = |f: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(p("export").join(f)).unwrap()).unwrap() };
    assert_eq!(read("unet/config.json")["time_cond_proj_dim"], 32);
    let sched = read("scheduler/scheduler_config.json");
    assert_eq!((sched["_class_name"].as_str(), sched["original_inference_steps"].as_i64()), (Some("LCMScheduler"), Some(50)));
    let teacher_sched = read("../teacher/scheduler/scheduler_config.json");
    for key in ["beta_start", "beta_end", "beta_schedule", "prediction_type", "num_train_timesteps"] {
        assert_eq!(sched[key], teacher_sched[key], "{key}: the noise schedule must stay the teacher's");
    }
    assert_eq!(read("model_index.json")["scheduler"], serde_json::json!(["diffusers", "LCMScheduler"]));

    run_reference("lcm_unet.py", &["check", &s(&p("export")), &s(&p("theirs.png")), "4", "5", "6.0"]);
    let o = sdkd(&["generate", "--model", &s(&p("export")), "--prompt", "a red cube on a blue table", "--scheduler", "lcm", "--steps", "4",
        "--seed", "5", "--guidance-scale", "6", "--width", "32", "--height", "32", "--out", &s(&p("ours.png"))]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ours, theirs) = (image::open(p("ours.png")).unwrap().to_rgb8(), image::open(p("theirs.png")).unwrap().to_rgb8());
    let differ = ours.as_raw().iter().zip(theirs.as_raw()).filter(|(a, b)| a != b).count();
    assert_eq!(differ, 0, "{differ} of {} channel values differ from diffusers' on the exported LCM pipeline", ours.as_raw().len());
    let (lo, hi) = theirs.as_raw().iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    assert!(hi - lo > 30, "a flat image ({lo}..{hi}) would hide differences");
}
