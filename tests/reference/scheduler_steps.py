"""diffusers' schedulers run step by step on fixed model-output sequences, for sdkd's parity tests.

usage: scheduler_steps.py OUT_DIR

Writes
- OUT_DIR/cases.json: one entry per case: name, kind (sdkd's name), config (the dict handed to
  `Class.from_config`, also what sdkd parses), steps, custom (null, or the list given to
  `set_timesteps(timesteps=...)`), seed (null, or the generator seed of a seeded run), timesteps,
  init_noise_sigma.
- OUT_DIR/steps.safetensors: per case NAME: NAME/init (the starting sample), NAME/model_outputs
  (steps, 2, 4, 8, 8), NAME/scaled (every step's scale_model_input), NAME/samples (every step's
  prev_sample). Unseeded runs start from seeded random noise times init_noise_sigma; seeded runs
  draw the latents and all step noise from one torch.Generator("cpu").manual_seed(seed), in the
  order the Stable Diffusion pipelines do.
- OUT_DIR/schedules.json + schedule.safetensors: betas, alphas_cumprod (DDPMScheduler) and the
  ascending sigmas (EulerDiscreteScheduler) of several configs; add_noise / get_velocity of
  DDPMScheduler on per-sample timesteps.
- OUT_DIR/sweep.json: timesteps, sigmas and init_noise_sigma of set_timesteps(n) for every
  scheduler, spacing, steps_offset and Karras setting over many n; "error": true where diffusers
  would index past the schedule, or (LCMScheduler, over several original_inference_steps) refuses n.
"""
import json
import os
import sys

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, LCMScheduler, PNDMScheduler, UniPCMultistepScheduler)
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

out_dir = sys.argv[1]
os.makedirs(out_dir, exist_ok=True)
root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(root, "configs/reference/sd15_scheduler_config.json")) as f:
    SD15 = json.load(f)  # PNDMScheduler, scaled_linear, steps_offset 1, no timestep_spacing key

KINDS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "pndm": PNDMScheduler,
    "lcm": LCMScheduler,
}
# the samplers whose steps draw noise from the pipeline's generator
NOISY = ("ddpm", "euler_a", "lcm")
SHAPE = (2, 4, 8, 8)

# A config that only names a class and leaves every key missing gets the target's defaults, also
# through a loaded scheduler's config (diffusers drops the keys it filled with defaults): sdkd
# relies on this, so check it here.
for cls in KINDS.values():
    a = cls.from_config(SD15)
    b = cls.from_config(PNDMScheduler.from_config(SD15).config)
    a.set_timesteps(20)
    b.set_timesteps(20)
    assert torch.equal(a.timesteps, b.timesteps), cls.__name__

cases = []


def case(name, kind, config, steps, seed=None, scale=1.0, custom=None):
    """`custom`: a timestep list for set_timesteps(timesteps=...) instead of the step count."""
    if seed is None and kind in NOISY:
        seed = 100 + len(cases)  # they draw step noise: always from a seeded generator
    cases.append(dict(name=name, kind=kind, config=config, steps=steps, seed=seed, scale=scale, custom=custom))


def sd(**kw):
    return dict(SD15, **kw)


for kind in KINDS:
    for pred in ["epsilon", "v_prediction"]:
        for spacing in ["leading", "linspace", "trailing"]:
            for steps in [10, 25]:
                case(f"{kind}-{pred}-{spacing}-{steps}", kind, sd(prediction_type=pred, timestep_spacing=spacing), steps)
    # the file as it is: each class's own default spacing
    case(f"{kind}-sd15-20", kind, sd(), 20)
    # diffusers' constructor defaults (linear betas, no offset)
    case(f"{kind}-defaults-12", kind, {"_class_name": KINDS[kind].__name__}, 12)
    # cosine betas
    case(f"{kind}-cosine-15", kind, {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}, 15)

