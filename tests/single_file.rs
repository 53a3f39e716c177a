//! Single-file checkpoints (CompVis/LDM layout) in and out, with diffusers as the referee:
//! tiny SD-1.x-like and SD-2.x-like (v-prediction, linear projections) pipelines and their single
//! files are made by tests/reference/single_file.py (the single file by the tables of diffusers'
//! convert_diffusers_to_original_stable_diffusion.py); `sdkd convert` must give the weights of
//! diffusers' `from_single_file`, `sdkd generate` its image, every student's single file must
//! re-import unchanged, and bad files must fail with exit 1 naming the file and key.
mod common;

use common::{assert_clean_failure, run_reference, tempdir};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Kind, Tensor};

struct Fixture {
    _keep: tempfile::TempDir,
    root: PathBuf,
}

impl Fixture {
    fn dir(&self, family: &str) -> PathBuf {
        self.root.join(family)
    }
}

/// The pipelines, their single files, and diffusers' reading of them (`from_single_file`
/// saved as folders, and its DDIM images), made in one Python run.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let keep = tempdir();
        let root = keep.path().to_path_buf();
        let mut jobs = vec![];
        let mut cases = vec![];
        for family in ["sd1", "sd2"] {
            let d = root.join(family);
            std::fs::create_dir_all(&d).unwrap();
            let p = |n: &str| d.join(n).display().to_string();
            jobs.push(serde_json::json!(["make", p(""), family]));
            jobs.push(serde_json::json!(["load", p("model.safetensors"), p("folder"), p("diffusers")]));
            cases.push(serde_json::json!({"file": p("model.safetensors"), "config": p("folder"), "prompt": PROMPT, "steps": 3,
                "seed": 5, "size": 64, "out": p("diffusers.png")}));
        }
        let cases_json = root.join("cases.json");
        std::fs::write(&cases_json, serde_json::to_string(&cases).unwrap()).unwrap();
        jobs.push(serde_json::json!(["generate", cases_json.display().to_string()]));
        let jobs_json = root.join("jobs.json");
        std::fs::write(&jobs_json, serde_json::to_string(&jobs).unwrap()).unwrap();
        run_reference("single_file.py", &["jobs", jobs_json.to_str().unwrap()]);
        Fixture { _keep: keep, root }
    })
}

const PROMPT: &str = "a red cube on a table";

fn sdkd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sdkd")).args(args).env("OMP_NUM_THREADS", "1").output().expect("running sdkd")
}

fn sdkd_ok(args: &[&str]) -> String {
    let o = sdkd(args);
    assert!(o.status.success(), "sdkd {args:?} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A model's tensors by name; transformers 5 saves CLIPTextModel without `text_model.`.
fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    sdkd::models::weights::read_all(path)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").map(str::to_string).unwrap_or(k), v))
        .collect()
}

fn assert_same_tensors(ours: &BTreeMap<String, Tensor>, theirs: &BTreeMap<String, Tensor>, what: &str) {
    let (a, b): (BTreeSet<&String>, BTreeSet<&String>) = (ours.keys().collect(), theirs.keys().collect());
    assert_eq!(a, b, "{what}: tensor names differ");
    for (k, t) in ours {
        assert!(t.to_kind(Kind::Float).equal(&theirs[k].to_kind(Kind::Float)), "{what}: {k} differs");
    }
}

const PARTS: [(&str, &str); 3] = [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")];

fn assert_same_pipelines(ours: &Path, theirs: &Path, what: &str) {
    for (part, stem) in PARTS {
        let file = |d: &Path| d.join(part).join(format!("{stem}.safetensors"));
        assert_same_tensors(&tensors(&file(ours)), &tensors(&file(theirs)), &format!("{what} {part}"));
    }
}

/// `sdkd convert` equals diffusers' `from_single_file(…, config=…)` tensor for tensor, also
/// from the `.ckpt`, and the converted folder loads in diffusers with the same weights.
fn teacher_round_trip(family: &str) {
    let d = fixture().dir(family);
    let tmp = tempdir();
    let ours = tmp.path().join("ours");
    sdkd_ok(&["convert", "--from", s(&d.join("model.safetensors")), "--to", s(&ours)]);
    assert_same_pipelines(&ours, &d.join("diffusers"), family);
    // the teacher itself: what the single file was made from
    assert_same_pipelines(&ours, &d.join("folder"), &format!("{family} (source folder)"));
    let from_ckpt = tmp.path().join("ckpt");
    sdkd_ok(&["convert", "--from", s(&d.join("model.ckpt")), "--to", s(&from_ckpt)]);
    assert_same_pipelines(&from_ckpt, &ours, &format!("{family} .ckpt"));
    let sched: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ours.join("scheduler/scheduler_config.json")).unwrap()).unwrap();
    assert_eq!(sched["prediction_type"], if family == "sd2" { "v_prediction" } else { "epsilon" });
}

