//! Bad configs and datasets are refused when they are loaded, with a message naming the key or
//! the entry and exit code 1, never a panic inside LibTorch or a silent read outside a dataset.
mod common;
use common::{assert_clean_failure, run_reference, sdkd, tempdir};
use sdkd::data::ImageFolder;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The tiny diffusers pipeline of `make_pipeline.py`, made once per test binary.
fn pipeline() -> &'static Path {
    static PIPE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, dir) = PIPE.get_or_init(|| {
        let tmp = tempdir();
        let dir = tmp.path().join("pipe");
        run_reference("make_pipeline.py", &[dir.to_str().unwrap()]);
        (tmp, dir)
    });
    dir
}

/// A copy of the tiny pipeline whose `part/file` JSON has `edit` applied.
fn edited_pipeline(file: &str, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let tmp = tempdir();
    let copy = tmp.path().join("pipe");
    let cp = std::process::Command::new("cp").arg("-r").arg(pipeline()).arg(&copy).status().unwrap();
    assert!(cp.success(), "copying the tiny pipeline");
    let path = copy.join(file);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    tmp
}

fn sd15_unet_with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(common::root().join("configs/reference/sd15_unet_config.json")).unwrap())
            .unwrap();
    edit(&mut v);
    v
}

#[test]
fn absurd_unet_sizes_are_refused_naming_the_key() {
    let tmp = tempdir();
    let cases = [
        ("block_out_channels[3]", sd15_unet_with(|v| v["block_out_channels"][3] = json!(1_000_000_000_000i64))),
        ("norm_num_groups", sd15_unet_with(|v| v["norm_num_groups"] = json!(0))),
        ("layers_per_block", sd15_unet_with(|v| v["layers_per_block"] = json!(1_000_000_000))),
        ("cross_attention_dim", sd15_unet_with(|v| v["cross_attention_dim"] = json!(1i64 << 40))),
    ];
    for (i, (key, config)) in cases.iter().enumerate() {
        let dir = tmp.path().join(format!("unet{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        assert_clean_failure(&sdkd(&["inspect", "--unet", dir.to_str().unwrap()]), key);
        let out = tmp.path().join(format!("pruned{i}"));
        let o = sdkd(&["prune", "--teacher", dir.to_str().unwrap(), "--student", "bk_small", "--out", out.to_str().unwrap()]);
        assert_clean_failure(&o, key);
        assert!(!out.exists(), "a refused prune wrote {}", out.display());
    }
}

#[test]
fn absurd_vae_and_text_encoder_sizes_are_refused_naming_the_key() {
    let t = edited_pipeline("text_encoder/config.json", |v| v["hidden_size"] = json!(1i64 << 40));
    assert_clean_failure(&sdkd(&["inspect", "--model", t.path().join("pipe").to_str().unwrap()]), "hidden_size");
    let t = edited_pipeline("vae/config.json", |v| v["latent_channels"] = json!(1i64 << 40));
    assert_clean_failure(&sdkd(&["inspect", "--model", t.path().join("pipe").to_str().unwrap()]), "latent_channels");
}

#[test]
fn bad_scheduler_configs_are_refused_by_inspect_generate_and_train() {
    for (key, value, shown) in [("num_train_timesteps", json!(-5), "-5"), ("beta_schedule", json!("weird"), "weird")] {
        let t = edited_pipeline("scheduler/scheduler_config.json", |v| v[key] = value.clone());
        let pipe = t.path().join("pipe");
        let inspect = sdkd(&["inspect", "--model", pipe.to_str().unwrap(), "--json"]);
        assert_clean_failure(&inspect, key);
        assert_clean_failure(&inspect, shown);
        let png = t.path().join("x.png");
        let generate = sdkd(&["generate", "--model", pipe.to_str().unwrap(), "--prompt", "a cat", "--steps", "1",
                              "--out", png.to_str().unwrap()]);
        assert_clean_failure(&generate, key);
        assert!(!png.exists());
        let data = dataset_with(&["a.png"]);
        let run = t.path().join("run.yaml");
        let yaml = format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n  resolution: 16\ntrain:\n  device: cpu\n  max_steps: 1\n  batch_size: 1\n  grad_accum: 1\nvalidation:\n  every: 0\n",
            pipe.display(),
            t.path().join("out").display(),
            data.path().join("data").display()
        );
        std::fs::write(&run, yaml).unwrap();
        assert_clean_failure(&sdkd(&["train", "--config", run.to_str().unwrap()]), key);
        assert!(!t.path().join("out").exists());
    }
}

/// A dataset folder with one real image `a.png` and `metadata.jsonl` listing `entries`.
fn dataset_with(entries: &[&str]) -> tempfile::TempDir {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    image::RgbImage::from_pixel(16, 16, image::Rgb([200, 10, 10])).save(data.join("a.png")).unwrap();
    image::RgbImage::from_pixel(16, 16, image::Rgb([10, 200, 10])).save(tmp.path().join("secret.png")).unwrap();
    let lines: Vec<String> = entries.iter().map(|f| json!({"file_name": f, "text": "a red square"}).to_string()).collect();
    std::fs::write(data.join("metadata.jsonl"), lines.join("\n")).unwrap();
    tmp
}

#[test]
fn metadata_entries_outside_the_dataset_are_refused() {
    let secret = |t: &tempfile::TempDir| t.path().join("secret.png").to_str().unwrap().to_string();
    for entry in ["../secret.png", "sub/../../secret.png", "ABSOLUTE", "link.png", "linked_dir/secret.png"] {
        let t = dataset_with(&["a.png"]);
        let data = t.path().join("data");
        std::os::unix::fs::symlink(t.path().join("secret.png"), data.join("link.png")).unwrap();
        std::os::unix::fs::symlink(t.path(), data.join("linked_dir")).unwrap();
        let entry = if entry == "ABSOLUTE" { secret(&t) } else { entry.to_string() };
        let jsonl = format!("{}\n{}\n", json!({"file_name": "a.png", "text": "x"}), json!({"file_name": entry, "text": "x"}));
        std::fs::write(data.join("metadata.jsonl"), jsonl).unwrap();
        let e = format!("{:#}", ImageFolder::open(&data).unwrap_err());
        assert!(e.contains("metadata.jsonl:2") && e.contains(&entry) && e.contains("the dataset folder"), "{e}");
        std::fs::remove_file(data.join("metadata.jsonl")).unwrap();
        std::fs::write(data.join("metadata.csv"), format!("file_name,text\na.png,x\n{entry},x\n")).unwrap();
        let e = format!("{:#}", ImageFolder::open(&data).unwrap_err());
        assert!(e.contains("metadata.csv:3") && e.contains(&entry), "{e}");
    }
    // Inside stays allowed: a detour through a subfolder, a symlink to a file of the folder, a
    // missing file (a bad sample when loaded, as before).
    let t = dataset_with(&["a.png", "sub/../a.png", "./a.png", "inner.png", "missing.png"]);
    std::os::unix::fs::symlink(t.path().join("data/a.png"), t.path().join("data/inner.png")).unwrap();
    assert_eq!(ImageFolder::open(&t.path().join("data")).unwrap().len(), 5);
}

#[test]
fn preprocess_refuses_a_dataset_that_points_outside() {
    let t = dataset_with(&["a.png", "../secret.png"]);
    let out = t.path().join("cache");
    let o = sdkd(&["preprocess", "--teacher", pipeline().to_str().unwrap(), "--data", t.path().join("data").to_str().unwrap(),
                   "--resolution", "16", "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "metadata.jsonl:2");
    assert_clean_failure(&o, "../secret.png");
    assert!(!out.exists());
}

/// Bad `lora:` sections exit 1 naming the key before anything is trained: a rank of 0 or larger
/// than a targeted layer, a target matching no layer, dropout with gradient checkpointing (the
/// recomputed forward would draw another mask).
#[test]
fn bad_lora_sections_are_refused_naming_the_key() {
    let data = dataset_with(&["a.png"]);
    let cases = [
        ("lora:\n  rank: 0\n", "lora.rank"),
        ("lora:\n  rank: 4096\n", "lora.rank = 4096 is larger than layer"),
        ("lora:\n  rank: 2\n  targets: [to_q, not_a_layer]\n", "lora.targets[1]"),
        ("lora:\n  rank: 2\n  dropout: 0.1\ntrain:\n  gradient_checkpointing: blocks\n", "train.gradient_checkpointing"),
    ];
    std::thread::scope(|s| {
        for (i, (section, needle)) in cases.iter().enumerate() {
            let data = data.path().join("data");
            s.spawn(move || {
                let t = tempdir();
                let run = t.path().join("run.yaml");
                let train = if section.contains("train:") { "" } else { "train:\n  device: cpu\n" };
                let yaml = format!(
                    "teacher: {}\nstudent: {}\noutput_dir: {}\ndistill: false\ndata:\n  path: {}\n  resolution: 16\n{train}validation:\n  every: 0\n{section}",
                    pipeline().display(),
                    pipeline().join("unet").display(),
                    t.path().join("out").display(),
                    data.display()
                );
                std::fs::write(&run, yaml).unwrap();
                assert_clean_failure(&sdkd(&["train", "--config", run.to_str().unwrap()]), needle);
                assert!(!t.path().join("out").exists(), "case {i}: wrote into output_dir");
            });
        }
    });
}