for pred in ["epsilon", "v_prediction"]:
    for spacing in ["leading", "linspace", "trailing"]:
        for steps in [10, 25]:
            case(f"dpmpp_2m-karras-{pred}-{spacing}-{steps}", "dpmpp_2m",
                 sd(prediction_type=pred, timestep_spacing=spacing, use_karras_sigmas=True), steps)
for steps in [10, 25]:
    case(f"euler-karras-{steps}", "euler", sd(use_karras_sigmas=True), steps)
    case(f"unipc-karras-{steps}", "unipc", sd(use_karras_sigmas=True), steps)
    for kind in ["euler", "dpmpp_2m", "unipc"]:
        case(f"{kind}-sigma_min-{steps}", kind, sd(final_sigmas_type="sigma_min"), steps)
    case(f"unipc-karras-sigma_min-{steps}", "unipc", sd(use_karras_sigmas=True, final_sigmas_type="sigma_min"), steps)
case("dpmpp_2m-karras-cosine-12", "dpmpp_2m", {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, 12)
case("dpmpp_2m-karras-range-12", "dpmpp_2m", sd(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), 12)
case("dpmpp_2m-order3-20", "dpmpp_2m", sd(solver_order=3), 20)
case("dpmpp_2m-order3-12", "dpmpp_2m", sd(solver_order=3), 12)
case("dpmpp_2m-order1-10", "dpmpp_2m", sd(solver_order=1), 10)
case("dpmpp_2m-heun-20", "dpmpp_2m", sd(solver_type="heun"), 20)
case("dpmpp_2m-sample-10", "dpmpp_2m", sd(prediction_type="sample"), 10)
case("dpmpp_2m-euler_at_final-20", "dpmpp_2m", sd(euler_at_final=True, final_sigmas_type="sigma_min"), 20)
case("dpmpp_2m-no_lower_order_final-12", "dpmpp_2m", sd(lower_order_final=False, final_sigmas_type="sigma_min"), 12)
case("unipc-order3-20", "unipc", sd(solver_order=3), 20)
case("unipc-order1-10", "unipc", sd(solver_order=1), 10)
case("unipc-bh1-20", "unipc", sd(solver_type="bh1"), 20)  # diffusers ends in NaN (B(h) = h = -inf): kept
case("unipc-bh1-sigma_min-20", "unipc", sd(solver_type="bh1", final_sigmas_type="sigma_min"), 20)
case("unipc-predict_eps-20", "unipc", sd(predict_x0=False, final_sigmas_type="sigma_min"), 20)
case("unipc-predict_eps-v-20", "unipc", sd(predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"), 20)
case("unipc-disable_corrector-12", "unipc", sd(disable_corrector=[0, 3]), 12)
case("unipc-sample-10", "unipc", sd(prediction_type="sample"), 10)
case("unipc-no_lower_order_final-sigma_min-12", "unipc", sd(lower_order_final=False, final_sigmas_type="sigma_min"), 12)
# PNDM without skip_prk_steps (diffusers' default): the Runge-Kutta warm-up, then 4th-order PLMS
for pred in ["epsilon", "v_prediction"]:
    for steps in [4, 10, 25]:
        case(f"pndm-prk-{pred}-{steps}", "pndm", sd(skip_prk_steps=False, prediction_type=pred), steps)
case("pndm-prk-linspace-12", "pndm", sd(skip_prk_steps=False, timestep_spacing="linspace"), 12)
for steps in [1, 2, 3]:
    case(f"pndm-short-{steps}", "pndm", sd(), steps)
case("pndm-alpha_one-10", "pndm", sd(set_alpha_to_one=True), 10)
case("pndm-seeded-25", "pndm", sd(), 25, seed=1234)  # BK-SDM's protocol: 25 steps, seed 1234
case("ddim-alpha_one-10", "ddim", sd(set_alpha_to_one=True), 10)
case("ddim-clip-10", "ddim", sd(clip_sample=True), 10, scale=3.0)
case("ddim-sample-10", "ddim", sd(prediction_type="sample"), 10)
case("ddpm-clip-10", "ddpm", sd(clip_sample=True), 10, scale=3.0)
case("ddpm-fixed_large-10", "ddpm", sd(variance_type="fixed_large"), 10, seed=7)
case("ddpm-fixed_small_log-10", "ddpm", sd(variance_type="fixed_small_log"), 10, seed=8)
case("ddpm-sample-10", "ddpm", sd(prediction_type="sample"), 10, seed=9)
case("euler-sample-10", "euler", sd(prediction_type="sample"), 10)
# LCM: the step counts LCM students run at, a custom list (on and off the distillation grid),
# every prediction type, clipping, another grid and boundary scaling
for steps in [1, 2, 3, 4, 8, 50]:
    case(f"lcm-sd15-{steps}", "lcm", sd(), steps)
case("lcm-custom-999-499", "lcm", sd(), 2, custom=[999, 499])
case("lcm-custom-offgrid", "lcm", sd(), 3, custom=[980, 700, 33])
case("lcm-sample-4", "lcm", sd(prediction_type="sample"), 4)
case("lcm-clip-4", "lcm", sd(clip_sample=True), 4, scale=3.0)
case("lcm-original20-scaling2.5-6", "lcm", sd(original_inference_steps=20, timestep_scaling=2.5), 6)
for kind in ["ddim", "euler", "euler_a", "dpmpp_2m", "unipc", "lcm"]:
    # zero terminal SNR, as the paper recommends: v-prediction, trailing spacing
    case(f"{kind}-zero_snr-10", kind, sd(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                         timestep_spacing="trailing"), 10, seed=11 if kind in NOISY else None)
# seeded runs: latents and step noise from one CPU generator (the pipelines' order)
case("ddpm-seeded-leading-10", "ddpm", sd(), 10, seed=1234)  # last timestep 1: noise on every step
case("ddpm-seeded-linspace-10", "ddpm", sd(timestep_spacing="linspace"), 10, seed=2313248373)  # last t = 0: none
case("euler_a-seeded-20", "euler_a", sd(), 20, seed=42)
case("euler_a-seeded-v-leading-10", "euler_a", sd(prediction_type="v_prediction", timestep_spacing="leading"), 10,
     seed=5)
case("ddim-seeded-20", "ddim", sd(), 20, seed=3)  # deterministic, but the latents come from the seed too

names = [c["name"] for c in cases]
assert len(names) == len(set(names)), "duplicate case names"
tensors = {}
for idx, c in enumerate(cases):
    sched = KINDS[c["kind"]].from_config(c["config"])
    if c["custom"] is not None:
        sched.set_timesteps(timesteps=c["custom"])
    else:
        sched.set_timesteps(c["steps"])
    if hasattr(sched, "set_begin_index"):
        # keyed by index like sdkd: diffusers' look-up by timestep value breaks on repeated
        # timesteps (Karras sigmas on the cosine schedule); otherwise this changes nothing
        sched.set_begin_index(0)
    n = len(sched.timesteps)
    torch.manual_seed(1000 + idx)
    outs = torch.randn((n,) + SHAPE) * c["scale"]
    ins = float(sched.init_noise_sigma)
    if c["seed"] is not None:
        g = torch.Generator("cpu").manual_seed(c["seed"])
        sample = randn_tensor(SHAPE, generator=g, device=torch.device("cpu"), dtype=torch.float32)
        sample = sample * sched.init_noise_sigma
    else:
        g = None
        sample = torch.randn(SHAPE) * sched.init_noise_sigma
    init = sample.clone()
    scaled, samples = [], []
    for i, t in enumerate(sched.timesteps):
        scaled.append(sched.scale_model_input(sample, t))
        kwargs = {"generator": g} if c["kind"] in NOISY else {}
        sample = sched.step(outs[i], t, sample, **kwargs).prev_sample
        samples.append(sample)
    p = c["name"]
    tensors[f"{p}/init"] = init
    tensors[f"{p}/model_outputs"] = outs
    tensors[f"{p}/scaled"] = torch.stack(scaled)
    tensors[f"{p}/samples"] = torch.stack(samples)
    c["timesteps"] = [float(t) for t in sched.timesteps]
    c["init_noise_sigma"] = ins
save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "steps.safetensors"))
with open(os.path.join(out_dir, "cases.json"), "w") as f:
    json.dump(cases, f)

# --- the noise schedule and the training-side forward process
SCHEDULES = {
    "sd15": SD15,
    "defaults": {},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "zero_snr": sd(rescale_betas_zero_snr=True),
    "trained": {"num_train_timesteps": 50, "trained_betas": [0.0005 + 0.0123 * i / 49 for i in range(50)]},
}
st = {}
for name, cfg in SCHEDULES.items():
    ddpm = DDPMScheduler.from_config(cfg)
    st[f"{name}/betas"] = ddpm.betas
    st[f"{name}/alphas_cumprod"] = ddpm.alphas_cumprod
    euler = EulerDiscreteScheduler.from_config(cfg)  # its sigmas before set_timesteps: the whole table
    st[f"{name}/sigmas"] = euler.sigmas[:-1].flip(0).contiguous()
torch.manual_seed(77)
x0 = torch.randn(4, 4, 8, 8)
noise = torch.randn(4, 4, 8, 8)
ts = torch.tensor([0, 1, 500, 999], dtype=torch.int64)
ddpm = DDPMScheduler.from_config(SD15)
st["train/x0"], st["train/noise"], st["train/timesteps"] = x0, noise, ts
st["train/noisy"] = ddpm.add_noise(x0, noise, ts)
st["train/velocity"] = ddpm.get_velocity(x0, noise, ts)
save_file(st, os.path.join(out_dir, "schedule.safetensors"))
with open(os.path.join(out_dir, "schedules.json"), "w") as f:
    json.dump(SCHEDULES, f)

# --- set_timesteps over many step counts
NS = list(range(1, 31)) + [37, 50, 64, 99, 100]
NS_LONG = NS + [128, 250, 333, 500, 999, 1000]
sweep = []
for kind, cls in KINDS.items():
    if kind == "lcm":
        continue  # spacing and offset do not apply: its own sweep below
    for spacing in ["leading", "linspace", "trailing"]:
        for offset in [0, 1]:
            for karras in [False, True] if kind in ("euler", "dpmpp_2m", "unipc") else [False]:
                cfg = sd(timestep_spacing=spacing, steps_offset=offset)
                if karras:
                    cfg["use_karras_sigmas"] = True
                sched = cls.from_config(cfg)
                for n in NS if karras else NS_LONG:
                    sched.set_timesteps(n)
                    ts = [float(t) for t in sched.timesteps]
                    entry = dict(kind=kind, config=cfg, steps=n, timesteps=ts,
                                 init_noise_sigma=float(sched.init_noise_sigma))
                    if hasattr(sched, "sigmas") and kind not in ("ddpm", "ddim", "pndm"):
                        entry["sigmas"] = [float(s) for s in sched.sigmas]
                    # DDPM/DDIM/PNDM index alphas_cumprod by timestep: past the end they fail in step()
                    entry["error"] = kind in ("ddpm", "ddim", "pndm") and (max(ts) >= 1000 or min(ts) < 0)
                    sweep.append(entry)
# LCM: set_timesteps(n) on several distillation grids; "error": true where diffusers refuses n
for original in [50, 4, 7, 1000]:
    cfg = sd(original_inference_steps=original)
    sched = LCMScheduler.from_config(cfg)
    for n in NS_LONG:
        entry = dict(kind="lcm", config=cfg, steps=n, init_noise_sigma=1.0)
        try:
            sched.set_timesteps(n)
            entry.update(timesteps=[float(t) for t in sched.timesteps], error=False)
        except ValueError:
            entry.update(timesteps=[], error=True)
        sweep.append(entry)
with open(os.path.join(out_dir, "sweep.json"), "w") as f:
    json.dump(sweep, f)
print(f"{len(cases)} cases, {len(sweep)} sweep entries")
