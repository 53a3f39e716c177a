//! Held-out denoising loss: how well a UNet predicts its regression target (noise or v) on
//! latents it never trained on, at a fixed grid of timesteps with fixed noise, so that teacher,
//! students and controls are measured on exactly the same problems.
use crate::models::unet::AddedCond;
use crate::models::UNet2DConditionModel;
use crate::schedulers::NoiseSchedule;
use tch::{Device, Kind, Tensor};

/// Mean MSE over `batches` of (latents scaled for the UNet, text embeddings, the added
/// conditioning: SDXL's pooled embeddings and time ids, empty for SD), each at `timesteps` evenly
/// spaced timesteps, with noise drawn from `seed`.
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    batches: &[(Tensor, Tensor, AddedCond)],
    timesteps: usize,
    seed: i64,
) -> f64 {
    let _guard = tch::no_grad_guard();
    let n = schedule.num_train_timesteps() as i64;
    let mut total = 0.0;
    let mut count = 0;
    tch::manual_seed(seed);
    for (latents, context, added) in batches {
        let b = latents.size()[0];
        for k in 0..timesteps as i64 {
            // the middle of each of `timesteps` equal bins of [0, n)
            let t_value = (2 * k + 1) * n / (2 * timesteps as i64);
            let t = Tensor::full([b], t_value, (Kind::Int64, latents.device()));
            let noise = Tensor::randn(latents.size(), (Kind::Float, Device::Cpu)).to_device(latents.device());
            let noisy = schedule.add_noise(latents, &noise, &t);
            let target = schedule.training_target(schedule.prediction_type(), latents, &noise, &t);
            let kind = unet.kind();
            let pred = unet.predict_cond(&noisy.to_kind(kind), &t, &context.to_kind(kind), added);
            total += crate::distill::loss::mse(&pred, &target).double_value(&[]);
            count += 1;
        }
    }
    total / count.max(1) as f64
}