#[test]
fn sd1_teacher_converts_to_diffusers_weights() {
    teacher_round_trip("sd1");
    // --use-ema takes model_ema.* (the fixture's EMA is the UNet + 1)
    let d = fixture().dir("sd1");
    let tmp = tempdir();
    sdkd_ok(&["convert", "--from", s(&d.join("model.safetensors")), "--to", s(&tmp.path().join("ema")), "--use-ema"]);
    let ema = tensors(&tmp.path().join("ema/unet/diffusion_pytorch_model.safetensors"));
    let raw = tensors(&d.join("folder/unet/diffusion_pytorch_model.safetensors"));
    for (k, t) in &raw {
        assert!((t + 1.0).equal(&ema[k]), "--use-ema: {k} is not the EMA tensor");
    }
}

#[test]
fn sd2_v_teacher_converts_to_diffusers_weights() {
    teacher_round_trip("sd2");
}

/// `sdkd generate --model <file>` gives diffusers' `from_single_file` image, every channel of
/// every pixel (the PNG encoders differ, the pixels may not).
#[test]
fn generate_from_a_single_file_matches_diffusers() {
    let tmp = tempdir();
    for family in ["sd1", "sd2"] {
        let d = fixture().dir(family);
        let out = tmp.path().join(format!("{family}.png"));
        sdkd_ok(&["generate", "--model", s(&d.join("model.safetensors")), "--prompt", PROMPT, "--scheduler", "ddim",
            "--steps", "3", "--seed", "5", "--width", "64", "--height", "64", "--guidance-scale", "7.5", "--out", s(&out)]);
        let ours = image::open(&out).unwrap().to_rgb8();
        let theirs = image::open(d.join("diffusers.png")).unwrap().to_rgb8();
        assert_eq!(ours.dimensions(), theirs.dimensions());
        let differing = ours.as_raw().iter().zip(theirs.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differing, 0, "{family}: {differing} channel values differ from diffusers' image");
        let (min, max) = ours.as_raw().iter().fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(max - min > 20, "{family}: a flat image proves nothing");
    }
}

/// The numbers of `input_blocks.N` / `output_blocks.N` in a single file.
fn block_numbers(keys: &BTreeSet<String>, list: &str) -> BTreeSet<usize> {
    let prefix = format!("model.diffusion_model.{list}.");
    keys.iter().filter_map(|k| k.strip_prefix(&prefix)?.split('.').next()?.parse().ok()).collect()
}

