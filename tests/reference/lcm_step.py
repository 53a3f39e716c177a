"""Reference steps of latent consistency distillation for tests/lcm_train.rs and tests/sdxl.rs: the
training step of diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py (and, on an
SDXL teacher, of train_lcm_distill_sdxl_wds.py), rewritten here with
diffusers' classes (UNet2DConditionModel, DDPMScheduler) because the example scripts are not in
the wheel: its DDIMSolver, boundary scalings, prediction conversions, guidance embedding, CFG in
the LCM convention, target network and EMA, line for line. Everything runs in float32 on the CPU
with autocast OFF (the script's `torch.autocast(device)` would run the teacher in bf16 on a CPU).
The randomness of each step (latents, text embeddings, solver index, noise, w) is drawn here and
saved, so the Rust side replays the same steps.

usage: lcm_step.py TEACHER_PIPELINE OUT_DIR [sdxl]

For each case (prediction type, loss, steps) it writes OUT_DIR/<case>.safetensors:
  init.<param>            the student's initial weights (the teacher's + a fresh cond_proj)
  uncond                  (1, 77, dim) the unconditional embedding (SD; SDXL's are zeros)
  latents, context, index, noise, w   each step's inputs, stacked on a leading step axis
  pooled, time_ids        (sdxl) the same for SDXL's added conditioning
  loss                    (steps,) the consistency loss of each step
  grad.<param>            the first step's gradients (before clipping)
  step1.student.<param>, step1.target.<param>   the weights after the first optimizer step + EMA
  last.student.<param>, last.target.<param>     after the last step

`sdxl` (the teacher an SDXL pipeline): one case, sdxl_epsilon_huber, one step at lr 1e-6, as the
SDXL script differs: w ~ U[3, 15]; the pooled text embedding and the time ids go to the teacher, the student and
the target (`added_cond_kwargs`); the unconditional teacher call gets zeros for the text embeddings
and the pooled one and keeps the batch's time ids (the script's `uncond_added_conditions` swaps
`text_embeds` alone).
"""
import copy
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

TEACHER, OUT = sys.argv[1], sys.argv[2]
SDXL = sys.argv[3:] == ["sdxl"]
os.makedirs(OUT, exist_ok=True)
torch.set_num_threads(1)  # a tiny model: threads only contend on a shared machine

N_DDIM, W_MIN, W_MAX, COND_DIM, SCALING, EMA, HUBER_C = 50, 3.0 if SDXL else 5.0, 15.0, 256, 10.0, 0.95, 0.001
# lr near the recipes' (diffusers 1e-6, the LCM paper 8e-6): at 1e-3 AdamW's first, sign-like step turns the
# last-ulp gradient differences of near-zero gradients into visible weight differences
LR, WD, MAX_NORM, BATCH = 1e-5, 1e-2, 1.0, 2
# SDXL: its README's lr, 1e-6. The tiny SDXL UNet's gradients agree to ~1.3e-6 of their scale; at 1e-5
# AdamW's first step (g / (|g| + eps)) turns that on gradients near eps into 1.4e-6 of a weight's scale
if SDXL:
    LR = 1e-6
CASES = [("epsilon", "huber", 1)] if SDXL else [("epsilon", "l2", 20), ("epsilon", "huber", 1), ("v_prediction", "huber", 1)]


# ---- the script's helpers, as written there ----
def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
    assert len(w.shape) == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def append_dims(x, target_dims):
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled_timestep = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return (sample - sigmas * model_output) / alphas
    if prediction_type == "v_prediction":
        return alphas * sample - sigmas * model_output
    return model_output


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alphas * model_output + sigmas * sample
    return (sample - alphas * model_output) / sigmas


