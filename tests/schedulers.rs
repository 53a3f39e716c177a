//! Parity of sdkd's samplers and noise schedule with diffusers 0.42.1, step by step on fixed
//! model-output sequences (tests/reference/scheduler_steps.py): timesteps exactly, every step's
//! sample exactly (UniPC: to a relative error, max |Δ| / max |ref|, of at most `UNIPC_STEP_TOL`),
//! seeded runs (DDPM, Euler ancestral, LCM) drawing the same noise as a
//! `torch.Generator("cpu").manual_seed(S)`; LCM also on custom timestep lists.
mod common;

use sdkd::schedulers::{randn, NoiseSchedule, Sampler, SchedulerConfig, SchedulerKind};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tch::{Device, Kind, Tensor};

/// Bound on max |sdkd - diffusers| / max |diffusers| for every step's sample and scaled input of
/// UniPC, whose coefficients diffusers solves with torch.linalg.solve and applies with einsum:
/// about twice the worst measured (4.4e-7). The other samplers do diffusers' float32 arithmetic
/// exactly.
const UNIPC_STEP_TOL: f64 = 1e-6;

fn step_tol(kind: SchedulerKind) -> f64 {
    if kind == SchedulerKind::Unipc { UNIPC_STEP_TOL } else { 0.0 }
}
/// Euler's Karras timesteps are float32 values from a log-σ table that numpy rounds its own way
/// (an ulp off correct rounding for ~15% of entries); everything else is compared exactly.
const KARRAS_T_TOL: f64 = 1e-3;

const SHAPE: [i64; 4] = [2, 4, 8, 8];

/// The reference data, generated once per test process.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scheduler-reference");
        std::fs::create_dir_all(&dir).unwrap();
        common::run_reference("scheduler_steps.py", &[dir.to_str().unwrap()]);
        dir
    })
}

fn json(name: &str) -> Value {
    let text = std::fs::read_to_string(reference().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn steps_tensors() -> &'static Mutex<BTreeMap<String, Tensor>> {
    static T: OnceLock<Mutex<BTreeMap<String, Tensor>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(common::read_tensors(&reference().join("steps.safetensors"))))
}

fn tensor(name: &str) -> Tensor {
    steps_tensors().lock().unwrap().get(name).unwrap_or_else(|| panic!("reference lacks {name}")).shallow_clone()
}

/// LibTorch's CPU generator is process-global: runs that draw from it take turns.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

fn build(kind: SchedulerKind, config: &Value, steps: usize) -> anyhow::Result<Box<dyn Sampler>> {
    let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_json(config)?)?);
    kind.build(&schedule, steps)
}

fn is_euler_karras(kind: SchedulerKind, config: &Value) -> bool {
    kind == SchedulerKind::Euler && config.get("use_karras_sigmas") == Some(&Value::Bool(true))
}

fn check_timesteps(label: &str, kind: SchedulerKind, config: &Value, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{label}: {} timesteps, diffusers has {}", got.len(), want.len());
    let tol = if is_euler_karras(kind, config) { KARRAS_T_TOL } else { 0.0 };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{label}: timestep {i} is {g}, diffusers {w}\n sdkd {got:?}\n want {want:?}");
    }
}

/// common::rel_err, except that NaNs must sit where diffusers has them (UniPC "bh1" with a zero
/// final σ ends in NaN in diffusers too) and are left out of the maximum.
fn step_err(label: &str, got: &Tensor, want: &Tensor) -> f64 {
    let nan = want.isnan();
    assert!(got.isnan().equal(&nan), "{label}: NaNs where diffusers has none, or the other way round");
    let keep = nan.logical_not();
    if keep.sum(Kind::Int64).int64_value(&[]) == 0 {
        return 0.0;
    }
    common::rel_err(&got.masked_select(&keep), &want.masked_select(&keep))
}