/// Every preset's (and a custom spec's) single file: contiguous block numbering, the ModelSpec
/// header and the .yaml, and a re-import to tensor-identical weights (the fp16 file holds the
/// student's weights rounded to fp16, and nothing else changes).
#[test]
fn student_single_files_reimport_identically_and_are_contiguous() {
    let f = fixture();
    let teacher = f.dir("sd1").join("folder");
    let tmp = tempdir();
    std::fs::create_dir_all(tmp.path().join("spec")).unwrap();
    let custom = tmp.path().join("spec/custom.yaml");
    std::fs::write(&custom, "down: [[0, 1], [0], [0], [0, 1]]\nup: [[0, 1, 2], [0, 2], [0, 2], [0, 1, 2]]\nmid_block: false\n").unwrap();
    for student in ["bk_base", "bk_small", "bk_tiny", s(&custom)] {
        let name = Path::new(student).file_stem().unwrap().to_str().unwrap();
        let folder = tmp.path().join(format!("{name}-unet"));
        let file = tmp.path().join(format!("{name}.safetensors"));
        sdkd_ok(&["prune", "--teacher", s(&teacher), "--student", student, "--out", s(&folder)]);
        sdkd_ok(&["prune", "--teacher", s(&teacher), "--student", student, "--out", s(&file), "--format", "single-file"]);
        let mapped = sdkd::models::weights::MappedFile::open(&file).unwrap();
        let meta = mapped.metadata().unwrap();
        assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1", "{name}");
        assert!(meta["modelspec.title"].contains(name), "{name}: {}", meta["modelspec.title"]);
        assert_eq!(meta["modelspec.resolution"], "64x64", "{name}");
        let keys: BTreeSet<String> = mapped.parse().unwrap().names().into_iter().map(str::to_string).collect();
        for list in ["input_blocks", "output_blocks"] {
            let numbers = block_numbers(&keys, list);
            let max = *numbers.iter().max().unwrap();
            assert_eq!(numbers, (0..=max).collect::<BTreeSet<_>>(), "{name}: {list} numbering has gaps");
        }
        let has_mid = keys.iter().any(|k| k.starts_with("model.diffusion_model.middle_block."));
        assert_eq!(has_mid, name == "bk_base", "{name}: middle_block present = {has_mid}");
        assert!(keys.iter().all(|k| !k.ends_with("mid.attn_1.q.weight")) || keys.iter().any(|k| k.starts_with("first_stage_model.")));
        let yaml = std::fs::read_to_string(file.with_extension("yaml")).unwrap();
        assert!(yaml.contains(&format!("num_res_blocks: [{}]", if name == "custom" { "2, 1, 1, 2" } else if name == "bk_tiny" { "1, 1, 1" } else { "1, 1, 1, 1" })), "{name}: {yaml}");
        assert!(yaml.contains(&format!("  middle_block: {}", name == "bk_base")), "{name}: {yaml}");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed["model"]["params"]["unet_config"]["params"]["num_heads"], serde_yaml::Value::from(8), "{name}");
        let half = mapped.parse().unwrap().tensor("model.diffusion_model.out.2.weight").unwrap().dtype();
        assert_eq!(half, safetensors::Dtype::F16, "{name}: single files default to fp16");
        // re-import
        let back = tmp.path().join(format!("{name}-back"));
        sdkd_ok(&["convert", "--from", s(&file), "--to", s(&back)]);
        let student_tensors: BTreeMap<String, Tensor> = tensors(&folder.join("diffusion_pytorch_model.safetensors"))
            .into_iter()
            .map(|(k, t)| (k, t.to_kind(Kind::Half).to_kind(Kind::Float)))
            .collect();
        assert_same_tensors(&tensors(&back.join("unet/diffusion_pytorch_model.safetensors")), &student_tensors, &format!("{name} unet"));
        let back_config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(back.join("unet/config.json")).unwrap()).unwrap();
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap()).unwrap();
        for key in ["block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "mid_block_type", "attention_head_dim", "cross_attention_dim"] {
            assert_eq!(back_config[key], config[key], "{name}: {key}");
        }
        for (part, stem) in &PARTS[1..] {
            let fp16 = |t: Tensor| t.to_kind(Kind::Half).to_kind(Kind::Float);
            let want: BTreeMap<String, Tensor> =
                tensors(&teacher.join(part).join(format!("{stem}.safetensors"))).into_iter().map(|(k, t)| (k, fp16(t))).collect();
            assert_same_tensors(&tensors(&back.join(part).join(format!("{stem}.safetensors"))), &want, &format!("{name} {part}"));
        }
    }
}

/// diffusers as referee of what sdkd writes: `UNet2DConditionModel.from_single_file(…,
/// config=<student folder>)` loads every preset's single file with identical weights, and
/// `StableDiffusionPipeline.from_pretrained` loads the folders `sdkd convert` writes unchanged.
#[test]
fn diffusers_loads_what_sdkd_writes() {
    let f = fixture();
    let teacher = f.dir("sd1").join("folder");
    let tmp = tempdir();
    let t = |n: &str| tmp.path().join(n);
    let mut jobs = vec![];
    for family in ["sd1", "sd2"] {
        sdkd_ok(&["convert", "--from", s(&f.dir(family).join("model.safetensors")), "--to", s(&t(family))]);
        jobs.push(serde_json::json!(["reload", s(&t(family)), s(&t(&format!("{family}-reloaded")))]));
    }
    for student in ["bk_base", "bk_small", "bk_tiny"] {
        let (folder, file) = (t(&format!("{student}-unet")), t(&format!("{student}.safetensors")));
        sdkd_ok(&["prune", "--teacher", s(&teacher), "--student", student, "--out", s(&folder)]);
        sdkd_ok(&["prune", "--teacher", s(&teacher), "--student", student, "--out", s(&file), "--format", "single-file", "--dtype", "fp32"]);
        jobs.push(serde_json::json!(["unet", s(&file), s(&folder), s(&t(&format!("{student}-diffusers.safetensors")))]));
    }
    let jobs_json = t("jobs.json");
    std::fs::write(&jobs_json, serde_json::to_string(&jobs).unwrap()).unwrap();
    run_reference("single_file.py", &["jobs", s(&jobs_json)]);
    for family in ["sd1", "sd2"] {
        assert_same_pipelines(&t(&format!("{family}-reloaded")), &t(family), &format!("{family} reloaded by diffusers"));
    }
    for student in ["bk_base", "bk_small", "bk_tiny"] {
        let out = t(&format!("{student}-diffusers.safetensors"));
        let error = std::fs::read_to_string(out.with_extension("safetensors.json")).ok();
        assert!(error.is_none(), "diffusers cannot load the {student} single file: {error:?}");
        let ours = tensors(&t(&format!("{student}-unet")).join("diffusion_pytorch_model.safetensors"));
        assert_same_tensors(&tensors(&out), &ours, &format!("{student} via UNet2DConditionModel.from_single_file"));
    }
}

