"""The PyTorch eager reference of `sdkd bench`: the distillation step of BK-SDM's training script (diffusers UNets,
forward hooks for the block features as BK-SDM and Segmind do, the same three losses,
clip_grad_norm_, torch.optim.AdamW with PyTorch's defaults) and the denoising step of inference
(one UNet forward on the CFG batch and the guidance combination). An SDXL config
(`addition_embed_type: text_time`) gets random pooled embeddings and square time ids in infer
mode, as `sdkd bench` gives its UNets.

usage: bench_reference.py --teacher CONFIG.json [--student CONFIG.json] [--pairs PAIRS.json]
         --batch-size B --latent-size L --steps N [--warmup W] [--mode train|infer]
         [--threads T] [--device cpu|cuda] [--precision fp32|bf16]
PAIRS.json is a list of [teacher feature, student feature] module names (what `sdkd bench
--json` reports as student.feature_pairs). In infer mode the student's config, when given, is
the UNet timed; else the teacher's. Prints one JSON object with steps_per_s, step_ms_median,
step_cpu_ms_median (process CPU time, all threads) and peak_mem_mb (peak RSS, including the
Python interpreter) and on CUDA gpu_peak_allocated_mb / gpu_peak_reserved_mb (the caching
allocator's peaks). --precision bf16 does what BK-SDM's and diffusers' training scripts do under accelerate's mixed precision: the frozen
teacher (infer: the UNet) cast to bf16, the fp32 student under torch.autocast. Weights are
random: speed does not depend on their values. The timed region matches sdkd's: inputs are drawn before the clock
starts; a step ends after zero_grad (train) or the guidance combination (infer).

--check-loss DIR (train mode, fp32, no timing): the teacher's and student's weights from
DIR/teacher.safetensors and DIR/student.safetensors, latents, context, noise and timesteps from
DIR/inputs.safetensors; prints the step's loss terms as JSON (tests/bench.rs compares them with
sdkd's step on the same weights and inputs).
"""
import argparse, json, os, resource, statistics, time
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
p.add_argument("--threads", type=int)
p.add_argument("--device", default="cpu")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
p.add_argument("--check-loss")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)
dev = torch.device(a.device)
dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32


def build(path):
    with open(path) as f:
        config = json.load(f)
    with dev:  # initialised where it runs: a CPU init of SD-1.5 would dominate a GPU run
        return UNet2DConditionModel.from_config(config)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def added(unet, rows):
    """SDXL (`addition_embed_type: text_time`): random pooled embeddings and the time ids of an
    uncropped square image, as `sdkd bench` gives its UNets; None for SD-1.x/2.x."""
    c = unet.config
    if c.addition_embed_type != "text_time":
        return None
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    px = float(L * 8)
    ids = torch.tensor([px, px, 0.0, 0.0, px, px], device=dev, dtype=dtype).repeat(rows, 1)
    return {"text_embeds": torch.randn(rows, pooled, device=dev, dtype=dtype), "time_ids": ids}


B, L = a.batch_size, a.latent_size
times, cpu_times = [], []  # wall and process CPU time (all threads) per timed step
info = {}

if a.mode == "infer":
    unet = build(a.student or a.teacher).eval().requires_grad_(False).to(dtype)
    info["params"] = sum(p.numel() for p in unet.parameters())
    lat = torch.randn(B, unet.config.in_channels, L, L, device=dev, dtype=dtype)
    ctx = torch.randn(2 * B, 77, unet.config.cross_attention_dim, device=dev, dtype=dtype)
    t = torch.tensor(500, device=dev)
    cond = added(unet, 2 * B)
    with torch.no_grad():
        for i in range(a.warmup + a.steps):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample
            u, c = eps.chunk(2)
            _ = u + 7.5 * (c - u)
            sync()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
else:
    teacher = build(a.teacher).eval().requires_grad_(False).to(dtype)
    student = build(a.student).train()
    info["params"] = sum(p.numel() for p in student.parameters())
    pairs = []
    if a.pairs:
        with open(a.pairs) as f:
            pairs = [tuple(x) for x in json.load(f)]
    feats = {"teacher": {}, "student": {}}

    def hook(side, name):
        def f(_m, _i, out):
            # a down block returns (hidden, skip states): BK-SDM distils the hidden state
            feats[side][name] = out[0] if isinstance(out, tuple) else out
        return f

    for side, model, idx in (("teacher", teacher, 0), ("student", student, 1)):
        modules = dict(model.named_modules())
        for pair in pairs:
            modules[pair[idx]].register_forward_hook(hook(side, pair[idx]))
    opt = torch.optim.AdamW(student.parameters(), lr=5e-5, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

    def step_loss(latents, ctx, noise, t):
        """BK-SDM's loss: task (epsilon) + output KD + the summed feature KD MSEs."""
        noisy = sched.add_noise(latents, noise, t)
        with torch.no_grad():
            t_out = teacher(noisy.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            s_out = student(noisy, t, encoder_hidden_states=ctx).sample
        task, out_kd = F.mse_loss(s_out.float(), noise.float()), F.mse_loss(s_out.float(), t_out.float())
        feat_kd = sum(F.mse_loss(feats["student"][sn].float(), feats["teacher"][tn].float()) for tn, sn in pairs)
        return task + out_kd + feat_kd, (task, out_kd, feat_kd)

    if a.check_loss:
        from safetensors.torch import load_file
        teacher.load_state_dict(load_file(os.path.join(a.check_loss, "teacher.safetensors")), strict=True)
        student.load_state_dict(load_file(os.path.join(a.check_loss, "student.safetensors")), strict=True)
        x = load_file(os.path.join(a.check_loss, "inputs.safetensors"))
        total, (task, out_kd, feat_kd) = step_loss(x["latents"], x["context"], x["noise"], x["timesteps"])
        print(json.dumps({"total": total.item(), "task": task.item(), "output_kd": out_kd.item(), "feature_kd": float(feat_kd)}))
        raise SystemExit(0)
    ctx_dim = teacher.config.cross_attention_dim
    data = [(torch.randn(B, teacher.config.in_channels, L, L, device=dev), torch.randn(B, 77, ctx_dim, device=dev))
            for _ in range(a.warmup + a.steps)]
    for i, (latents, ctx) in enumerate(data):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (B,), device=dev)
        loss, _ = step_loss(latents, ctx, noise, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss).item(), "the loss is not finite"  # sdkd reads its loss too
        sync()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    info["adamw"] = "foreach" if opt.defaults.get("foreach") else ("fused" if opt.defaults.get("fused") else "default (single-tensor on CPU)")

med = statistics.median(times)
if dev.type == "cuda":
    info["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    info["gpu_peak_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
print(json.dumps({"steps_per_s": 1.0 / med, "step_ms_median": med * 1000.0, "step_ms_min": min(times) * 1000.0,
                  "step_ms": [x * 1000.0 for x in times],
                  "step_cpu_ms_median": statistics.median(cpu_times) * 1000.0,
                  "step_cpu_ms": [x * 1000.0 for x in cpu_times],
                  "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                  "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"), "torch": torch.__version__, "precision": a.precision, **info}))