class DDIMSolver:
    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        self.ddim_alpha_cumprods = alpha_cumprods[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = np.asarray(
            [alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist()
        )
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods = torch.from_numpy(self.ddim_alpha_cumprods)
        self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        alpha_cumprod_prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, timestep_index, pred_x0.shape)
        dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        return alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt


@torch.no_grad()
def update_ema(target_params, source_params, rate=0.99):
    for targ, src in zip(target_params, source_params):
        targ.detach().mul_(rate).add_(src, alpha=1 - rate)


def run(prediction_type, loss_type, steps):
    noise_scheduler = DDPMScheduler.from_pretrained(TEACHER, subfolder="scheduler", prediction_type=prediction_type)
    alpha_schedule = torch.sqrt(noise_scheduler.alphas_cumprod)
    sigma_schedule = torch.sqrt(1 - noise_scheduler.alphas_cumprod)
    solver = DDIMSolver(noise_scheduler.alphas_cumprod.numpy(), timesteps=noise_scheduler.config.num_train_timesteps,
                        ddim_timesteps=N_DDIM)
    assert solver.ddim_alpha_cumprods_prev.dtype == torch.float64
    teacher_unet = UNet2DConditionModel.from_pretrained(TEACHER, subfolder="unet")
    teacher_unet.requires_grad_(False)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=COND_DIM)
    unet.load_state_dict(teacher_unet.state_dict(), strict=False)
    unet.train()
    target_unet = UNet2DConditionModel.from_config(unet.config)
    target_unet.load_state_dict(unet.state_dict())
    target_unet.train()
    target_unet.requires_grad_(False)
    # the fused kernel sdkd's AdamW reproduces (the script's default single-tensor AdamW agrees to an ulp)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=WD, eps=1e-8, fused=True)

    out = {f"init.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    h, w_ = teacher_unet.config.sample_size, teacher_unet.config.sample_size
    dim = teacher_unet.config.cross_attention_dim
    uncond_prompt_embeds = torch.randn(1, 77, dim, generator=gen)
    keys = ["latents", "context", "index", "noise", "w"] + (["pooled", "time_ids"] if SDXL else [])
    inputs = {k: [] for k in keys}
    if SDXL:  # the script's zeros, batch-sized
        pooled_dim = teacher_unet.config.projection_class_embeddings_input_dim - 6 * teacher_unet.config.addition_time_embed_dim
        uncond_prompt_embeds = torch.zeros(BATCH, 77, dim)
        uncond_pooled_prompt_embeds = torch.zeros(BATCH, pooled_dim)
    losses = []
    for step in range(steps):
        latents = torch.randn(BATCH, 4, h, w_, generator=gen)
        prompt_embeds = torch.randn(BATCH, 77, dim, generator=gen)
        bsz = latents.shape[0]
        encoded_text, uncond_added_conditions = {}, {}
        if SDXL:  # original size (h, w), crop (top, left), target size (h, w): other per sample
            pooled = torch.randn(BATCH, pooled_dim, generator=gen)
            time_ids = torch.tensor([[32.0, 24.0, 0.0, 4.0, 16.0, 16.0], [16.0, 20.0, 2.0, 0.0, 16.0, 16.0]])
            encoded_text = {"text_embeds": pooled, "time_ids": time_ids}
            uncond_added_conditions = copy.deepcopy(encoded_text)
            uncond_added_conditions["text_embeds"] = uncond_pooled_prompt_embeds
        topk = noise_scheduler.config.num_train_timesteps // N_DDIM
        # the first step covers both ends of the grid: index 0 (t_n = 0, target = x_prev) and 49
        index = torch.tensor([0, N_DDIM - 1]) if step == 0 else torch.randint(0, N_DDIM, (bsz,), generator=gen)
        start_timesteps = solver.ddim_timesteps[index]
        timesteps = start_timesteps - topk
        timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
        c_skip_start, c_out_start = scalings_for_boundary_conditions(start_timesteps, timestep_scaling=SCALING)
        c_skip_start, c_out_start = [append_dims(x, latents.ndim) for x in [c_skip_start, c_out_start]]
        c_skip, c_out = scalings_for_boundary_conditions(timesteps, timestep_scaling=SCALING)
        c_skip, c_out = [append_dims(x, latents.ndim) for x in [c_skip, c_out]]
        noise = torch.randn(latents.shape, generator=gen)
        noisy_model_input = noise_scheduler.add_noise(latents, noise, start_timesteps)
        w = (W_MAX - W_MIN) * torch.rand((bsz,), generator=gen) + W_MIN
        for k, v in [("latents", latents), ("context", prompt_embeds), ("index", index), ("noise", noise), ("w", w)] + list(encoded_text.items()):
            inputs["pooled" if k == "text_embeds" else k].append(v)
        w_embedding = guidance_scale_embedding(w, embedding_dim=COND_DIM)
        w = w.reshape(bsz, 1, 1, 1).to(dtype=latents.dtype)
        w_embedding = w_embedding.to(dtype=latents.dtype)

        noise_pred = unet(noisy_model_input, start_timesteps, timestep_cond=w_embedding,
                          encoder_hidden_states=prompt_embeds.float(), added_cond_kwargs=encoded_text).sample
        pred_x_0 = get_predicted_original_sample(noise_pred, start_timesteps, noisy_model_input, prediction_type,
                                                 alpha_schedule, sigma_schedule)
        model_pred = c_skip_start * noisy_model_input + c_out_start * pred_x_0

        with torch.no_grad():  # autocast OFF
            cond_teacher_output = teacher_unet(noisy_model_input, start_timesteps,
                                               encoder_hidden_states=prompt_embeds, added_cond_kwargs=encoded_text).sample
            cond_pred_x0 = get_predicted_original_sample(cond_teacher_output, start_timesteps, noisy_model_input,
                                                         prediction_type, alpha_schedule, sigma_schedule)
            cond_pred_noise = get_predicted_noise(cond_teacher_output, start_timesteps, noisy_model_input,
                                                  prediction_type, alpha_schedule, sigma_schedule)
            uncond = uncond_prompt_embeds if SDXL else uncond_prompt_embeds.repeat(bsz, 1, 1)
            uncond_teacher_output = teacher_unet(noisy_model_input, start_timesteps, encoder_hidden_states=uncond,
                                                 added_cond_kwargs=uncond_added_conditions).sample
            uncond_pred_x0 = get_predicted_original_sample(uncond_teacher_output, start_timesteps, noisy_model_input,
                                                           prediction_type, alpha_schedule, sigma_schedule)
            uncond_pred_noise = get_predicted_noise(uncond_teacher_output, start_timesteps, noisy_model_input,
                                                    prediction_type, alpha_schedule, sigma_schedule)
            pred_x0 = cond_pred_x0 + w * (cond_pred_x0 - uncond_pred_x0)
            pred_noise = cond_pred_noise + w * (cond_pred_noise - uncond_pred_noise)
            x_prev = solver.ddim_step(pred_x0, pred_noise, index)
            assert x_prev.dtype == torch.float64

        with torch.no_grad():
            target_noise_pred = target_unet(x_prev.float(), timesteps, timestep_cond=w_embedding,
                                            encoder_hidden_states=prompt_embeds.float(), added_cond_kwargs=encoded_text).sample
            pred_x_0 = get_predicted_original_sample(target_noise_pred, timesteps, x_prev, prediction_type,
                                                     alpha_schedule, sigma_schedule)
            target = c_skip * x_prev + c_out * pred_x_0

        if loss_type == "l2":
            loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        else:
            loss = torch.mean(torch.sqrt((model_pred.float() - target.float()) ** 2 + HUBER_C**2) - HUBER_C)
        loss.backward()
        if step == 0:
            out.update({f"grad.{n}": p.grad.detach().clone() for n, p in unet.named_parameters()})
        torch.nn.utils.clip_grad_norm_(unet.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(target_unet.parameters(), unet.parameters(), EMA)
        losses.append(loss.detach())
        if step == 0 or step == steps - 1:
            tag = "step1" if step == 0 else "last"
            out.update({f"{tag}.student.{n}": p.detach().clone() for n, p in unet.named_parameters()})
            out.update({f"{tag}.target.{n}": p.detach().clone() for n, p in target_unet.named_parameters()})
    if not SDXL:
        out["uncond"] = uncond_prompt_embeds
    out.update({k: torch.stack(v) for k, v in inputs.items()})
    out["loss"] = torch.stack(losses)
    name = ("sdxl_" if SDXL else "") + f"{prediction_type}_{loss_type}"
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{name}.safetensors"))
    print(name, [round(float(l), 6) for l in losses])


for case in CASES:
    run(*case)
