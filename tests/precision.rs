//! Mixed-precision student training through `Distiller`, on the CPU (the trainer itself computes
//! in fp32 there, but the mechanism is device-independent): bf16 and fp16 compute keep fp32
//! master weights and fp32 gradients, agree with the fp32 step within their rounding, and fp16's
//! dynamic loss scale skips an overflowing step without touching the weights.
use sdkd::demo::cosine;
use sdkd::distill::loss::LossWeights;
use sdkd::distill::loss_scale::LossScale;
use sdkd::distill::optim::AdamWConfig;
use sdkd::distill::student::{copy_from_teacher, StudentPlan};
use sdkd::distill::trainer::{Distiller, Teacher};
use sdkd::models::{weights, Init, UNet, UNetConfig};
use sdkd::schedulers::{NoiseSchedule, SchedulerConfig};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// An SD-shaped teacher (4 stages, 2 layers each, a mid block) small enough for the CPU, so the
/// bk presets apply as they do to SD-1.5.
fn teacher_config() -> UNetConfig {
    UNetConfig::from_json(&serde_json::json!({
        "block_out_channels": [16, 32, 32, 32],
        "attention_head_dim": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 16,
        "sample_size": 16
    }))
    .unwrap()
}

/// tch's generator is global and the tests of one binary run in parallel: each test holds this
/// while it draws.
static RNG: Mutex<()> = Mutex::new(());

/// The same teacher and student (same seed) whatever `kind` the student computes in.
fn distiller_on(kind: Kind, device: Device) -> Distiller {
    let config = teacher_config();
    tch::manual_seed(11);
    let teacher = UNet::build(&config, device, Kind::Float, Init::Torch);
    let plan = StudentPlan::resolve("bk_small", Some(&config)).unwrap();
    let student = UNet::build(&plan.config, device, Kind::Float, Init::Torch);
    copy_from_teacher(&plan, &teacher, &student).unwrap();
    let (teacher_inner, _) = plan.inner_features();
    let schedule = NoiseSchedule::new(SchedulerConfig::from_path(Path::new("configs/reference/sd15_scheduler_config.json")).unwrap()).unwrap();
    Distiller::new(student, plan, Some(Teacher::new(teacher, teacher_inner)), Arc::new(schedule), AdamWConfig::default(), Some(0.9), LossWeights::default())
        .unwrap()
        .with_compute_kind(kind)
        .unwrap()
}

fn distiller(kind: Kind) -> Distiller {
    distiller_on(kind, Device::Cpu)
}

/// Drawn on the CPU, so every device gets the same numbers.
fn batch(device: Device) -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let latents = Tensor::randn([2, 4, 16, 16], (Kind::Float, Device::Cpu));
    (latents.to_device(device), Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)).to_device(device))
}

/// One micro-step with a fixed draw of noise and timesteps; returns (loss, flat fp32 gradient).
fn loss_and_grad(d: &Distiller) -> (f64, Tensor) {
    let (latents, context) = batch(d.student().model.device());
    tch::manual_seed(5);
    let terms = d.micro_step(&latents, &context, 1);
    let grads: Vec<Tensor> = weights::named_tensors(&d.student().vs)
        .iter()
        .map(|(name, p)| {
            assert_eq!(p.kind(), Kind::Float, "master weight {name}");
            let g = p.grad();
            assert!(g.defined(), "{name} got no gradient");
            assert_eq!(g.kind(), Kind::Float, "gradient of {name}");
            g.flatten(0, -1)
        })
        .collect();
    (terms.total.double_value(&[]), Tensor::cat(&grads, 0))
}

fn snapshot(d: &Distiller) -> Vec<Tensor> {
    weights::named_tensors(&d.student().vs).iter().map(|(_, t)| t.copy()).collect()
}

/// How far a reduced-precision step may be from the fp32 step: relative loss difference,
/// 1 - gradient cosine, |gradient norm ratio - 1|.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    loss: f64,
    cosine_gap: f64,
    norm: f64,
}

/// On the CPU: about twice what was measured (bf16: loss 1.7e-4, cosine gap 1.5e-4, norm 3.3e-4;
/// fp16: loss 2.3e-5, cosine gap 2.9e-6, norm 7.2e-5). LibTorch picks its bf16 kernels by the
/// CPU's instruction set: on a Xeon with AVX-512/AMX the measured norm ratio was 7.7e-4 for bf16
/// (loss 5.0e-5, cosine gap 1.5e-4) and 1.7e-4 for fp16 (loss 2.2e-5, cosine gap 3.1e-6), so the
/// norm bounds are twice those.
const CPU_BOUNDS: [(Kind, Bounds); 2] = [
    (Kind::BFloat16, Bounds { loss: 4e-4, cosine_gap: 3e-4, norm: 1.5e-3 }),
    (Kind::Half, Bounds { loss: 5e-5, cosine_gap: 6e-6, norm: 3.5e-4 }),
];

/// On CUDA, never measured yet (no GPU run has been made): the looser bounds of rounding.
const CUDA_BOUNDS: [(Kind, Bounds); 2] = [
    (Kind::BFloat16, Bounds { loss: 5e-3, cosine_gap: 1e-3, norm: 1e-2 }),
    (Kind::Half, Bounds { loss: 5e-3, cosine_gap: 1e-3, norm: 1e-2 }),
];

#[test]
fn bf16_and_fp16_compute_match_fp32_with_fp32_masters() {
    reduced_precision_matches_fp32(Device::Cpu, CPU_BOUNDS);
}

