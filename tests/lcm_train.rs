//! `method: lcm`: the latent consistency distillation step against a reference written at test
//! time from diffusers' classes (tests/reference/lcm_step.py: the step of diffusers'
//! `train_lcm_distill_sd_wds.py`, autocast off, float32 on the CPU) on the same inputs, then
//! `sdkd train` with `method: lcm` end to end: resume bit-exact with the target network, the
//! logged scalars, and bad `lcm:` values refused naming their key.
mod common;

use common::lcd::{err, inputs_at, worst};
use common::*;
use sdkd::config::LcmConfig;
use sdkd::config::ConsistencyLoss;
use sdkd::distill::encoder::{TextEmbeds, Unconditional};
use sdkd::distill::lcd::LcdInputs;
use sdkd::distill::loss::LossWeights;
use sdkd::distill::optim::AdamWConfig;
use sdkd::distill::student::StudentPlan;
use sdkd::distill::trainer::{Distiller, Teacher};
use sdkd::models::{weights, Init, PipelineDir, UNet};
use sdkd::schedulers::config::PredictionType;
use sdkd::schedulers::NoiseSchedule;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// lcm_step.py's learning rate.
const LR: f64 = 1e-5;

/// The reference steps of lcm_step.py on the train fixture's teacher, made once.
fn reference() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let teacher = train_fixture().teacher.clone();
        let inputs = [file_bytes("tests/reference/lcm_step.py"), file_bytes("scripts/constraints.txt"), teacher.display().to_string().into_bytes()];
        shared_fixture("lcm-step", &inputs, |dir| run_reference("lcm_step.py", &[teacher.to_str().unwrap(), dir.to_str().unwrap()]))
    })
}

/// An LCD distiller on the train fixture's teacher (`common::lcd::distiller`), the reference's
/// encoded "" as the unconditional embedding.
fn distiller(case: &BTreeMap<String, Tensor>, prediction: PredictionType, lcm: LcmConfig) -> Distiller {
    let uncond = Unconditional::Embeds(TextEmbeds { context: case["uncond"].shallow_clone(), pooled: None });
    common::lcd::distiller(&train_fixture().teacher, case, prediction, &lcm, uncond)
}

/// Replays a reference case: the first step's loss, gradients and weights after AdamW + EMA
/// (`common::lcd::check_first_step`), and every step's loss. Returns the largest relative loss
/// error over the steps.
fn replay(name: &str, prediction: PredictionType, loss: ConsistencyLoss) -> f64 {
    let case = read_tensors(&reference().join(format!("{name}.safetensors")));
    let mut d = distiller(&case, prediction, LcmConfig { loss, ..LcmConfig::default() });
    let mut worst_loss = common::lcd::check_first_step(name, &case, &mut d, LR);
    let steps = case["loss"].size()[0];
    for s in 1..steps {
        let terms = d.lcd_micro_step_with(&case["latents"].get(s), &case["context"].get(s), &Default::default(), &inputs_at(&case, s), 1).unwrap();
        let (ours, theirs) = (terms.loss.double_value(&[]), case["loss"].double_value(&[s]));
        worst_loss = worst_loss.max((ours - theirs).abs() / theirs.abs());
        assert!(!d.update(LR, Some(1.0)).unwrap().skipped);
    }
    if steps > 1 {
        let (params, target) = (weights::named_tensors(&d.student().vs), d.consistency().unwrap().target_tensors());
        let (es, at_s) = worst(&case, "last.student.", &params);
        let (et, at_t) = worst(&case, "last.target.", &target);
        println!("{name}: after step {steps}: student within {es:.2e} ({at_s}), target within {et:.2e} ({at_t})");
    }
    worst_loss
}

