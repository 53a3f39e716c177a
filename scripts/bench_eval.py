"""Generation speed of `sdkd eval --model` against BK-SDM's loop in diffusers (docs/benchmarks.md,
"Evaluation"): `StableDiffusionPipeline` at batch size 1, one CPU generator drawn consecutively,
PNDM, guidance 7.5, each image saved as PNG, on the same pipeline, prompts, steps and threads;
sdkd at batch 1 and at batch --batch. `--scheduler lcm --guidance 6` is the LCM row (an LCM
student's pipeline: diffusers' `LCMScheduler`, guidance embedded; sdkd seeds per image, as it
must for a sampler that draws step noise).

usage: bench_eval.py --model PIPELINE_DIR [--count 10] [--steps 10] [--size 64] [--batch 8]
                     [--rounds 3] [--threads N] [--scheduler pndm|lcm] [--guidance 7.5]
                     [--sdkd target/release/sdkd] [--json OUT]

Each round runs the three in turn (A/B/C, so all see the same load on a shared machine), each in
a fresh process. sdkd's time is its report's `seconds_per_image` (prompt encoding, denoising,
decoding and writing the PNGs, without loading or scoring); diffusers' is timed over the same
part of its loop (after `from_pretrained`). Prints per-round images/s, the medians and the
ratios (above 1: sdkd is faster), and one JSON line.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")

DIFFUSERS = r'''
import json, sys, time, torch
from diffusers import LCMScheduler, PNDMScheduler, StableDiffusionPipeline
model, prompts, out, steps, size, threads = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
scheduler, guidance = {"pndm": PNDMScheduler, "lcm": LCMScheduler}[sys.argv[7]], float(sys.argv[8])
torch.set_num_threads(threads)
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
pipe.set_progress_bar_config(disable=True)
generator = torch.Generator("cpu").manual_seed(1234)
t0 = time.perf_counter()
for k, p in enumerate(prompts):
    pipe(p, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size, generator=generator).images[0].save(f"{out}/{k:06d}.png")
print(json.dumps({"seconds_per_image": (time.perf_counter() - t0) / len(prompts)}))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--count", type=int, default=10)  # at least 10: sdkd eval scores IS (10 splits)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scheduler", choices=["pndm", "lcm"], default="pndm")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--sdkd", default=os.path.join(ROOT, "target", "release", "sdkd"))
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sdkd-bench-eval-")
    prompts = [f"a toy panda number {k}, on a {c} floor" for k, c in zip(range(a.count), ["red", "blue", "green"] * a.count)]
    with open(os.path.join(tmp, "prompts.json"), "w") as f:
        json.dump(prompts, f)
    with open(os.path.join(tmp, "prompts.jsonl"), "w") as f:
        f.writelines(json.dumps({"file_name": f"{k}.png", "text": p}) + "\n" for k, p in enumerate(prompts))
    # sdkd eval scores after generating: a random-weight Inception (never reported; only
    # seconds_per_image, the generation, is read)
    subprocess.run([PYTHON, os.path.join(ROOT, "tests", "reference", "eval_reference.py"), os.path.join(tmp, "net"),
                    "--weights-only"], check=True, capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")

    def sdkd(batch, r):
        out = os.path.join(tmp, f"sdkd-b{batch}-{r}")
        p = subprocess.run([a.sdkd, "eval", "--model", a.model, "--prompts", os.path.join(tmp, "prompts.jsonl"),
                            "--steps", str(a.steps), "--resolution", str(a.size), "--batch-size", str(batch),
                            "--metrics", "is", "--inception", os.path.join(tmp, "net", "inception.pth"),
                            "--scheduler", a.scheduler, "--guidance-scale", str(a.guidance),
                            *(["--seeding", "per-image"] if a.scheduler == "lcm" else []),
                            "--device", "cpu", "--out", out], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"sdkd eval failed:\n{p.stderr[-3000:]}")
        return json.load(open(os.path.join(out, "report.json")))["seconds_per_image"]

    def diffusers(r):
        out = os.path.join(tmp, f"diffusers-{r}")
        os.makedirs(out)
        p = subprocess.run([PYTHON, "-c", DIFFUSERS, a.model, os.path.join(tmp, "prompts.json"), out, str(a.steps),
                            str(a.size), str(a.threads), a.scheduler, str(a.guidance)], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"diffusers failed:\n{p.stderr[-3000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])["seconds_per_image"]

    rows = {"sdkd b1": [], "diffusers b1": [], f"sdkd b{a.batch}": []}
    for r in range(a.rounds):
        rows["sdkd b1"].append(sdkd(1, r))
        rows["diffusers b1"].append(diffusers(r))
        rows[f"sdkd b{a.batch}"].append(sdkd(a.batch, r))
        print(f"round {r}: " + ", ".join(f"{k} {1 / v[-1]:.2f} images/s" for k, v in rows.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{a.count} images, {a.size}x{a.size}, {a.steps} {a.scheduler} steps, guidance {a.guidance}, {a.threads} threads, {a.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:<14} {1 / v:8.3f} images/s  ({v:.3f} s/image, median)")
    ratio1 = med["diffusers b1"] / med["sdkd b1"]
    ratio8 = med["diffusers b1"] / med[f"sdkd b{a.batch}"]
    print(f"  sdkd b1 / diffusers b1: {ratio1:.2f}x   sdkd b{a.batch} / diffusers b1: {ratio8:.2f}x")
    result = {"count": a.count, "size": a.size, "steps": a.steps, "scheduler": a.scheduler, "guidance": a.guidance, "threads": a.threads, "rounds": a.rounds, "batch": a.batch,
              "seconds_per_image": rows, "median": med, "speedup_b1": ratio1, f"speedup_b{a.batch}": ratio8}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