/// Runs every case of `kind`; returns (case, max step error) pairs.
fn run_cases(kind: SchedulerKind) -> Vec<(String, f64)> {
    let cases = json("cases.json");
    let mut report = Vec::new();
    for c in cases.as_array().unwrap() {
        if c["kind"].as_str().unwrap().parse::<SchedulerKind>().unwrap() != kind {
            continue;
        }
        let name = c["name"].as_str().unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let config = &c["config"];
        let mut sampler = match c["custom"].as_array() {
            Some(ts) => {
                let ts: Vec<i64> = ts.iter().map(|v| v.as_i64().unwrap()).collect();
                let schedule = Arc::new(NoiseSchedule::new(SchedulerConfig::from_json(config).unwrap()).unwrap());
                kind.build_with_timesteps(&schedule, &ts)
            }
            None => build(kind, config, steps),
        }
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let want_t: Vec<f64> = c["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        check_timesteps(name, kind, config, sampler.timesteps(), &want_t);
        let ins = c["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (sampler.init_noise_sigma() - ins).abs() <= 1e-6 * ins,
            "{name}: init_noise_sigma {} vs {ins}",
            sampler.init_noise_sigma()
        );

        let init = tensor(&format!("{name}/init"));
        let outs = tensor(&format!("{name}/model_outputs"));
        let scaled = tensor(&format!("{name}/scaled"));
        let samples = tensor(&format!("{name}/samples"));
        let _guard = c["seed"].as_u64().map(|_| rng_lock());
        let mut sample = match c["seed"].as_u64() {
            Some(seed) => {
                // diffusers' order: latents from the seeded generator, then every step's noise
                tch::manual_seed(seed as i64);
                let latents = randn(&SHAPE, Kind::Float, Device::Cpu) * sampler.init_noise_sigma();
                assert_eq!(common::rel_err(&latents, &init), 0.0, "{name}: seeded latents differ from diffusers'");
                latents
            }
            None => init,
        };
        let mut worst: f64 = 0.0;
        let tol = step_tol(kind);
        for i in 0..want_t.len() {
            let x_in = sampler.scale_model_input(&sample, i);
            let e_in = step_err(name, &x_in, &scaled.get(i as i64));
            assert!(e_in <= tol, "{name}: scaled input of step {i} off by {e_in:e} (bound {tol:e})");
            sample = sampler.step(&outs.get(i as i64), i, &sample);
            let e = step_err(name, &sample, &samples.get(i as i64));
            assert!(e <= tol, "{name}: step {i} of {} off by {e:e} (relative; bound {tol:e})", want_t.len());
            worst = worst.max(e).max(e_in);
        }
        report.push((name.to_string(), worst));
    }
    assert!(!report.is_empty(), "no reference cases for {kind}");
    let max = report.iter().map(|r| r.1).fold(0.0, f64::max);
    let (mean, n) = (report.iter().map(|r| r.1).sum::<f64>() / report.len() as f64, report.len());
    println!("{kind}: {n} cases, max step error {max:.2e}, mean of per-case max {mean:.2e}");
    for (name, e) in &report {
        println!("  {name:<44} {e:.2e}");
    }
    report
}

#[test]
fn ddpm_matches_diffusers() {
    run_cases(SchedulerKind::Ddpm);
}

#[test]
fn ddim_matches_diffusers() {
    run_cases(SchedulerKind::Ddim);
}

#[test]
fn euler_matches_diffusers() {
    run_cases(SchedulerKind::Euler);
}

#[test]
fn euler_ancestral_matches_diffusers() {
    run_cases(SchedulerKind::EulerAncestral);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    run_cases(SchedulerKind::Dpmpp2m);
}

#[test]
fn unipc_matches_diffusers() {
    run_cases(SchedulerKind::Unipc);
}

#[test]
fn lcm_matches_diffusers() {
    let report = run_cases(SchedulerKind::Lcm);
    // 1 to 8 steps, custom timesteps and LCMScheduler's own beta defaults are all covered
    for name in ["lcm-sd15-1", "lcm-sd15-4", "lcm-sd15-8", "lcm-custom-offgrid", "lcm-defaults-12"] {
        assert!(report.iter().any(|(n, _)| n == name), "no case {name}");
    }
}

#[test]
fn pndm_matches_diffusers() {
    let report = run_cases(SchedulerKind::Pndm);
    // both of diffusers' modes are covered: PLMS alone (skip_prk_steps) and the PRK warm-up
    assert!(report.iter().any(|(n, _)| n.contains("prk")) && report.iter().any(|(n, _)| n.contains("sd15")));
}

/// Timesteps, σs and init_noise_sigma of set_timesteps(n) over many n, spacings, offsets, Karras.
#[test]
fn timesteps_and_sigmas_match_diffusers_sweep() {
    let sweep = json("sweep.json");
    let mut checked = 0;
    for e in sweep.as_array().unwrap() {
        let kind: SchedulerKind = e["kind"].as_str().unwrap().parse().unwrap();
        let n = e["steps"].as_u64().unwrap() as usize;
        let config = &e["config"];
        let label = format!("{kind} n={n} {config}");
        let built = build(kind, config, n);
        if e["error"].as_bool().unwrap() {
            let err = built.err().unwrap_or_else(|| panic!("{label}: diffusers fails, sdkd built it"));
            // LCM: set_timesteps refuses more steps than the distillation grid has
            let why = if kind == SchedulerKind::Lcm { "original_inference_steps" } else { "outside" };
            assert!(err.to_string().contains(why), "{label}: {err}");
            continue;
        }
        let s = built.unwrap_or_else(|err| panic!("{label}: {err:#}"));
        let want: Vec<f64> = e["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        check_timesteps(&label, kind, config, s.timesteps(), &want);
        let ins = e["init_noise_sigma"].as_f64().unwrap();
        assert_eq!(s.init_noise_sigma(), ins, "{label}: init_noise_sigma");
        if let Some(sig) = e.get("sigmas") {
            let want: Vec<f64> = sig.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got: Vec<f64> = s.sigmas().iter().map(|&x| x as f64).collect();
            assert_eq!(got, want, "{label}: sigmas");
        }
        checked += 1;
    }
    println!("{checked} step counts/configs checked");
    assert!(checked > 1500);
}

/// betas, alphas_cumprod (DDPMScheduler) and σs (EulerDiscreteScheduler) are diffusers' float32
/// values exactly.
#[test]
fn noise_schedule_matches_diffusers() {
    let configs = json("schedules.json");
    let t = common::read_tensors(&reference().join("schedule.safetensors"));
    for (name, cfg) in configs.as_object().unwrap() {
        let s = NoiseSchedule::new(SchedulerConfig::from_json(cfg).unwrap()).unwrap();
        for (key, ours) in [("betas", s.betas()), ("alphas_cumprod", s.alphas_cumprod()), ("sigmas", s.sigmas())] {
            let want = Vec::<f64>::try_from(&t[&format!("{name}/{key}")].to_kind(Kind::Double)).unwrap();
            assert_eq!(ours.len(), want.len(), "{name} {key} length");
            let diff = ours.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            println!("{name:<9} {key:<15} max |diff| {diff:e}");
            assert_eq!(diff, 0.0, "{name}: {key} differs from diffusers by {diff:e}");
        }
    }
}

/// The training side: add_noise and the v target on per-sample timesteps.
#[test]
fn add_noise_and_velocity_match_diffusers() {
    let t = common::read_tensors(&reference().join("schedule.safetensors"));
    let sd15 = json("schedules.json")["sd15"].clone();
    let s = NoiseSchedule::new(SchedulerConfig::from_json(&sd15).unwrap()).unwrap();
    let (x0, noise, ts) = (&t["train/x0"], &t["train/noise"], &t["train/timesteps"]);
    let noisy = s.add_noise(x0, noise, ts);
    let v = s.velocity(x0, noise, ts);
    let (e_noisy, e_v) = (common::rel_err(&noisy, &t["train/noisy"]), common::rel_err(&v, &t["train/velocity"]));
    println!("add_noise rel err {e_noisy:e}, velocity rel err {e_v:e}");
    assert!(e_noisy <= 1e-7 && e_v <= 1e-7);
    let target = s.training_target(sdkd::schedulers::PredictionType::VPrediction, x0, noise, ts);
    assert_eq!(common::rel_err(&target, &v), 0.0);
}

/// A pipeline config that swaps schedulers keeps the file's keys and takes the target's defaults
/// for the rest, as `Target.from_config(pipe.scheduler.config)` does: SD-1.5's PNDM file gives
/// DDIM leading spacing with offset 1 and UniPC linspace.
#[test]
fn missing_keys_take_each_samplers_default() {
    let sd15 = json("schedules.json")["sd15"].clone();
    let ddim = build(SchedulerKind::Ddim, &sd15, 10).unwrap();
    assert_eq!(ddim.timesteps()[0], 901.0);
    let unipc = build(SchedulerKind::Unipc, &sd15, 10).unwrap();
    assert_eq!(unipc.timesteps()[0], 999.0);
}

#[test]
fn unsupported_keys_fail_for_the_sampler_that_reads_them() {
    let mut cfg = json("schedules.json")["sd15"].clone();
    cfg["timestep_type"] = Value::String("continuous".into());
    let err = build(SchedulerKind::Euler, &cfg, 10).err().unwrap().to_string();
    assert!(err.contains("timestep_type") && err.contains("continuous"), "{err}");
    build(SchedulerKind::Unipc, &cfg, 10).unwrap();
    let cfg = serde_json::json!({"prediction_type": "sample"});
    let err = build(SchedulerKind::EulerAncestral, &cfg, 10).err().unwrap().to_string();
    assert!(err.contains("prediction_type") && err.contains("sample"), "{err}");
}