/// One LCD step equals the reference's: loss within 1e-6, gradients within 1e-5, student and
/// target weights after AdamW (clipped) and the target EMA within 1e-6 (relative to each tensor's
/// largest value); 20 steps follow the reference's loss curve; epsilon and v prediction, l2 and
/// pseudo-Huber.
#[test]
fn lcd_steps_equal_the_reference() {
    // one thread, as the reference: LibTorch's kernels then sum in the same order on both sides
    tch::set_num_threads(1);
    let _ = reference();
    let curve = replay("epsilon_l2", PredictionType::Epsilon, ConsistencyLoss::L2);
    println!("epsilon_l2: 20 losses within {curve:.2e} relative of the reference's");
    assert!(curve <= 1e-4, "the loss curve left the reference's: {curve:e}");
    replay("epsilon_huber", PredictionType::Epsilon, ConsistencyLoss::Huber);
    replay("v_prediction_huber", PredictionType::VPrediction, ConsistencyLoss::Huber);
}


/// `lcm.output_kd` = λ adds λ × the MSE between the student's raw output at (z, t_{n+k}, text, w)
/// and the teacher's guided output `out_c + w·(out_c − out_u)` at the same z, t_{n+k} and w,
/// recomputed here from the two UNets' forwards: the term within 1e-6, the gradients those of the
/// consistency loss alone plus λ × the term's within 1e-5; the consistency loss is unchanged.
#[test]
fn output_kd_beside_the_consistency_loss_is_the_guided_teacher_mse() {
    use sdkd::models::unet::AddedCond;
    tch::set_num_threads(1);
    let case = read_tensors(&reference().join("epsilon_l2.safetensors"));
    let inputs = || LcdInputs { index: case["index"].get(0), noise: case["noise"].get(0), w: case["w"].get(0) };
    let (latents, context) = (case["latents"].get(0), case["context"].get(0));
    let grads = |d: &Distiller| -> Vec<(String, Tensor)> { weights::named_tensors(&d.student().vs).into_iter().map(|(n, p)| (n, p.grad().copy())).collect() };
    let plain = distiller(&case, PredictionType::Epsilon, LcmConfig::default());
    let alone = plain.lcd_micro_step_with(&latents, &context, &AddedCond::default(), &inputs(), 1).unwrap();
    assert!(alone.output_kd.is_none());
    let lambda = 0.5;
    let kd = distiller(&case, PredictionType::Epsilon, LcmConfig { output_kd: lambda, ..LcmConfig::default() });
    let with = kd.lcd_micro_step_with(&latents, &context, &AddedCond::default(), &inputs(), 1).unwrap();
    assert_eq!(with.loss.double_value(&[]), alone.loss.double_value(&[]), "the consistency loss changed");
    let (g_alone, g_with) = (grads(&plain), grads(&kd));

    // the term from the UNets' forwards, on the kd distiller's student (its gradients cleared)
    let params = weights::named_tensors(&kd.student().vs);
    tch::no_grad(|| params.iter().for_each(|(_, p)| { let _ = p.grad().zero_(); }));
    let pipeline = PipelineDir::open(&train_fixture().teacher).unwrap();
    let teacher = pipeline.load_unet(Device::Cpu, Kind::Float).unwrap();
    let schedule = NoiseSchedule::new(pipeline.scheduler_config().unwrap()).unwrap();
    let (start, _) = kd.consistency().unwrap().solver().start_and_target(&inputs().index);
    let noisy = schedule.add_noise(&latents, &inputs().noise, &start);
    let w = inputs().w;
    let added = AddedCond { timestep_cond: Some(sdkd::models::embeddings::guidance_scale_embedding(&w, 256)), ..AddedCond::default() };
    let none = Default::default();
    let student = kd.student().model.forward_cond(&noisy, &start, &context, &added, &none).sample;
    let guided = tch::no_grad(|| {
        let out = |ctx: &Tensor| teacher.model.forward(&noisy, &start, ctx, &none).sample;
        let (c, u) = (out(&context), out(&case["uncond"].repeat([latents.size()[0], 1, 1])));
        &c + w.view([-1, 1, 1, 1]) * (&c - u)
    });
    let term = student.mse_loss(&guided, tch::Reduction::Mean);
    (&term * lambda).backward();
    let (ours, expected) = (with.output_kd.unwrap().double_value(&[]), term.double_value(&[]));
    println!("output KD {ours} vs {expected} recomputed");
    assert!((ours - expected).abs() <= 1e-6 * expected.abs() && expected > 0.0, "output KD {ours} vs {expected}");
    let mut worst = (0.0f64, String::new());
    for (((name, a), (_, b)), (_, p)) in g_alone.iter().zip(&g_with).zip(&params) {
        let sum = a + p.grad();
        let e = err(b, &sum);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    println!("gradients within {:.2e} ({})", worst.0, worst.1);
    assert!(worst.0 <= 1e-5, "gradient {} off by {:e}", worst.1, worst.0);
    let moved = g_alone.iter().zip(&g_with).filter(|((_, a), (_, b))| !a.equal(b)).count();
    assert!(moved > 0, "the KD term changed no gradient");
}

/// A tiny `method: lcm` run on the train fixture (bk_small pruned on the spot from the teacher).
fn config(dir: &Path, max_steps: u64, extra: &str) -> PathBuf {
    let f = train_fixture();
    let text = format!(
        "teacher: {}\nstudent: bk_small\noutput_dir: {}\nmethod: lcm\ndata:\n  path: {}\n  resolution: 16\n\
         train:\n  batch_size: 2\n  grad_accum: 2\n  max_steps: {max_steps}\n  seed: 7\n  device: cpu\n  precision: fp32\n\
         optim:\n  lr: 1.0e-4\n\
         checkpoint:\n  every: 2\n  keep: 3\nlog:\n  every: 1\nvalidation:\n  every: 0\n{extra}",
        f.teacher.display(),
        dir.join("run").display(),
        f.data.display(),
    );
    let path = dir.join(format!("run-{max_steps}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn train(args: &[&str]) -> String {
    let o = sdkd(&[&["train", "--quiet"], args].concat());
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "train {args:?}:\n{stderr}");
    stderr
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (read_tensors(a), read_tensors(b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>(), "{}", a.display());
    for (k, v) in &ta {
        assert!(v.equal(&tb[k]), "{k} differs between {} and {}", a.display(), b.display());
    }
}

/// A grid of 20 points (not the default 50) and s = 5: what the export's LCMScheduler config must say.
const GRID: &str = "lcm:\n  num_ddim_timesteps: 20\n  timestep_scaling: 5.0\n";

/// A validation grid at the last step: the teacher's row at 2 DDIM steps, then the student at
/// the default LCM step counts (1, 2, 4, 8), on the prompt, seed and guidance `exports_its_grid` samples.
const VALIDATION: &str = "validation:\n  every: 4\n  prompts: [a red cube on a blue table]\n  steps: 2\n  scheduler: ddim\n  guidance_scale: 6.0\n";

/// Four LCD steps straight equal two, a checkpoint, a resume and two more, bit for bit: student,
/// AdamW, and the target network; the target moved away from the student (an EMA, not a copy);
/// TensorBoard has the consistency loss, w's mean and the target decay; `final/` has the student
/// with `time_cond_proj_dim` and the target. The run's grid (20 points, s = 5) is what its
/// exported pipeline's LCMScheduler config says, as diffusers reads it, and what `sdkd generate`
/// samples the export on, pixel-identical to diffusers.
#[test]
fn lcm_run_resumes_bit_exact_with_its_target_network() {
    let straight = tempdir();
    let cfg = config(straight.path(), 4, GRID);
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("validation:\n  every: 0\n", VALIDATION)).unwrap();
    train(&["--config", cfg.to_str().unwrap()]);
    let split = tempdir();
    train(&["--config", config(split.path(), 2, GRID).to_str().unwrap()]);
    train(&["--config", config(split.path(), 4, GRID).to_str().unwrap(), "--resume", "latest"]);
    let (a, b) = (straight.path().join("run/checkpoints/step-4"), split.path().join("run/checkpoints/step-4"));
    for f in ["student.safetensors", "target.safetensors", "optimizer.safetensors"] {
        assert_same_tensors(&a.join(f), &b.join(f));
    }
    let (student, target) = (read_tensors(&a.join("student.safetensors")), read_tensors(&a.join("target.safetensors")));
    assert!(student.contains_key("time_embedding.cond_proj.weight"));
    assert!(student.iter().any(|(k, v)| !v.equal(&target[k])), "the target network equals the student");
    let run = straight.path().join("run");
    let unet: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("final/unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet["time_cond_proj_dim"], 256);
    assert!(run.join("final/unet_target/diffusion_pytorch_model.safetensors").exists());
    let out = python_command().arg(root().join("tests/reference/trainkit_tb_read.py")).arg(run.join("tb")).output().unwrap();
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &tb["scalars"];
    for tag in ["loss/total", "loss/consistency", "lcm/w_mean", "lcm/target_ema", "grad_norm"] {
        assert_eq!(s[tag].as_array().map(|a| a.len()), Some(4), "{tag}: {s}");
    }
    let w: Vec<f64> = s["lcm/w_mean"].as_array().unwrap().iter().map(|e| e[1].as_f64().unwrap()).collect();
    assert!(w.iter().all(|w| (5.0..=15.0).contains(w)) && w.windows(2).any(|p| p[0] != p[1]), "{w:?}");
    assert!((s["lcm/target_ema"][0][1].as_f64().unwrap() - 0.95).abs() < 1e-6);
    assert!(s["loss/task"].is_null(), "an LCD run logs no KD task loss");
    let grid = run.join("samples/step-4.png");
    let text: BTreeMap<String, String> = sdkd::png_meta::read_png_text(&grid).unwrap().into_iter().collect();
    let rows = "teacher (ddim, 2 steps) | student (lcm, 1 step) | student (lcm, 2 steps) | student (lcm, 4 steps) | student (lcm, 8 steps)";
    assert_eq!(text["rows"], rows);
    let grid = image::open(&grid).unwrap().to_rgb8();
    let size = (grid.width(), (grid.height() - 4 * sdkd::grid::GAP) / 5);
    assert_eq!(grid.height(), 5 * size.1 + 4 * sdkd::grid::GAP, "five rows of one image each");
    let cell = |row: u32| image::imageops::crop_imm(&grid, 0, row * (size.1 + sdkd::grid::GAP), size.0, size.1).to_image();
    assert!(cell(1) != cell(4), "the 1-step and 8-step rows are the same image");
    exports_its_grid(&a, &cell(3));
}

/// `sdkd export --format pipeline` of an LCD run with a 20-point grid and s = 5: diffusers'
/// `StableDiffusionPipeline.from_pretrained` reads an LCMScheduler with them (4 steps on the
/// 20-point grid: 999, 749, 499, 249, not the default grid's 759 and 259) and samples the same
/// pixels as `sdkd generate` on the export and as the run's validation grid (`validated`, its
/// 4-step LCM cell at the same step, seed and guidance).
fn exports_its_grid(checkpoint: &Path, validated: &image::RgbImage) {
    let size = validated.width().to_string();
    let tmp = tempdir();
    let p = |s: &str| tmp.path().join(s).display().to_string();
    let o = sdkd(&["export", "--checkpoint", checkpoint.to_str().unwrap(), "--format", "pipeline", "--out", &p("export")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    run_reference("lcm_unet.py", &["check", &p("export"), &p("theirs.png"), "4", "7", "6.0", &size]);
    let seen: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p("theirs.png.json")).unwrap()).unwrap();
    assert_eq!(seen["original_inference_steps"], 20, "{seen}");
    assert_eq!(seen["timestep_scaling"], 5.0, "{seen}");
    assert_eq!(seen["timesteps"], serde_json::json!([999, 749, 499, 249]), "{seen}");
    let o = sdkd(&["generate", "--model", &p("export"), "--prompt", "a red cube on a blue table", "--scheduler", "lcm", "--steps", "4",
        "--seed", "7", "--guidance-scale", "6", "--width", &size, "--height", &size, "--out", &p("ours.png")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (ours, theirs) = (image::open(p("ours.png")).unwrap().to_rgb8(), image::open(p("theirs.png")).unwrap().to_rgb8());
    assert!(ours == theirs, "sdkd generate and diffusers sample the exported LCM student differently");
    assert!(&ours == validated, "the validation grid's 4-step row is not what the export samples");
}

/// A run started as `kd` does not resume as `lcm` (nor back), naming `method`; a solver grid
/// that does not divide the teacher's timesteps is refused before training, naming its key.
#[test]
fn lcm_refuses_a_kd_checkpoint_and_a_bad_grid() {
    let tmp = tempdir();
    let cfg = config(tmp.path(), 2, "");
    let kd = tmp.path().join("kd.yaml");
    std::fs::write(&kd, std::fs::read_to_string(&cfg).unwrap().replace("method: lcm\n", "")).unwrap();
    train(&["--config", kd.to_str().unwrap()]);
    let o = sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap(), "--resume", "latest"]);
    assert_clean_failure(&o, "method");
    let back = tempdir();
    let lcm = config(back.path(), 2, "");
    train(&["--config", lcm.to_str().unwrap()]);
    let kd = back.path().join("kd.yaml");
    std::fs::write(&kd, std::fs::read_to_string(&lcm).unwrap().replace("method: lcm\n", "")).unwrap();
    assert_clean_failure(&sdkd(&["train", "--quiet", "--config", kd.to_str().unwrap(), "--resume", "latest"]), "method");
    let bad = tempdir();
    let cfg = config(bad.path(), 2, "lcm:\n  num_ddim_timesteps: 3\n");
    assert_clean_failure(&sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap()]), "lcm.num_ddim_timesteps");
    assert!(!bad.path().join("run/checkpoints").exists());
    // an LCM grid past original_inference_steps (50) is refused at the start, not at the first grid
    let grid = tempdir();
    let cfg = config(grid.path(), 2, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("validation:\n  every: 0\n", "validation:\n  every: 2\n  scheduler: lcm\n  steps: 51\n");
    std::fs::write(&cfg, text).unwrap();
    assert_clean_failure(&sdkd(&["train", "--quiet", "--config", cfg.to_str().unwrap()]), "validation.steps 51");
    assert!(!grid.path().join("run/checkpoints").exists());
}

/// The reference LoRA steps of lora_step.py (PEFT adapters on the train fixture's teacher), made once.
fn lora_reference() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let teacher = train_fixture().teacher.clone();
        let inputs = [file_bytes("tests/reference/lora_step.py"), file_bytes("scripts/constraints.txt"), teacher.display().to_string().into_bytes()];
        shared_fixture("lora-step", &inputs, |dir| run_reference("lora_step.py", &[teacher.to_str().unwrap(), dir.to_str().unwrap()]))
    })
}

