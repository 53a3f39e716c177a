//! Memory: gradient checkpointing (`train.gradient_checkpointing`) against stored activations,
//! bit for bit on the CPU.
use sdkd::distill::loss::LossWeights;
use sdkd::distill::optim::AdamWConfig;
use sdkd::distill::student::{copy_from_teacher, StudentPlan};
use sdkd::distill::trainer::{Distiller, Teacher};
use sdkd::models::{weights, Checkpointing, Init, UNet, UNetConfig};
use sdkd::schedulers::{NoiseSchedule, SchedulerConfig};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// tch's generator is global and the tests of one binary run in parallel.
static RNG: Mutex<()> = Mutex::new(());

/// An SD-shaped teacher (4 stages, 2 layers each, a mid block) small enough for the CPU.
fn tiny_config() -> UNetConfig {
    UNetConfig::from_json(&serde_json::json!({
        "block_out_channels": [16, 32, 32, 32],
        "attention_head_dim": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 16,
        "sample_size": 16
    }))
    .unwrap()
}

fn medium_config() -> UNetConfig {
    UNetConfig::from_path(Path::new("configs/bench/medium_unet_config.json")).unwrap()
}

/// What a run of `steps` optimizer steps leaves: every loss, the gradients of each step and the
/// final weights and EMA.
struct Trace {
    losses: Vec<f64>,
    grads: Vec<Vec<Tensor>>,
    weights: Vec<Tensor>,
    ema: Vec<Tensor>,
}

/// The distiller, and the teacher's parameters (the same tensors it holds).
fn distiller_and_teacher(config: &UNetConfig, preset: &str, mode: Checkpointing, distill: bool) -> (Distiller, Vec<(String, Tensor)>) {
    tch::manual_seed(11);
    let teacher = UNet::build(config, Device::Cpu, Kind::Float, Init::Torch);
    let teacher_params = weights::named_tensors(&teacher.vs);
    let plan = StudentPlan::resolve(preset, Some(config)).unwrap();
    let student = UNet::build(&plan.config, Device::Cpu, Kind::Float, Init::Torch);
    copy_from_teacher(&plan, &teacher, &student).unwrap();
    let (teacher_inner, _) = plan.inner_features();
    let teacher = distill.then(|| Teacher::new(teacher, teacher_inner));
    let schedule = NoiseSchedule::new(SchedulerConfig::from_path(Path::new("configs/reference/sd15_scheduler_config.json")).unwrap()).unwrap();
    let d = Distiller::new(student, plan, teacher, Arc::new(schedule), AdamWConfig::default(), Some(0.9), LossWeights::default())
        .unwrap()
        .with_checkpointing(mode);
    (d, teacher_params)
}

fn distiller(config: &UNetConfig, preset: &str, mode: Checkpointing, distill: bool) -> Distiller {
    distiller_and_teacher(config, preset, mode, distill).0
}

fn train(config: &UNetConfig, preset: &str, mode: Checkpointing, distill: bool, latent: i64, accum: usize) -> Trace {
    let (mut d, teacher) = distiller_and_teacher(config, preset, mode, distill);
    let teacher_before: Vec<Tensor> = teacher.iter().map(|(_, t)| t.copy()).collect();
    let params = weights::named_tensors(&d.student().vs);
    let mut trace = Trace { losses: vec![], grads: vec![], weights: vec![], ema: vec![] };
    for step in 0..5 {
        for micro in 0..accum {
            tch::manual_seed(100 + (step * accum + micro) as i64);
            let latents = Tensor::randn([2, 4, latent, latent], (Kind::Float, Device::Cpu));
            let context = Tensor::randn([2, 5, config.cross_attention_dim], (Kind::Float, Device::Cpu));
            trace.losses.push(d.micro_step(&latents, &context, accum).total.double_value(&[]));
        }
        trace.grads.push(params.iter().map(|(_, p)| p.grad().copy()).collect());
        let update = d.update(1e-3, Some(1.0)).unwrap();
        assert!(!update.skipped);
    }
    // the teacher is frozen: no gradient, and its weights unchanged after 5 steps
    if distill {
        for ((name, t), before) in teacher.iter().zip(&teacher_before) {
            assert!(!t.requires_grad() && !t.grad().defined(), "teacher {name} takes gradients");
            assert!(t.equal(before), "teacher {name} changed in training");
        }
    }
    trace.weights = params.iter().map(|(_, p)| p.copy()).collect();
    trace.ema = d.ema().unwrap().state_tensors().into_iter().map(|(_, t)| t).collect();
    trace
}

