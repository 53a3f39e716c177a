//! Replaying a latent consistency distillation step of tests/reference/lcm_step.py (diffusers'
//! `train_lcm_distill_sd_wds.py` / `train_lcm_distill_sdxl_wds.py` step on diffusers' classes) on an
//! sdkd `Distiller`: shared by tests/lcm_train.rs (SD-1.x) and tests/sdxl.rs (SDXL).
use sdkd::config::LcmConfig;
use sdkd::distill::encoder::Unconditional;
use sdkd::distill::lcd::LcdInputs;
use sdkd::distill::loss::LossWeights;
use sdkd::distill::optim::AdamWConfig;
use sdkd::distill::student::StudentPlan;
use sdkd::distill::trainer::{Distiller, Teacher};
use sdkd::models::unet::AddedCond;
use sdkd::models::{weights, Init, PipelineDir, UNet};
use sdkd::schedulers::config::PredictionType;
use sdkd::schedulers::NoiseSchedule;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// max |a - b| / max(|b|, floor): relative to the reference's scale, absolute near zero.
pub fn err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let scale = b.abs().max().double_value(&[]).max(1e-3);
    (a - &b).abs().max().double_value(&[]) / scale
}

/// The worst of `err` over the reference's `<prefix><param>` tensors against `ours`, and its name.
pub fn worst(reference: &BTreeMap<String, Tensor>, prefix: &str, ours: &[(String, Tensor)]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (name, t) in ours {
        let r = reference.get(&format!("{prefix}{name}")).unwrap_or_else(|| panic!("reference has no {prefix}{name}"));
        let e = err(t, r);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    worst
}

/// The reference's draws of step `s`.
pub fn inputs_at(case: &BTreeMap<String, Tensor>, s: i64) -> LcdInputs {
    LcdInputs { index: case["index"].get(s), noise: case["noise"].get(s), w: case["w"].get(s) }
}

/// SDXL's added conditioning of step `s` (`pooled`, `time_ids`), or none (SD).
pub fn added_at(case: &BTreeMap<String, Tensor>, s: i64) -> AddedCond {
    AddedCond { text_embeds: case.get("pooled").map(|t| t.get(s)), time_ids: case.get("time_ids").map(|t| t.get(s)), timestep_cond: None }
}

/// Step 1 of a reference case on `d` (an LCD distiller starting from the case's `init.` weights):
/// the loss within 1e-6 relative, the student's gradients within 1e-5, then AdamW (lr `lr`,
/// clipped at 1) and the target EMA: student and target weights within 1e-6 (relative to each
/// tensor's largest value). Returns the loss's relative error.
pub fn check_first_step(name: &str, case: &BTreeMap<String, Tensor>, d: &mut Distiller, lr: f64) -> f64 {
    let params = weights::named_tensors(&d.student().vs);
    let terms = d.lcd_micro_step_with(&case["latents"].get(0), &case["context"].get(0), &added_at(case, 0), &inputs_at(case, 0), 1).unwrap();
    let (ours, theirs) = (terms.loss.double_value(&[]), case["loss"].double_value(&[0]));
    println!("{name}: loss {ours} vs reference {theirs}");
    assert!((ours - theirs).abs() <= 1e-6 * theirs.abs(), "{name}: loss {ours} vs reference {theirs}");
    let grads: Vec<(String, Tensor)> = params.iter().map(|(n, p)| (n.clone(), p.grad())).collect();
    let (e, at) = worst(case, "grad.", &grads);
    println!("{name}: gradients within {e:.2e} ({at})");
    assert!(e <= 1e-5, "{name}: gradient {at} off by {e:e} relative");
    assert!(!d.update(lr, Some(1.0)).unwrap().skipped);
    let target = d.consistency().unwrap().target_tensors();
    let (es, at_s) = worst(case, "step1.student.", &params);
    let (et, at_t) = worst(case, "step1.target.", &target);
    println!("{name}: after step 1: student within {es:.2e} ({at_s}), target within {et:.2e} ({at_t})");
    assert!(es <= 1e-6 && et <= 1e-6, "{name}: after the first step the student is off by {es:e} ({at_s}), the target by {et:e} ({at_t})");
    (ours - theirs).abs() / theirs.abs()
}

/// An LCD distiller as the scripts build it on the teacher of pipeline `teacher` (its scheduler
/// with `prediction`): the student is the teacher's architecture with `cond_proj` (256), starting
/// from the reference case's initial weights (its fresh cond_proj included); `uncond` the
/// teacher's unconditional input.
pub fn distiller(teacher: &Path, case: &BTreeMap<String, Tensor>, prediction: PredictionType, lcm: &LcmConfig, uncond: Unconditional) -> Distiller {
    let pipeline = PipelineDir::open(teacher).unwrap();
    let teacher = pipeline.load_unet(Device::Cpu, Kind::Float).unwrap();
    let mut config = teacher.model.config.clone();
    config.time_cond_proj_dim = Some(256);
    let student = UNet::build(&config, Device::Cpu, Kind::Float, Init::Empty);
    let init: Vec<(String, Tensor)> = case.iter().filter_map(|(k, v)| k.strip_prefix("init.").map(|n| (n.to_string(), v.shallow_clone()))).collect();
    sdkd::distill::optim::copy_named(&weights::named_tensors(&student.vs), &init, "reference init").unwrap();
    let plan = StudentPlan::explicit(config, Some(&teacher.model.config));
    let mut scheduler = pipeline.scheduler_config().unwrap();
    scheduler.prediction_type = prediction;
    let schedule = std::sync::Arc::new(NoiseSchedule::new(scheduler).unwrap());
    Distiller::new(student, plan, Some(Teacher::new(teacher, Default::default())), schedule, AdamWConfig::default(), None, LossWeights::default())
        .unwrap()
        .with_consistency(lcm, uncond)
        .unwrap()
}