/// The teacher's architecture with lora_step.py's adapters (rank 4, alpha 8, diffusers' LCM-LoRA
/// targets), its base the teacher's weights, its adapters the reference's initial values.
fn lora_student(case: &BTreeMap<String, Tensor>) -> (UNet, StudentPlan) {
    let teacher = PipelineDir::open(&train_fixture().teacher).unwrap().load_unet(Device::Cpu, Kind::Float).unwrap();
    let config = teacher.model.config.clone();
    let spec = sdkd::config::LoraConfig { rank: 4, alpha: Some(8.0), ..Default::default() }.spec();
    let student = UNet::build_with_adapters(&config, Device::Cpu, Kind::Float, Init::Empty, &spec).unwrap();
    sdkd::distill::optim::copy_named(&weights::named_tensors(&student.vs), &weights::named_tensors(&teacher.vs), "base").unwrap();
    let init: Vec<(String, Tensor)> = case.iter().filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.shallow_clone()))).collect();
    sdkd::distill::optim::copy_named(&student.trainable(), &init, "reference adapters").unwrap();
    let plan = StudentPlan::explicit(config.clone(), Some(&config));
    (student, plan)
}

/// Checks a LoRA step against the reference case: loss within 1e-6, adapter gradients within
/// 1e-5, adapters after AdamW (clipped) within 1e-5, and every base weight bit-identical.
fn check_lora_step(name: &str, case: &BTreeMap<String, Tensor>, mut d: Distiller, loss: f64) {
    let base: Vec<(String, Tensor)> = weights::named_tensors(&d.student().vs).into_iter().map(|(n, t)| (n, t.copy())).collect();
    let theirs = case["loss"].double_value(&[0]);
    println!("{name}: loss {loss} vs PEFT reference {theirs}");
    assert!((loss - theirs).abs() <= 1e-6 * theirs.abs(), "{name}: loss {loss} vs reference {theirs}");
    let params = d.student().trainable();
    assert_eq!(d.optimizer().params().len(), params.len(), "the optimizer holds the adapters alone");
    let grads: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.grad())).collect();
    let (e, at) = worst(case, "grad.", &grads);
    println!("{name}: {} adapter gradients within {e:.2e} ({at})", grads.len());
    assert!(e <= 1e-5, "{name}: gradient {at} off by {e:e} relative");
    assert!(!d.update(LR, Some(1.0)).unwrap().skipped);
    let (e, at) = worst(case, "step1.", &params);
    println!("{name}: adapters after the step within {e:.2e} ({at})");
    assert!(e <= 1e-5, "{name}: adapter {at} off by {e:e} relative after the step");
    for (n, t) in weights::named_tensors(&d.student().vs) {
        let before = &base.iter().find(|(m, _)| *m == n).unwrap().1;
        assert!(t.equal(before), "{name}: base weight {n} changed");
    }
}