fn assert_identical(a: &Trace, b: &Trace, what: &str) {
    assert_eq!(a.losses, b.losses, "{what}: losses");
    for (step, (ga, gb)) in a.grads.iter().zip(&b.grads).enumerate() {
        assert!(ga.iter().all(Tensor::defined), "{what}: a parameter got no gradient at step {step}");
        for (i, (x, y)) in ga.iter().zip(gb).enumerate() {
            assert!(x.equal(y), "{what}: gradient {i} differs at step {step}");
        }
    }
    assert!(a.weights.iter().zip(&b.weights).all(|(x, y)| x.equal(y)), "{what}: weights after 5 steps");
    assert!(a.ema.iter().zip(&b.ema).all(|(x, y)| x.equal(y)), "{what}: EMA after 5 steps");
}

/// Every preset, both checkpointing modes, distilling (task + output KD + feature KD on the
/// block outputs) and, where `scratch`, the task loss alone.
fn equivalence(config: &UNetConfig, name: &str, latent: i64, accum: usize, scratch: bool) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    for preset in ["bk_base", "bk_small", "bk_tiny"] {
        for distill in [true, false].into_iter().filter(|&d| d || scratch) {
            let reference = train(config, preset, Checkpointing::None, distill, latent, accum);
            assert!(reference.losses.iter().all(|l| l.is_finite() && *l > 0.0));
            for mode in [Checkpointing::Blocks, Checkpointing::Attention] {
                let what = format!("{name} {preset} distill={distill} {mode:?}");
                assert_identical(&train(config, preset, mode, distill, latent, accum), &reference, &what);
                eprintln!("{what}: 5 steps bit-identical to stored activations");
            }
        }
    }
}

#[test]
fn checkpointing_is_bit_identical_on_the_tiny_unet() {
    // two micro-batches per step: the gradients of the second add to the first's
    equivalence(&tiny_config(), "tiny", 16, 2, true);
}

#[test]
fn checkpointing_is_bit_identical_on_the_medium_unet() {
    // distilling only: the task-loss-only graph is a part of it, and the tiny test covers it
    equivalence(&medium_config(), "medium", 8, 1, false);
}

/// Checkpointing is not a no-op: on the medium UNet (bk_small, distilling, batch 2, latent 32,
/// fp32, CPU) `blocks` and `attention` run every checkpointed region a second time in backward
/// (28 and 9 regions), and the peak of live tensor bytes during one forward and backward less
/// the gradients (what `sdkd bench --report-memory` reports as the activations' tensors) falls
/// below the stored-activation step's: measured 41.1 MiB none, 27.7 MiB blocks, 30.7 MiB
/// attention.
/// The activations' live-tensor peak with checkpointing over that without, at most (measured
/// 67.5% for `blocks`, 74.8% for `attention`: at latent 32 the fixed temporaries weigh more than
/// at docs/benchmarks.md's 512 px, where `blocks` cuts 63-72%).
const BLOCKS_PEAK: f64 = 0.75;
const ATTENTION_PEAK: f64 = 0.85;

