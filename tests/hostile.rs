//! Every command with each kind of hostile input it reads: a truncated or garbage safetensors
//! file, a JSON config with wrong types, a YAML with wrong types, an empty file, a folder where a
//! file is expected, a path or text argument that is not UTF-8, numbers no run could use. Each must
//! exit 1 with a message naming the input, and never panic (issue 29: "no unwrap/expect on a path
//! that user input reaches").
//!
//! One table; the cases run on four threads, each in its own folder. Values clap itself refuses
//! (a number too large for the flag's type) are usage errors, exit 2 (tests/train.rs,
//! `usage_errors_exit_2`), so the absurd numbers here are ones the flag's type holds.
mod common;

use common::*;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One hostile invocation: the arguments and what the error must name.
struct Case {
    args: Vec<OsString>,
    needle: String,
}

fn case(args: &[&dyn AsRef<std::ffi::OsStr>], needle: &str) -> Case {
    Case { args: args.iter().map(|a| a.as_ref().to_os_string()).collect(), needle: needle.to_string() }
}

/// A copy of the teacher pipeline with `edit` applied.
fn pipeline_with(tmp: &Path, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join(name);
    copy_tree(&train_fixture().teacher, &dir);
    edit(&dir);
    dir
}

/// Runs sdkd with a 120 s limit (a case that wrongly succeeds, such as a server that starts,
/// must fail the test, not hang it).
fn run_case(c: &Case, cwd: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sdkd"))
        .args(&c.args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut stderr, &mut s).ok();
        String::from_utf8_lossy(&s).into_owned()
    });
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            child.kill().ok();
            child.wait().ok();
            break Some(-1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

#[test]
fn every_command_refuses_hostile_input_with_exit_1_and_no_panic() {
    let t0 = Instant::now();
    let f = train_fixture();
    let tmp = tempdir();
    let t = tmp.path();
    let teacher = &f.teacher;
    let data = &f.data;

    // ---- the hostile inputs ----
    let garbage: Vec<u8> = (0..3000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let unet_file = "unet/diffusion_pytorch_model.safetensors";
    let garbage_weights = pipeline_with(t, "garbage-weights", |d| std::fs::write(d.join(unet_file), &garbage).unwrap());
    let truncated_weights = pipeline_with(t, "truncated-weights", |d| {
        let bytes = std::fs::read(d.join(unet_file)).unwrap();
        std::fs::write(d.join(unet_file), &bytes[..bytes.len() / 2]).unwrap();
    });
    let garbage_vae = pipeline_with(t, "garbage-vae", |d| std::fs::write(d.join("vae/diffusion_pytorch_model.safetensors"), &garbage).unwrap());
    let wrong_json = pipeline_with(t, "wrong-json", |d| {
        let p = d.join("unet/config.json");
        let text = std::fs::read_to_string(&p).unwrap().replace("\"layers_per_block\": 2", "\"layers_per_block\": \"two\"");
        assert!(text.contains("\"two\""), "the fixture's UNet config changed");
        std::fs::write(p, text).unwrap();
    });
    let absurd_json = pipeline_with(t, "absurd-json", |d| {
        let p = d.join("unet/config.json");
        std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("\"layers_per_block\": 2", "\"layers_per_block\": 4000000000")).unwrap();
    });
    let empty_json = pipeline_with(t, "empty-json", |d| std::fs::write(d.join("unet/config.json"), "").unwrap());
    let dir_index = pipeline_with(t, "dir-index", |d| {
        std::fs::remove_file(d.join("model_index.json")).unwrap();
        std::fs::create_dir(d.join("model_index.json")).unwrap();
    });
    let garbage_file = t.join("garbage.bin");
    std::fs::write(&garbage_file, &garbage).unwrap();
    let garbage_st = t.join("garbage.safetensors");
    std::fs::write(&garbage_st, &garbage).unwrap();
    let truncated_st = t.join("truncated.safetensors");
    std::fs::copy(truncated_weights.join(unet_file), &truncated_st).unwrap();
    let garbage_ckpt = t.join("garbage.ckpt");
    std::fs::write(&garbage_ckpt, &garbage).unwrap();
    let empty = t.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let empty_st = t.join("empty.safetensors");
    std::fs::write(&empty_st, "").unwrap();
    let folder = t.join("a-folder");
    std::fs::create_dir(&folder).unwrap();
    let not_utf8 = t.join(OsString::from_vec(b"caf\xe9.yaml".to_vec()));
    std::fs::write(&not_utf8, "teacher: [1, 2]\n").unwrap();
    let not_utf8_name = not_utf8.to_string_lossy().into_owned();
    let not_utf8_text = OsString::from_vec(b"a caf\xe9 at night".to_vec());
    let run_yaml = |name: &str, data_section: &str, teacher: &Path| {
        let p = t.join(name);
        let text = format!(
            "teacher: {}\nstudent: bk_small\noutput_dir: {}\ndata:\n  path: {}\n{data_section}train:\n  batch_size: 2\n  max_steps: 2\n  device: cpu\nvalidation:\n  every: 0\n",
            teacher.display(),
            t.join(format!("{name}-out")).display(),
            data.display()
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let wrong_yaml = run_yaml("wrong-types.yaml", "  resolution: big\n", teacher);
    let absurd_yaml = run_yaml("absurd.yaml", "  resolution: 4000000000\n", teacher);
    let garbage_teacher_yaml = run_yaml("garbage-teacher.yaml", "  resolution: 16\n", &garbage_weights);
    let wrong_spec = t.join("spec.yaml");
    std::fs::write(&wrong_spec, "name: x\ndown: seven\n").unwrap();
    // student specs an SDXL teacher cannot give (its published config: 10 layers in down2)
    let sdxl_unet = root().join("configs/reference/sdxl_unet_config.json");
    let spec = |name: &str, text: &str| {
        let p = t.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let too_deep = spec("too-deep.yaml", "down: [2, 2, [{resnet: 0, depth: 11}, 1]]\nup: [3, 3, 3]\n");
    let twice = spec("twice.yaml", "down: [2, 2, [{resnet: 0, layers: [0, 3, 3]}, 1]]\nup: [3, 3, 3]\n");
    let full_mid = spec("full-mid.yaml", "down: [2, 2, 2]\nup: [3, 3, 3]\nmid_block: full\n");
    let mut no_mid: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sdxl_unet).unwrap()).unwrap();
    no_mid["mid_block_type"] = serde_json::Value::Null;
    let sdxl_no_mid = t.join("sdxl-no-mid.json");
    std::fs::write(&sdxl_no_mid, no_mid.to_string()).unwrap();
    let wrong_pricing = t.join("pricing.yaml");
    std::fs::write(&wrong_pricing, "credits: many\nsteps: 1\nwidth: 1\nheight: 1\n").unwrap();
    let checkpoint_bad_state = t.join("step-2");
    std::fs::create_dir(&checkpoint_bad_state).unwrap();
    std::fs::write(checkpoint_bad_state.join("state.json"), "{\"step\": \"two\"}").unwrap();
    let keys_db = t.join("keys.db");
    assert!(sdkd(&["keys", "add", "--db", keys_db.to_str().unwrap(), "--name", "k", "--credits", "5"]).status.success());
    let prompts = data.join("metadata.jsonl");
    let out = |name: &str| t.join("out").join(name);
    std::fs::create_dir(t.join("out")).unwrap();

    // LoRA files that do not fit: two layouts in one file, NaN, a layer the teacher lacks, an
    // SD-1.5-wide layer
    let to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let kohya_q = format!("lora_unet_{}", to_q.replace('.', "_"));
    let lora_file = |name: &str, tensors: Vec<(String, tch::Tensor)>| {
        let p = t.join(name);
        sdkd::models::weights::save(&p, &tensors, None).unwrap();
        p
    };
    let ones = |s: &[i64]| tch::Tensor::ones(s, (tch::Kind::Float, tch::Device::Cpu));
    let lora_mixed = lora_file("mixed.safetensors", vec![(format!("unet.{to_q}.lora_A.weight"), ones(&[2, 32])), (format!("unet.{to_q}.lora_B.weight"), ones(&[32, 2])), (format!("{kohya_q}.lora_down.weight"), ones(&[2, 32]))]);
    let lora_nan = lora_file("nan.safetensors", vec![(format!("{kohya_q}.lora_down.weight"), ones(&[2, 32]) * f64::NAN), (format!("{kohya_q}.lora_up.weight"), ones(&[32, 2]))]);
    let missing = "lora_unet_down_blocks_7_attentions_0_proj_in";
    let lora_missing = lora_file("other-arch.safetensors", vec![(format!("{missing}.lora_down.weight"), ones(&[2, 32])), (format!("{missing}.lora_up.weight"), ones(&[32, 2]))]);
    let lora_wide = lora_file("sd15-wide.safetensors", vec![(format!("{kohya_q}.lora_down.weight"), ones(&[4, 320])), (format!("{kohya_q}.lora_up.weight"), ones(&[320, 4]))]);
    let scaled = |p: &Path, scale: &str| format!("{}:{scale}", p.display());

    // ---- the table: (arguments, what the message names) ----
    let g = |model: &Path| -> Vec<OsString> {
        ["generate", "--prompt", "a", "--model"].iter().map(OsString::from).chain([model.as_os_str().to_os_string()]).collect()
    };
    let with = |mut base: Vec<OsString>, extra: &[&dyn AsRef<std::ffi::OsStr>]| {
        base.extend(extra.iter().map(|a| a.as_ref().to_os_string()));
        base
    };
    static GEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let gen = |model: &Path, extra: &[&dyn AsRef<std::ffi::OsStr>], needle: &str| Case {
        args: with(with(g(model), &[&"--out", &out(&format!("g{}.png", GEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst)))]), extra),
        needle: needle.into(),
    };
    let big = "4000000000";
    let cases = vec![
        // train: the run YAML, the teacher it names
        case(&[&"train", &"--config", &wrong_yaml], "data.resolution"),
        case(&[&"train", &"--config", &absurd_yaml], "data.resolution"),
        case(&[&"train", &"--config", &empty], "empty.txt"),
        case(&[&"train", &"--config", &folder], "a-folder"),
        case(&[&"train", &"--config", &not_utf8], &not_utf8_name),
        case(&[&"train", &"--config", &garbage_teacher_yaml], "diffusion_pytorch_model.safetensors"),
        case(&[&"train", &"--config", &garbage_file], "garbage.bin"),
        // prune: the teacher's UNet, a student spec
        case(&[&"prune", &"--teacher", &garbage_weights, &"--student", &"bk_tiny", &"--out", &out("p1")], "diffusion_pytorch_model.safetensors"),
        case(&[&"prune", &"--teacher", &truncated_weights, &"--student", &"bk_tiny", &"--out", &out("p2")], "diffusion_pytorch_model.safetensors"),
        case(&[&"prune", &"--teacher", &wrong_json, &"--student", &"bk_tiny", &"--out", &out("p3")], "layers_per_block"),
        case(&[&"prune", &"--teacher", &empty_json, &"--student", &"bk_tiny", &"--out", &out("p4")], "config.json"),
        case(&[&"prune", &"--teacher", &folder, &"--student", &"bk_tiny", &"--out", &out("p5")], "a-folder"),
        case(&[&"prune", &"--teacher", &teacher, &"--student", &wrong_spec, &"--out", &out("p6")], "spec.yaml"),
        case(&[&"prune", &"--teacher", &teacher, &"--student", &not_utf8_text, &"--out", &out("p7")], "--student"),
        // export: a checkpoint folder
        case(&[&"export", &"--checkpoint", &folder, &"--out", &out("e1")], "a-folder"),
        case(&[&"export", &"--checkpoint", &checkpoint_bad_state, &"--out", &out("e2")], "state.json"),
        case(&[&"export", &"--checkpoint", &garbage_file, &"--out", &out("e3")], "garbage.bin"),
        // convert: a single file, a pipeline
        case(&[&"convert", &"--from", &garbage_st, &"--to", &out("c1")], "garbage.safetensors"),
        case(&[&"convert", &"--from", &truncated_st, &"--to", &out("c2")], "truncated.safetensors"),
        case(&[&"convert", &"--from", &empty_st, &"--to", &out("c3")], "empty.safetensors"),
        case(&[&"convert", &"--from", &garbage_ckpt, &"--to", &out("c4")], "garbage.ckpt"),
        case(&[&"convert", &"--from", &garbage_weights, &"--to", &out("c5.safetensors")], "diffusion_pytorch_model.safetensors"),
        case(&[&"convert", &"--from", &dir_index, &"--to", &out("c6.safetensors")], "model_index.json"),
        case(&[&"convert", &"--from", &not_utf8, &"--to", &out("c7")], &not_utf8_name),
        // generate: a pipeline's parts, a UNet, text, sizes
        gen(&garbage_weights, &[&"--steps", &"1"], "diffusion_pytorch_model.safetensors"),
        gen(&truncated_weights, &[], "diffusion_pytorch_model.safetensors"),
        gen(&garbage_vae, &[], "vae"),
        gen(&wrong_json, &[], "layers_per_block"),
        gen(&absurd_json, &[], "layers_per_block"),
        gen(&empty_json, &[], "config.json"),
        gen(&dir_index, &[], "model_index.json"),
        gen(&folder, &[], "a-folder"),
        gen(&teacher, &[&"--unet", &garbage_file], "garbage.bin"),
        gen(&teacher, &[&"--negative-prompt", &not_utf8_text], "--negative-prompt"),
        gen(&teacher, &[&"--steps", &big], big),
        gen(&teacher, &[&"--width", &"4000000000"], "4000000000"),
        gen(&teacher, &[&"--guidance-scale", &"nan"], "NaN"),
        // generate --lora: files that do not fit the pipeline, a scale that is not a number
        gen(&teacher, &[&"--lora", &lora_mixed], &kohya_q),
        gen(&teacher, &[&"--lora", &lora_nan], &format!("{kohya_q}.lora_down.weight")),
        gen(&teacher, &[&"--lora", &lora_missing], missing),
        gen(&teacher, &[&"--lora", &lora_wide], "sd15-wide.safetensors"),
        gen(&teacher, &[&"--lora", &garbage_st], "garbage.safetensors"),
        gen(&teacher, &[&"--lora", &scaled(&lora_nan, "strong")], "strong"),
        // eval: weights, statistics, prompts, counts
        case(&[&"eval", &"--images", &data, &"--real", &data, &"--inception", &garbage_file, &"--out", &out("v1")], "garbage.bin"),
        case(&[&"eval", &"--images", &data, &"--real", &data, &"--inception", &folder, &"--out", &out("v2")], "a-folder"),
        case(&[&"eval", &"--model", &teacher, &"--prompts", &garbage_file, &"--count", &"1", &"--out", &out("v3")], "garbage.bin"),
        case(&[&"eval", &"--model", &teacher, &"--prompts", &empty, &"--count", &"1", &"--out", &out("v4")], "empty.txt"),
        case(&[&"eval", &"--model", &teacher, &"--prompts", &prompts, &"--count", &"1", &"--batch-size", &"0", &"--out", &out("v6")], "--batch-size"),
        // inspect: a UNet config, a pipeline, a student spec
        case(&[&"inspect", &"--unet", &wrong_json.join("unet")], "layers_per_block"),
        case(&[&"inspect", &"--unet", &garbage_file], "garbage.bin"),
        case(&[&"inspect", &"--unet", &folder], "a-folder"),
        case(&[&"inspect", &"--model", &garbage_weights], "diffusion_pytorch_model.safetensors"),
        case(&[&"inspect", &"--unet", &teacher.join("unet"), &"--student", &wrong_spec], "spec.yaml"),
        case(&[&"inspect", &"--unet", &teacher.join("unet"), &"--student", &"ssd_1b"], "\"ssd_1b\" is an SDXL student and needs an SDXL teacher"),
        case(&[&"inspect", &"--unet", &sdxl_unet, &"--student", &too_deep], "down[2][0]: depth 11, but the teacher's attention has 10"),
        case(&[&"inspect", &"--unet", &sdxl_unet, &"--student", &twice], "down[2][0]: layers lists layer 3 twice"),
        case(&[&"inspect", &"--unet", &sdxl_no_mid, &"--student", &full_mid], "mid_block: the spec keeps a mid block, but the teacher has none"),
        // plan: the run YAML, sizes
        case(&[&"plan", &"--config", &wrong_yaml], "data.resolution"),
        case(&[&"plan", &"--config", &folder], "a-folder"),
        case(&[&"plan", &"--config", &run_yaml("plan.yaml", "  resolution: 16\n", teacher), &"--gpu-mem", &"1e400"], "--gpu-mem"),
        case(&[&"plan", &"--config", &run_yaml("plan2.yaml", "  resolution: 16\n", teacher), &"--probe-resolution", &"4000000"], "4000000"),
        // bench: the teacher, the student spec, sizes and counts
        case(&[&"bench", &"--teacher", &garbage_weights, &"--student", &"bk_tiny", &"--latent-size", &"8", &"--steps", &"1", &"--warmup", &"0"], "diffusion_pytorch_model.safetensors"),
        case(&[&"bench", &"--teacher", &teacher, &"--student", &garbage_file, &"--latent-size", &"8"], "garbage.bin"),
        case(&[&"bench", &"--teacher", &teacher, &"--student", &"bk_tiny", &"--latent-size", &"100000"], "--latent-size"),
        case(&[&"bench", &"--teacher", &teacher, &"--student", &"bk_tiny", &"--latent-size", &"8", &"--steps", &"18446744073709551615"], "--steps"),
        case(&[&"bench", &"--teacher", &teacher, &"--student", &"bk_tiny", &"--latent-size", &"8", &"--warmup", &"18446744073709551615"], "--warmup"),
        // preprocess: the teacher's encoders, the data, sizes
        case(&[&"preprocess", &"--teacher", &garbage_vae, &"--data", &data, &"--resolution", &"16", &"--out", &out("pp1")], "vae"),
        case(&[&"preprocess", &"--teacher", &teacher, &"--data", &garbage_file, &"--resolution", &"16", &"--out", &out("pp2")], "garbage.bin"),
        case(&[&"preprocess", &"--teacher", &teacher, &"--data", &folder, &"--resolution", &"16", &"--out", &out("pp3")], "a-folder"),
        case(&[&"preprocess", &"--teacher", &teacher, &"--data", &data, &"--resolution", &"16", &"--batch-size", &"18446744073709551615", &"--out", &out("pp4")], "batch"),
        case(&[&"preprocess", &"--teacher", &teacher, &"--data", &data, &"--resolution", &big, &"--out", &out("pp5")], big),
        case(&[&"preprocess", &"--teacher", &teacher, &"--data", &data, &"--resolution", &"16", &"--filter", &not_utf8_text, &"--out", &out("pp6")], "--filter"),
        // synth: counts and sizes
        case(&[&"synth", &"--out", &out("s1"), &"--count", &"18446744073709551615"], "--count"),
        case(&[&"synth", &"--out", &out("s2"), &"--count", &"2", &"--resolution", &big], "--resolution"),
        // keys: the database, names, credits
        case(&[&"keys", &"list", &"--db", &garbage_file], "garbage.bin"),
        case(&[&"keys", &"list", &"--db", &empty], "empty.txt"),
        case(&[&"keys", &"list", &"--db", &folder], "a-folder"),
        case(&[&"keys", &"add", &"--db", &keys_db, &"--name", &not_utf8_text], "--name"),
        case(&[&"keys", &"credit", &"--db", &keys_db, &"--name", &"k", &"--add", &"9223372036854775807"], "9223372036854775807"),
        // serve start-up: the pipeline, the database, pricing, limits
        case(&[&"serve", &"--model", &garbage_weights, &"--db", &keys_db, &"--listen", &"127.0.0.1:0"], "diffusion_pytorch_model.safetensors"),
        case(&[&"serve", &"--model", &teacher, &"--db", &garbage_file, &"--listen", &"127.0.0.1:0"], "garbage.bin"),
        case(&[&"serve", &"--model", &teacher, &"--db", &keys_db, &"--pricing", &wrong_pricing, &"--listen", &"127.0.0.1:0"], "pricing.yaml"),
        case(&[&"serve", &"--model", &teacher, &"--db", &keys_db, &"--pricing", &folder, &"--listen", &"127.0.0.1:0"], "a-folder"),
        case(&[&"serve", &"--model", &teacher, &"--db", &keys_db, &"--max-request-seconds", &"1e308", &"--listen", &"127.0.0.1:0"], "--max-request-seconds"),
        // demo: its arguments
        case(&[&"demo", &"--out", &out("d1"), &"--count", &"18446744073709551615"], "--count"),
        case(&[&"demo", &"--out", &out("d2"), &"--teacher-steps", &"18446744073709551615"], "--teacher-steps"),
        case(&[&"demo", &"--out", &out("d3"), &"--caption-dropout", &"nan"], "--caption-dropout"),
        case(&[&"demo", &"--out", &out("d4"), &"--inception", &garbage_file], "garbage.bin"),
    ];

    // ---- run them, four at a time ----
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(vec![]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let started = Instant::now();
                let (code, stderr) = run_case(c, t);
                if started.elapsed() > Duration::from_secs(5) {
                    eprintln!("slow case ({:.1}s): {:?}", started.elapsed().as_secs_f64(), c.args);
                }
                if code != Some(1) || stderr.contains("panicked") || !stderr.contains(&c.needle) {
                    failures.lock().unwrap().push(format!("sdkd {:?}\n  exit {code:?}, expected 1 naming {:?}:\n  {}", c.args, c.needle, stderr.trim()));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!("{} hostile cases in {:.1}s", cases.len(), t0.elapsed().as_secs_f64());
    assert!(failures.is_empty(), "{} of {} hostile cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
}