/// One LoRA step on the task loss equals PEFT's (the base frozen, AdamW over the adapters), and
/// one LCM-LoRA step equals the LoRA script's (no guidance embedding, the adapted student as its
/// own target under no_grad); the base bytes stay identical.
#[test]
fn lora_steps_equal_peft_references() {
    tch::set_num_threads(1);
    let task = read_tensors(&lora_reference().join("task.safetensors"));
    let (student, plan) = lora_student(&task);
    let schedule = std::sync::Arc::new(NoiseSchedule::new(PipelineDir::open(&train_fixture().teacher).unwrap().scheduler_config().unwrap()).unwrap());
    let d = Distiller::new(student, plan, None, schedule.clone(), AdamWConfig::default(), None, LossWeights::default()).unwrap();
    let terms = d.micro_step_with(&task["latents"], &task["context"], &Default::default(), &task["noise"], &task["timesteps"], 1);
    let loss = terms.total.double_value(&[]);
    check_lora_step("task", &task, d, loss);

    let lcm = read_tensors(&lora_reference().join("lcm.safetensors"));
    let (student, plan) = lora_student(&lcm);
    let teacher = PipelineDir::open(&train_fixture().teacher).unwrap().load_unet(Device::Cpu, Kind::Float).unwrap();
    let d = Distiller::new(student, plan, Some(Teacher::new(teacher, Default::default())), schedule, AdamWConfig::default(), None, LossWeights::default())
        .unwrap()
        .with_consistency(&LcmConfig::default(), Unconditional::Embeds(TextEmbeds { context: lcm["uncond"].shallow_clone(), pooled: None }))
        .unwrap();
    assert!(!d.consistency().unwrap().has_target(), "LCM-LoRA has no separate target network");
    let inputs = LcdInputs { index: lcm["index"].shallow_clone(), noise: lcm["noise"].shallow_clone(), w: lcm["w"].shallow_clone() };
    let loss = d.lcd_micro_step_with(&lcm["latents"], &lcm["context"], &Default::default(), &inputs, 1).unwrap().loss.double_value(&[]);
    check_lora_step("lcm", &lcm, d, loss);
}

/// LCM-LoRA (`method: lcm` with `lora:`, as diffusers' train_lcm_distill_lora_sd_wds.py): the
/// run's checkpoint holds adapters and no target network, and its adapters, exported in both
/// layouts, give diffusers (`load_lora_weights`, `LCMScheduler`, 4 steps) sdkd's image.
#[test]
fn lcm_lora_run_gives_diffusers_its_4_step_image() {
    let dir = tempdir();
    let cfg = config(dir.path(), 2, "lora:\n  rank: 2\n  alpha: 4\n");
    // a large rate, so that two steps move the adapters visibly off zero
    std::fs::write(&cfg, std::fs::read_to_string(&cfg).unwrap().replace("lr: 1.0e-4", "lr: 1.0e-2")).unwrap();
    train(&["--config", cfg.to_str().unwrap()]);
    let checkpoint = dir.path().join("run/checkpoints/step-2");
    assert!(checkpoint.join("lora.safetensors").exists() && !checkpoint.join("target.safetensors").exists());
    let teacher = &train_fixture().teacher;
    assert_trained_lora_in_diffusers(&checkpoint, &LoraGeneration { model: teacher, student: "bk_small", scheduler: "lcm", steps: 4, guidance: 1.0, size: 32 });
}