#[test]
fn checkpointing_recomputes_and_lowers_the_live_tensor_peak() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let config = medium_config();
    let step = |mode: Checkpointing| -> (f64, u64, u64) {
        let d = distiller(&config, "bk_small", mode, true);
        tch::manual_seed(100);
        let latents = Tensor::randn([2, 4, 32, 32], (Kind::Float, Device::Cpu));
        let context = Tensor::randn([2, 5, config.cross_attention_dim], (Kind::Float, Device::Cpu));
        let (regions, runs) = sdkd::models::recompute::counts();
        let window = sdkd::memory::PeakWindow::start(Device::Cpu).unwrap();
        let loss = d.micro_step(&latents, &context, 1).total.double_value(&[]);
        let peak = window.tensor_peak().unwrap().unwrap() as f64;
        let (regions_after, runs_after) = sdkd::models::recompute::counts();
        assert!(loss.is_finite());
        // the step's first gradients are allocated in it, the same bytes in every mode: the rest
        // is activations and temporaries
        let grads: i64 = weights::named_tensors(&d.student().vs).iter().map(|(_, p)| p.numel() as i64 * 4).sum();
        ((peak - grads as f64) / (1 << 20) as f64, regions_after - regions, runs_after - runs)
    };
    let (none, none_regions, none_runs) = step(Checkpointing::None);
    let (blocks, blocks_regions, blocks_runs) = step(Checkpointing::Blocks);
    let (attention, attention_regions, attention_runs) = step(Checkpointing::Attention);
    eprintln!("live tensor peak of one step less its gradients: none {none:.1} MiB, blocks {blocks:.1} MiB ({:.1}%), attention {attention:.1} MiB ({:.1}%)", 100.0 * blocks / none, 100.0 * attention / none);
    eprintln!("regions checkpointed / runs: blocks {blocks_regions} / {blocks_runs}, attention {attention_regions} / {attention_runs}");
    assert_eq!((none_regions, none_runs), (0, 0), "none checkpoints nothing");
    // bk_small on the medium UNet: every resnet, transformer and resampler of its blocks and
    // the output head; each forward once, recomputed once in backward
    assert!(blocks_regions > attention_regions && attention_regions > 0, "{blocks_regions} {attention_regions}");
    assert_eq!(blocks_runs, 2 * blocks_regions, "every checkpointed region recomputed once");
    assert_eq!(attention_runs, 2 * attention_regions, "every checkpointed transformer recomputed once");
    assert!(blocks < BLOCKS_PEAK * none, "blocks: {blocks:.1} MiB is not below {BLOCKS_PEAK} x none's {none:.1} MiB");
    assert!(attention < ATTENTION_PEAK * none, "attention: {attention:.1} MiB is not below {ATTENTION_PEAK} x none's {none:.1} MiB");
}

#[test]
fn an_unknown_checkpointing_value_is_a_clean_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.yaml");
    let yaml = "student: bk_small\nstudent_init: random\noutput_dir: run\ndata:\n  cache: cache\ntrain:\n  gradient_checkpointing: everything\n";
    std::fs::write(&cfg, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdkd")).args(["train", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("train.gradient_checkpointing") && stderr.contains("everything") && !stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("run").exists(), "nothing written for a refused config");
    // plan reads the same config, and refuses a size it cannot read
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdkd")).args(["plan", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("train.gradient_checkpointing") && stderr.contains("everything"), "{stderr}");
    std::fs::write(&cfg, yaml.replace("everything", "blocks")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdkd")).args(["plan", "--config", cfg.to_str().unwrap(), "--gpu-mem", "24XB"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(1) && stderr.contains("--gpu-mem \"24XB\"") && !stderr.contains("panicked"), "{stderr}");
}

mod bf16_state {
    use sdkd::distill::optim::{AdamW, AdamWConfig};
    use sdkd::models::weights;
    use tch::{Device, Kind, Tensor};

    fn params() -> Vec<(String, Tensor)> {
        tch::manual_seed(1);
        vec![("a".into(), Tensor::randn([64, 33], (Kind::Float, Device::Cpu)).set_requires_grad(true)), ("b".into(), Tensor::randn([7], (Kind::Float, Device::Cpu)).set_requires_grad(true))]
    }

    fn with_grads(ps: &[(String, Tensor)], seed: i64) {
        tch::manual_seed(seed);
        for (_, p) in ps {
            let loss = (p * Tensor::randn(p.size(), (Kind::Float, Device::Cpu))).sum(Kind::Float);
            loss.backward();
        }
    }

    fn adamw(ps: &[(String, Tensor)], state_kind: Kind) -> AdamW {
        AdamW::new(ps.iter().map(|(n, p)| (n.clone(), p.shallow_clone())).collect(), AdamWConfig { state_kind, ..AdamWConfig::default() }).unwrap()
    }

