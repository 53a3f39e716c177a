"""Reference for sdkd's AdamW, clip_grad_norm and LR schedules (tests/trainkit.rs).

torch.optim.AdamW (default single-tensor path, plus the foreach and fused variants), clip_grad_norm_
and diffusers' get_scheduler run on small random tensors with random gradients for a few hundred
steps; every input and output is saved so the Rust side replays exactly the same steps.
Usage: trainkit_optim.py <out dir>
"""
import json
import struct
import sys

import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(0)
STEPS, MAX_NORM, WARMUP = 300, 1.0, 10
BETAS, EPS, WD = (0.9, 0.999), 1e-8, 0.01
shapes = {"a.weight": (7, 5), "a.bias": (13,), "b.conv": (3, 4, 2), "c.scale": (1,), "unused": (4,)}
init = {n: torch.randn(s) for n, s in shapes.items()}
gen = torch.Generator().manual_seed(1)
# Gradient scale varies by ~30x around max_norm so some steps clip and some do not.
grads = {n: torch.empty((STEPS,) + s) for n, s in shapes.items() if n != "unused"}
for t in range(STEPS):
    scale = float(torch.exp(torch.empty(()).uniform_(-4.0, 0.0, generator=gen)))
    for n in grads:
        grads[n][t] = torch.randn(shapes[n], generator=gen) * scale


def run(**variant):
    params = {n: init[n].clone().requires_grad_(True) for n in shapes}
    opt = torch.optim.AdamW(list(params.values()), lr=3e-2, betas=BETAS, eps=EPS, weight_decay=WD, **variant)
    sched = get_scheduler("linear", opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    norms, lrs = [], []
    ema = {n: init[n].double().clone() for n in shapes}
    for t in range(STEPS):
        for n, p in params.items():
            p.grad = grads[n][t].clone() if n in grads else None
        norms.append(torch.nn.utils.clip_grad_norm_([p for p in params.values() if p.grad is not None], MAX_NORM))
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        with torch.no_grad():
            for n, p in params.items():
                ema[n] = 0.99 * ema[n] + 0.01 * p.double()
    state = {}
    for n, p in params.items():
        st = opt.state.get(p, {})
        if st:
            state[f"exp_avg.{n}"] = st["exp_avg"]
            state[f"exp_avg_sq.{n}"] = st["exp_avg_sq"]
            state[f"step.{n}"] = torch.tensor(int(st["step"]), dtype=torch.int64)
    return params, state, torch.stack(norms), torch.tensor(lrs, dtype=torch.float64), ema


tensors = {}
for n in shapes:
    tensors[f"init.{n}"] = init[n]
for n, g in grads.items():
    tensors[f"grad.{n}"] = g
for tag, variant in [("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
    params, state, norms, lrs, ema = run(**variant)
    for n, p in params.items():
        tensors[f"{tag}.final.{n}"] = p.detach()
    if tag == "default":
        tensors.update({f"state.{k}": v for k, v in state.items()})
        tensors["norms"] = norms
        tensors["lrs"] = lrs
        tensors.update({f"ema.{n}": e for n, e in ema.items()})
    if tag == "fused":
        # sdkd runs the same fused kernel: its moments must be bit-identical to these
        tensors.update({f"fused_state.{k}": v for k, v in state.items()})
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out}/adamw.safetensors")

# LR schedules as diffusers computes them, a few steps past the end.
schedules = []
for name, warmup, total in [
    ("constant", 0, 60), ("constant_with_warmup", 10, 60), ("cosine", 0, 50), ("cosine", 10, 100),
    ("cosine", 7, 40), ("linear", 0, 50), ("linear", 10, 100), ("linear", 3, 3),
]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=5e-5)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _ in range(total + 10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    bits = [struct.unpack("<Q", struct.pack("<d", x))[0] for x in lrs]
    schedules.append({"name": name, "warmup": warmup, "total": total, "lr": 5e-5, "lr_bits": bits})
with open(f"{out}/schedules.json", "w") as f:
    json.dump(schedules, f)
