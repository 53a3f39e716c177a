"""The PyTorch eager reference of sdkd's benchmarks: the anchors' distillation step (diffusers
UNets, forward hooks for the block features as BK-SDM and Segmind do, the same three losses,
clip_grad_norm_, torch.optim.AdamW) and the denoising step of inference (CFG batch 2).

usage: bench_reference.py --teacher CONFIG.json [--student CONFIG.json --pairs PAIRS.json]
         --batch-size B --latent-size L --steps N [--warmup W] [--mode train|infer]
Prints {"steps_per_s", "step_ms_median", "peak_mem_mb"} as JSON. Weights are random: speed does
not depend on their values.
"""
import argparse, json, resource, statistics, time
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel, DDPMScheduler

p = argparse.ArgumentParser()
p.add_argument("--teacher", required=True)
p.add_argument("--student")
p.add_argument("--pairs")
p.add_argument("--batch-size", type=int, default=1)
p.add_argument("--latent-size", type=int, default=64)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--mode", default="train", choices=["train", "infer"])
a = p.parse_args()
torch.manual_seed(0)


def build(path):
    return UNet2DConditionModel.from_config(json.load(open(path)))


teacher = build(a.teacher).eval().requires_grad_(False)
ctx_dim = teacher.config.cross_attention_dim
times = []

if a.mode == "infer":
    # one denoising step with classifier-free guidance: batch 2 (uncond, cond)
    lat = torch.randn(1, 4, a.latent_size, a.latent_size)
    ctx = torch.randn(2, 77, ctx_dim)
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            t0 = time.perf_counter()
            eps = teacher(torch.cat([lat, lat]), torch.tensor(500), encoder_hidden_states=ctx).sample
            u, c = eps.chunk(2)
            _ = u + 7.5 * (c - u)
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
else:
    student = build(a.student).train()
    pairs = json.load(open(a.pairs)) if a.pairs else []
    feats = {"teacher": {}, "student": {}}

    def hook(side, name):
        def f(_m, _i, out):
            feats[side][name] = out[0] if isinstance(out, tuple) else out
        return f

    for side, model, idx in (("teacher", teacher, 0), ("student", student, 1)):
        modules = dict(model.named_modules())
        for pair in pairs:
            modules[pair[idx] if isinstance(pair, list) else pair[side]].register_forward_hook(hook(side, pair[idx] if isinstance(pair, list) else pair[side]))
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    B, L = a.batch_size, a.latent_size
    for i in range(a.warmup + a.steps):
        latents = torch.randn(B, 4, L, L)
        ctx = torch.randn(B, 77, ctx_dim)
        t0 = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (B,))
        noisy = sched.add_noise(latents, noise, t)
        with torch.no_grad():
            t_out = teacher(noisy, t, encoder_hidden_states=ctx).sample
        s_out = student(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(s_out.float(), noise.float()) + F.mse_loss(s_out.float(), t_out.float())
        for pair in pairs:
            tn, sn = (pair[0], pair[1]) if isinstance(pair, list) else (pair["teacher"], pair["student"])
            loss = loss + F.mse_loss(feats["student"][sn].float(), feats["teacher"][tn].float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)

med = statistics.median(times)
print(json.dumps({"steps_per_s": 1.0 / med, "step_ms_median": med * 1000.0,
                  "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "threads": torch.get_num_threads()}))