    fn moments(o: &AdamW) -> Vec<Tensor> {
        o.state_tensors().into_iter().filter(|(n, _)| n.starts_with("exp_avg")).map(|(_, t)| t.copy()).collect()
    }

    /// From zero moments the first update computes in fp32 either way: the parameters equal the
    /// fp32-state step's, and the stored moments are its moments rounded to bf16. Half the bytes.
    #[test]
    fn a_bf16_state_step_is_the_fp32_step_rounded() {
        let _rng = super::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let (p32, p16) = (params(), params());
        let (mut o32, mut o16) = (adamw(&p32, Kind::Float), adamw(&p16, Kind::BFloat16));
        assert_eq!(o16.state_kind(), Kind::BFloat16);
        assert_eq!(2 * o16.state_bytes(), o32.state_bytes());
        with_grads(&p32, 2);
        with_grads(&p16, 2);
        o32.step(1e-2).unwrap();
        o16.step(1e-2).unwrap();
        for ((_, a), (_, b)) in p32.iter().zip(&p16) {
            assert!(a.equal(b), "parameters after the first step");
        }
        for (m32, m16) in moments(&o32).iter().zip(moments(&o16)) {
            assert_eq!(m16.kind(), Kind::BFloat16);
            assert!(m32.to_kind(Kind::BFloat16).equal(&m16), "bf16 moments are the fp32 ones rounded");
        }
        // later steps read the rounded moments: close to fp32 state, not equal
        o32.zero_grad();
        o16.zero_grad();
        with_grads(&p32, 3);
        with_grads(&p16, 3);
        o32.step(1e-2).unwrap();
        o16.step(1e-2).unwrap();
        let (a, b) = (&p32[0].1, &p16[0].1);
        assert!(!a.equal(b));
        assert!(((a - b).abs().max().double_value(&[])) < 1e-4);
    }

    /// A checkpoint's moments load into either state dtype: fp32 into bf16 rounded, bf16 into
    /// fp32 exactly, and `load_state_file` says it converted.
    #[test]
    fn saved_moments_convert_between_state_dtypes() {
        let _rng = super::RNG.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        for (from, to) in [(Kind::Float, Kind::BFloat16), (Kind::BFloat16, Kind::Float), (Kind::BFloat16, Kind::BFloat16)] {
            let ps = params();
            let mut saved = adamw(&ps, from);
            with_grads(&ps, 4);
            saved.step(1e-2).unwrap();
            let file = dir.path().join("optimizer.safetensors");
            weights::save(&file, &saved.state_tensors(), None).unwrap();
            let mut loaded = adamw(&ps, to);
            let converted = loaded.load_state_file(&file).unwrap();
            assert_eq!(converted, (from != to).then_some(from), "{from:?} -> {to:?}");
            assert_eq!(loaded.state_kind(), to);
            for (a, b) in moments(&saved).iter().zip(moments(&loaded)) {
                assert!(a.to_kind(to).equal(&b), "{from:?} -> {to:?}");
            }
            assert_eq!(loaded.steps(), saved.steps());
        }
    }
}

mod plan {
    use serde_json::Value;
    use std::path::Path;
    use std::process::Command;

