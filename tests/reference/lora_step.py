"""Reference LoRA training steps for the LoRA tests of tests/lcm_train.rs, with PEFT's adapters on
diffusers' UNet2DConditionModel (the train fixture's teacher as the base), float32 on the CPU,
autocast off, one thread:

- `task`: one fine-tuning step on the task loss (MSE to the noise), as diffusers'
  train_text_to_image_lora.py takes it: PEFT LoraConfig with the LCM-LoRA target list, the base
  frozen, AdamW (fused) over the adapters only, grad-norm clip 1.0.
- `lcm`: one LCM-LoRA step as diffusers' examples/consistency_distillation/
  train_lcm_distill_lora_sd_wds.py takes it (the example is not in the wheel; its step is
  rewritten here line for line): the same PEFT student, no guidance embedding (timestep_cond
  None), the teacher (the frozen base) with CFG in the LCM convention, one DDIM step, and the
  target from the same adapted UNet under no_grad (no separate target network, no EMA).

B starts random (not PEFT's zeros) so that the first step moves A too; both sides start from the
values saved here. Everything random is drawn here and saved for the Rust side to replay.

usage: lora_step.py TEACHER_PIPELINE OUT_DIR

Writes OUT_DIR/<case>.safetensors:
  init.<module>.lora_A.weight, init.<module>.lora_B.weight   the adapters before the step
  latents, context, noise, timesteps (task) | index, w, uncond (lcm)   the step's inputs
  loss (1,), grad.<adapter param>, step1.<adapter param>   the loss, gradients, adapters after AdamW
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from safetensors.torch import save_file

TEACHER, OUT = sys.argv[1], sys.argv[2]
os.makedirs(OUT, exist_ok=True)
torch.set_num_threads(1)

RANK, ALPHA, LR, WD, MAX_NORM, BATCH = 4, 8.0, 1e-5, 1e-2, 1.0, 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
N_DDIM, W_MIN, W_MAX, SCALING = 50, 5.0, 15.0, 10.0


def adapted_unet(seed):
    """The base with PEFT adapters (its default init), then a random B; returns (unet, adapters by sdkd's name)."""
    unet = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet")
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed + 1)
    params = {}
    for name, p in unet.named_parameters():
        if ".lora_" in name:
            if ".lora_B." in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            p.requires_grad_(True)
            params[name.replace(".default", "")] = p
    unet.train()
    return unet, params


def step(params, loss, out):
    loss.backward()
    out.update({f"grad.{n}": p.grad.detach().clone() for n, p in params.items()})
    optimizer = torch.optim.AdamW(list(params.values()), lr=LR, betas=(0.9, 0.999), weight_decay=WD, eps=1e-8, fused=True)
    torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM)
    optimizer.step()
    out.update({f"step1.{n}": p.detach().clone() for n, p in params.items()})
    out["loss"] = loss.detach().reshape(1)


def task():
    scheduler = DDPMScheduler.from_pretrained(TEACHER, subfolder="scheduler")
    unet, params = adapted_unet(0)
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(3)
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    latents = torch.randn(BATCH, 4, size, size, generator=gen)
    context = torch.randn(BATCH, 77, dim, generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.tensor([7, 811])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    assert scheduler.config.prediction_type == "epsilon"
    pred = unet(noisy, timesteps, encoder_hidden_states=context).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
    out.update({"latents": latents, "context": context, "noise": noise, "timesteps": timesteps})
    step(params, loss, out)
    return out


# ---- the LoRA script's helpers, as written there ----
def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled_timestep = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def predicted_original_sample(model_output, timesteps, sample, alphas, sigmas):  # epsilon
    return (sample - extract_into_tensor(sigmas, timesteps, sample.shape) * model_output) / extract_into_tensor(alphas, timesteps, sample.shape)


def lcm():
    scheduler = DDPMScheduler.from_pretrained(TEACHER, subfolder="scheduler")
    alpha_schedule = torch.sqrt(scheduler.alphas_cumprod)
    sigma_schedule = torch.sqrt(1 - scheduler.alphas_cumprod)
    ac = scheduler.alphas_cumprod.numpy()
    k = scheduler.config.num_train_timesteps // N_DDIM
    ddim_timesteps = (np.arange(1, N_DDIM + 1) * k).round().astype(np.int64) - 1
    ddim_prev = torch.from_numpy(np.asarray([ac[0]] + ac[ddim_timesteps[:-1]].tolist()))
    ddim_timesteps = torch.from_numpy(ddim_timesteps).long()
    teacher = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet")
    teacher.requires_grad_(False)
    unet, params = adapted_unet(5)
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(6)
    size, dim = unet.config.sample_size, unet.config.cross_attention_dim
    uncond = torch.randn(1, 77, dim, generator=gen)
    latents = torch.randn(BATCH, 4, size, size, generator=gen)
    context = torch.randn(BATCH, 77, dim, generator=gen)
    index = torch.tensor([0, N_DDIM - 1])  # both ends: t_n = 0 (target = x_prev) and 999
    noise = torch.randn(latents.shape, generator=gen)
    w = (W_MAX - W_MIN) * torch.rand((BATCH,), generator=gen) + W_MIN
    start = ddim_timesteps[index]
    timesteps = torch.clamp(start - k, min=0)
    c_skip_start, c_out_start = [append_dims(x, 4) for x in scalings_for_boundary_conditions(start, timestep_scaling=SCALING)]
    c_skip, c_out = [append_dims(x, 4) for x in scalings_for_boundary_conditions(timesteps, timestep_scaling=SCALING)]
    noisy = scheduler.add_noise(latents, noise, start)
    wr = w.reshape(BATCH, 1, 1, 1)
    # "for LCM-LoRA distillation it is not necessary to use a guidance scale embedding"
    pred = unet(noisy, start, timestep_cond=None, encoder_hidden_states=context).sample
    model_pred = c_skip_start * noisy + c_out_start * predicted_original_sample(pred, start, noisy, alpha_schedule, sigma_schedule)
    with torch.no_grad():
        cond = teacher(noisy, start, encoder_hidden_states=context).sample
        unc = teacher(noisy, start, encoder_hidden_states=uncond.repeat(BATCH, 1, 1)).sample
        cond_x0 = predicted_original_sample(cond, start, noisy, alpha_schedule, sigma_schedule)
        unc_x0 = predicted_original_sample(unc, start, noisy, alpha_schedule, sigma_schedule)
        pred_x0 = cond_x0 + wr * (cond_x0 - unc_x0)
        pred_noise = cond + wr * (cond - unc)
        a_prev = extract_into_tensor(ddim_prev, index, pred_x0.shape)
        x_prev = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * pred_noise
        assert x_prev.dtype == torch.float64
        # "we do not use a separate target network for LCM-LoRA distillation"
        target_pred = unet(x_prev.float(), timesteps, timestep_cond=None, encoder_hidden_states=context).sample
        target = c_skip * x_prev + c_out * predicted_original_sample(target_pred, timesteps, x_prev, alpha_schedule, sigma_schedule)
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    out.update({"latents": latents, "context": context, "noise": noise, "index": index, "w": w, "uncond": uncond})
    step(params, loss, out)
    return out


for name, make in [("task", task), ("lcm", lcm)]:
    out = make()
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{name}.safetensors"))
    print(name, float(out["loss"][0]), sum(1 for k in out if k.startswith("init.")) // 2, "adapters")