#[test]
fn malicious_ckpt_is_refused_and_runs_nothing() {
    let d = fixture().dir("sd1");
    let o = sdkd(&["inspect", "--model", s(&d.join("evil.ckpt"))]);
    assert_clean_failure(&o, "evil.ckpt");
    assert_clean_failure(&o, "system");
    assert!(!d.join("PWNED").exists(), "the pickle's os.system ran");
}

#[test]
fn bad_single_files_fail_naming_file_and_key() {
    let d = fixture().dir("sd1");
    let tmp = tempdir();
    let model = d.join("model.safetensors");
    let gen = |m: &Path| sdkd(&["generate", "--model", s(m), "--prompt", "x", "--steps", "1", "--width", "64", "--height", "64", "--out", s(&tmp.path().join("o.png"))]);
    // a truncated download
    let bytes = std::fs::read(&model).unwrap();
    let truncated = tmp.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(&gen(&truncated), "truncated.safetensors");
    // SDXL
    let o = gen(&d.join("sdxl.safetensors"));
    assert_clean_failure(&o, "sdxl.safetensors");
    assert_clean_failure(&o, "conditioner.embedders.1.model."); // an SDXL file without its bigG encoder
    // no VAE, when a pipeline is needed (a UNet alone is fine: prune takes it)
    let all = sdkd::models::weights::read_all(&model).unwrap();
    let no_vae: Vec<(String, Tensor)> = all.iter().filter(|(k, _)| !k.starts_with("first_stage_model.")).map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
    let unet_only = tmp.path().join("no_vae.safetensors");
    sdkd::models::weights::save(&unet_only, &no_vae, None).unwrap();
    let o = gen(&unet_only);
    assert_clean_failure(&o, "no_vae.safetensors");
    assert_clean_failure(&o, "first_stage_model");
    sdkd_ok(&["prune", "--teacher", s(&unet_only), "--student", "bk_small", "--out", s(&tmp.path().join("pruned"))]);
    // a shape mismatch
    let key = "model.diffusion_model.input_blocks.1.0.emb_layers.1.weight";
    let bad: Vec<(String, Tensor)> = all
        .iter()
        .map(|(k, t)| (k.clone(), if k == key { Tensor::zeros([3, 5], (Kind::Float, tch::Device::Cpu)) } else { t.shallow_clone() }))
        .collect();
    let misshaped = tmp.path().join("misshaped.safetensors");
    sdkd::models::weights::save(&misshaped, &bad, None).unwrap();
    let o = gen(&misshaped);
    assert_clean_failure(&o, "misshaped.safetensors");
    assert_clean_failure(&o, key);
    // an SD-2 file without its .yaml: the prediction type is not guessed
    let sd2 = tmp.path().join("sd2.safetensors");
    std::fs::copy(fixture().dir("sd2").join("model.safetensors"), &sd2).unwrap();
    let o = gen(&sd2);
    assert_clean_failure(&o, "sd2.safetensors");
    assert_clean_failure(&o, "--prediction-type");
    // the tiny model's heads (16 channels, not SD-2's 64) need a .yaml; --prediction-type wins over it
    std::fs::write(sd2.with_extension("yaml"), "model:\n  params:\n    parameterization: eps\n    unet_config:\n      params:\n        num_head_channels: 16\n").unwrap();
    sdkd_ok(&["convert", "--from", s(&sd2), "--to", s(&tmp.path().join("sd2-v")), "--prediction-type", "v_prediction"]);
    let sched = std::fs::read_to_string(tmp.path().join("sd2-v/scheduler/scheduler_config.json")).unwrap();
    assert!(sched.contains("\"v_prediction\""), "{sched}");
    std::fs::remove_file(sd2.with_extension("yaml")).unwrap();
    // an existing file sdkd did not write is not replaced
    let o = sdkd(&["convert", "--from", s(&tmp.path().join("sd2-v")), "--to", s(&sd2), "--overwrite"]);
    assert_clean_failure(&o, "sdkd did not write it");
}