    fn sdkd_json(args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_sdkd")).args(args).output().unwrap();
        assert!(out.status.success(), "sdkd {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("sdkd {args:?}: not JSON ({e})"))
    }

    /// A teacher "pipeline" of the medium UNet's config alone: all that plan and bench read.
    fn medium_pipeline(dir: &Path) {
        std::fs::create_dir_all(dir.join("pipe/unet")).unwrap();
        std::fs::copy("configs/bench/medium_unet_config.json", dir.join("pipe/unet/config.json")).unwrap();
        std::fs::write(dir.join("pipe/model_index.json"), r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#).unwrap();
    }

    /// `sdkd plan` measures batch 1 and 2 and extrapolates; a real training step (`sdkd bench
    /// --mode train`, the trainer's `Distiller` step, in its own process) at batch 3 and 6 has
    /// the peak RSS it predicts, within 15%. With `--probe-resolution 128` (the path of the SD-1.5
    /// table in docs/benchmarks.md: probes at a quarter of the pixels, the per-sample activations
    /// scaled by 4) bk_small's prediction for the same 256 px steps is within 25% (measured 9.7% at
    /// batch 3, 16.0% at batch 6: small probes err high, docs/benchmarks.md).
    #[test]
    fn plan_predicts_the_peak_rss_of_real_steps() {
        let dir = tempfile::tempdir().unwrap();
        medium_pipeline(dir.path());
        let teacher = dir.path().join("pipe/unet/config.json");
        for student in ["bk_small", "bk_tiny"] {
            let run = dir.path().join(format!("{student}.yaml"));
            let yaml = format!(
                "teacher: pipe\nstudent: {student}\noutput_dir: out\ndata:\n  cache: cache\n  resolution: 256\ntrain:\n  batch_size: 3\n  device: cpu\n  precision: fp32\nvalidation:\n  every: 0\n"
            );
            std::fs::write(&run, yaml).unwrap();
            let plan = sdkd_json(&["plan", "--config", run.to_str().unwrap(), "--json", "--gpu-mem", "24GB"]);
            let (fixed, per_sample) = (plan["fixed_mb"].as_f64().unwrap(), plan["activations_per_sample_mb"].as_f64().unwrap());
            assert!(per_sample > 0.0 && fixed > 0.0, "{plan}");
            assert_eq!(plan["predicted_peak_mb"].as_f64().unwrap(), fixed + 3.0 * per_sample);
            assert_eq!(plan["gpus"][0]["fits"], true);
            let probed = (student == "bk_small").then(|| {
                let p = sdkd_json(&["plan", "--config", run.to_str().unwrap(), "--json", "--gpu-mem", "24GB", "--probe-resolution", "128"]);
                assert_eq!((p["probe_resolution"].as_u64(), p["activation_scale"].as_f64()), (Some(128), Some(4.0)), "{p}");
                (p["fixed_mb"].as_f64().unwrap(), p["activations_per_sample_mb"].as_f64().unwrap())
            });
            for batch in [3, 6] {
                let b = batch.to_string();
                let real = sdkd_json(&[
                    "bench", "--mode", "train", "--json", "--report-memory", "--teacher", teacher.to_str().unwrap(), "--student", student,
                    "--batch-size", &b, "--latent-size", "32", "--steps", "1", "--warmup", "1", "--device", "cpu",
                ]);
                // VmHWM: getrusage's ru_maxrss also counted this (forking) test process's memory
                let measured = real["peak_mem_mb"].as_f64().unwrap();
                let predicted = fixed + batch as f64 * per_sample;
                let err = (predicted - measured).abs() / measured;
                eprintln!("{student} batch {batch}: plan {predicted:.0} MiB, measured peak RSS {measured:.0} MiB ({:.1}%)", 100.0 * err);
                assert!(err < 0.15, "{student} batch {batch}: plan {predicted} MiB vs measured {measured} MiB");
                if let Some((fixed, per_sample)) = probed {
                    let predicted = fixed + batch as f64 * per_sample;
                    let err = (predicted - measured).abs() / measured;
                    eprintln!("{student} batch {batch}: plan probed at 128 px {predicted:.0} MiB ({:.1}%)", 100.0 * err);
                    assert!(err < 0.25, "{student} batch {batch}: plan probed at 128 px {predicted} MiB vs measured {measured} MiB");
                }
                let m = &real["memory"];
                assert!(m["peak_mb"].as_f64().unwrap() >= m["before_mb"].as_f64().unwrap() && m["step_mb"].as_f64().unwrap() > 0.0, "{m}");
                assert_eq!(m["optimizer_state_mb"].as_f64().unwrap(), plan["optimizer_mb"].as_f64().unwrap());
            }
        }
    }
}

/// Recomputing a forward is exact only without randomness: a UNet config with dropout is
/// refused when it loads, so no checkpointed block ever draws a dropout mask.
#[test]
fn a_unet_with_dropout_is_refused() {
    let err = UNetConfig::from_json(&serde_json::json!({"block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8, "dropout": 0.1})).unwrap_err();
    assert!(format!("{err:#}").contains("dropout"), "{err:#}");
    assert!(UNetConfig::from_json(&serde_json::json!({"block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8, "dropout": 0.0})).is_ok());
}
