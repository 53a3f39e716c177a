//! Students against diffusers: presets on two tiny teacher shapes are pruned by the CLI, loaded by
//! diffusers with no key problems, equal to the teacher under the copy map, and sdkd's forward on
//! them equals diffusers'. Published SD-1.5 counts, and SD-2.1 student configs counted by diffusers.
mod common;

use common::*;
use sdkd::models::UNet;
use std::path::Path;
use tch::{Device, Kind};

fn teachers() -> &'static Path {
    reference_unets()
}

#[test]
fn presets_prune_into_diffusers_loadable_students() {
    let tmp = tempdir();
    for teacher in ["sd1", "sd2"] {
        let teacher_dir = teachers().join(teacher).join("unet");
        for preset in ["bk_base", "bk_small", "sd_tiny"] {
            let out = tmp.path().join(format!("{teacher}-{preset}"));
            let o = sdkd(&["prune", "--teacher", teacher_dir.to_str().unwrap(), "--student", preset, "--out", out.to_str().unwrap()]);
            assert!(o.status.success(), "prune {teacher} {preset}: {}", String::from_utf8_lossy(&o.stderr));
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(stdout.contains("0 left random"), "{stdout}");
            let reference = out.join("ref.safetensors");
            run_reference("check_pruned.py", &[teacher_dir.to_str().unwrap(), out.to_str().unwrap(), reference.to_str().unwrap()]);
            let student = UNet::load(&out, Device::Cpu, Kind::Float).unwrap();
            let r = read_tensors(&reference);
            let got = tch::no_grad(|| student.model.predict(&r["sample"], &r["timesteps"], &r["context"]));
            let err = rel_err(&got, &r["out"]);
            assert!(err <= 1e-5, "{teacher}/{preset}: rel err {err:e}");
        }
    }
}

#[test]
fn student_dtype_and_bad_teacher() {
    let tmp = tempdir();
    let teacher_dir = teachers().join("sd1/unet");
    let out = tmp.path().join("half");
    let o = sdkd(&["prune", "--teacher", teacher_dir.to_str().unwrap(), "--student", "bk_small", "--out", out.to_str().unwrap(), "--dtype", "fp16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let tensors = read_tensors(&out.join("diffusion_pytorch_model.safetensors"));
    assert!(tensors.values().all(|t| t.kind() == Kind::Half));
    // the three-stage teacher has one layer in its last stages: up block 2 has no resnet 2
    let three = teachers().join("three_stage/unet");
    let o = sdkd(&["prune", "--teacher", three.to_str().unwrap(), "--student", "bk_base", "--out", tmp.path().join("x").to_str().unwrap()]);
    assert_clean_failure(&o, "keeps index 2");
    assert!(!tmp.path().join("x").exists(), "nothing written on failure");
    let o = sdkd(&["prune", "--teacher", teacher_dir.to_str().unwrap(), "--student", "bk_huge", "--out", tmp.path().join("y").to_str().unwrap()]);
    assert_clean_failure(&o, "bk_huge");
}

#[test]
fn custom_spec_yaml() {
    let tmp = tempdir();
    let spec = tmp.path().join("mine.yaml");
    std::fs::write(
        &spec,
        "down: [[1], [1], [0, 1], [0]]\nup: [[0, 2], [0, 1, 2], [0, 2], [2, 1]]\nmid_block: false\n\
         feature_pairs: [[up_blocks.3, up_blocks.3], [mid_block, up_blocks.0]]\n",
    )
    .unwrap();
    let teacher_dir = teachers().join("sd1/unet");
    let out = tmp.path().join("mine");
    let o = sdkd(&["prune", "--teacher", teacher_dir.to_str().unwrap(), "--student", spec.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = out.join("ref.safetensors");
    run_reference("check_pruned.py", &[teacher_dir.to_str().unwrap(), out.to_str().unwrap(), reference.to_str().unwrap()]);
    let copy_map: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("copy_map.json")).unwrap()).unwrap();
    assert_eq!(copy_map["up_blocks.3.resnets.0.conv1.weight"], "up_blocks.3.resnets.2.conv1.weight");
    assert_eq!(copy_map["up_blocks.2.resnets.1.conv1.weight"], "up_blocks.2.resnets.2.conv1.weight");
    assert_eq!(copy_map["down_blocks.0.attentions.0.proj_in.weight"], "down_blocks.0.attentions.1.proj_in.weight");

    std::fs::write(&spec, "down: [[0], [0], [0], [0]]\nup: [[0, 2], [0, 2], [0, 2], [0, 2]]\nfeature_pairs: [[mid_block, mid_block]]\nmid_block: false\n").unwrap();
    let o = sdkd(&["inspect", "--unet", teacher_dir.to_str().unwrap(), "--student", spec.to_str().unwrap()]);
    assert_clean_failure(&o, "\"mid_block\" is not a student feature");
    std::fs::write(&spec, "down: [[0], [0], [0], [0]]\nup: [[0, 2], [0, 2], [0, 2], [0, 2]]\nkeep_mid: true\n").unwrap();
    let o = sdkd(&["inspect", "--unet", teacher_dir.to_str().unwrap(), "--student", spec.to_str().unwrap()]);
    assert_clean_failure(&o, "keep_mid");
}

fn inspect_json(unet: &str, student: &str) -> serde_json::Value {
    let o = sdkd(&["inspect", "--unet", unet, "--student", student, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn sd15_presets_count_the_published_parameters() {
    let sd15 = root().join("configs/reference/sd15_unet_config.json");
    for (preset, want) in [("bk_base", 579_384_964i64), ("sd_small", 579_384_964), ("bk_small", 482_346_884), ("bk_tiny", 323_384_964)] {
        let j = inspect_json(sd15.to_str().unwrap(), preset);
        assert_eq!(j["teacher"]["params"], 859_520_964i64);
        assert_eq!(j["student"]["params"], want, "{preset}");
    }
}

#[test]
fn sd21_student_configs_count_the_same_in_diffusers() {
    let tmp = tempdir();
    let sd21 = root().join("configs/reference/sd21_unet_config.json");
    let mut paths = vec![];
    let mut ours = vec![];
    for preset in ["bk_base", "bk_small", "bk_tiny"] {
        let j = inspect_json(sd21.to_str().unwrap(), preset);
        let p = tmp.path().join(format!("{preset}.json"));
        std::fs::write(&p, j["student"]["config"].to_string()).unwrap();
        paths.push(p.to_str().unwrap().to_string());
        ours.push(j["student"]["params"].as_i64().unwrap());
    }
    let out = python_command().arg(root().join("tests/reference/count_params.py")).args(&paths).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Vec<i64> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ours, theirs);
}