/// The same on a GPU (scripts/gpu-check.sh runs `--include-ignored cuda`), where it is what
/// `sdkd train` does.
#[test]
#[ignore = "needs a CUDA device: scripts/gpu-check.sh runs it"]
fn bf16_and_fp16_compute_match_fp32_on_cuda() {
    reduced_precision_matches_fp32(Device::Cuda(0), CUDA_BOUNDS);
}

fn reduced_precision_matches_fp32(device: Device, bounds: [(Kind, Bounds); 2]) {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (loss32, grad32) = loss_and_grad(&distiller_on(Kind::Float, device));
    assert!(loss32.is_finite() && loss32 > 0.0);
    for (kind, bound) in bounds {
        let mut d = distiller_on(kind, device);
        let (loss, grad) = loss_and_grad(&d);
        // fp16 gradients come out multiplied by the loss scale until `update` divides them
        let grad = grad / d.loss_scale().map_or(1.0, |s| s.scale);
        let rel = (loss - loss32).abs() / loss32;
        let cos = cosine(&grad, &grad32);
        let norm_ratio = (grad.norm() / grad32.norm()).double_value(&[]);
        let (cosine_gap, norm) = (1.0 - cos, (norm_ratio - 1.0).abs());
        eprintln!(
            "{kind:?}: loss {loss:.6} vs fp32 {loss32:.6} (rel {rel:.2e}), gradient cosine 1 - {cosine_gap:.2e}, norm ratio 1 + {:.2e}",
            norm_ratio - 1.0
        );
        // not fp32 in disguise: the rounding shows, but only as rounding
        assert!(loss != loss32, "{kind:?} loss is bit-identical to fp32's: the student did not compute in {kind:?}");
        assert!(rel < bound.loss, "{kind:?} loss {loss} vs fp32 {loss32}: rel {rel:e}, {bound:?}");
        assert!(cosine_gap < bound.cosine_gap, "{kind:?} gradient cosine {cos}, {bound:?}");
        assert!(norm < bound.norm, "{kind:?} gradient norm ratio {norm_ratio}, {bound:?}");
        // the student's activations and features are in `kind`, its weights stay fp32
        let (latents, context) = batch(device);
        let wanted = d.plan().inner_features().1;
        let t = Tensor::from_slice(&[10i64, 900]).to_device(device);
        let out = d.student().model.forward(&latents.to_kind(kind), &t, &context.to_kind(kind), &wanted);
        assert_eq!(out.sample.kind(), kind);
        for p in &d.plan().feature_pairs {
            assert_eq!(out.feature(&p.student).unwrap().kind(), kind, "feature {}", p.student);
        }
        let update = d.update(1e-3, Some(1.0)).unwrap();
        assert!(!update.skipped && update.grad_norm.double_value(&[]).is_finite());
    }
}

#[test]
fn bf16_training_lowers_the_loss() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = distiller(Kind::BFloat16);
    let before = snapshot(&d);
    let mut losses = vec![];
    for _ in 0..12 {
        let (loss, _) = loss_and_grad(&d);
        losses.push(loss);
        let update = d.update(1e-3, Some(1.0)).unwrap();
        assert!(!update.skipped);
    }
    eprintln!("bf16 losses on one batch: {losses:.4?}");
    assert!(losses[11] < 0.8 * losses[0], "loss did not fall: {losses:?}");
    let after = snapshot(&d);
    assert!(after.iter().all(|t| t.kind() == Kind::Float) && before.iter().zip(&after).any(|(a, b)| a != b));
    let ema = d.ema().unwrap().state_tensors();
    assert!(ema.iter().all(|(_, t)| t.kind() == Kind::Float));
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let mut d = distiller(Kind::Half);
    assert_eq!(d.loss_scale(), Some(LossScale::default()));
    let before = snapshot(&d);
    let ema_before: Vec<Tensor> = d.ema().unwrap().state_tensors().iter().map(|(_, t)| t.copy()).collect();
    // A scale no fp32 loss survives: every gradient is inf or NaN.
    d.set_loss_scale(LossScale { scale: 1e300, good_steps: 7 });
    let (latents, context) = batch(Device::Cpu);
    d.micro_step(&latents, &context, 1);
    let update = d.update(1e-3, Some(1.0)).unwrap();
    assert!(update.skipped);
    assert!(!update.grad_norm.double_value(&[]).is_finite());
    assert_eq!(d.loss_scale(), Some(LossScale { scale: 5e299, good_steps: 0 }));
    assert!(snapshot(&d).iter().zip(&before).all(|(a, b)| a == b), "a skipped step changed the weights");
    let ema_after = d.ema().unwrap().state_tensors();
    assert!(ema_after.iter().zip(&ema_before).all(|((_, a), b)| a == b), "a skipped step moved the EMA");
    assert!(d.optimizer().steps().iter().all(|(_, s)| *s == 0), "a skipped step counted as an AdamW step");
    assert!(weights::named_tensors(&d.student().vs).iter().all(|(_, p)| !p.grad().defined()), "gradients were not cleared");

    // With a sane scale the next step goes through.
    d.set_loss_scale(LossScale::default());
    d.micro_step(&latents, &context, 1);
    let update = d.update(1e-3, Some(1.0)).unwrap();
    assert!(!update.skipped && update.grad_norm.double_value(&[]).is_finite());
    assert_eq!(d.loss_scale(), Some(LossScale { scale: LossScale::INIT, good_steps: 1 }));
    assert!(d.optimizer().steps().iter().all(|(_, s)| *s == 1));
    assert!(snapshot(&d).iter().zip(&before).any(|(a, b)| a != b));
}

