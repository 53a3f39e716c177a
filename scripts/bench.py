"""`make bench`: sdkd against the PyTorch eager reference (scripts/bench_reference.py), side by
side on the same teacher, student, batch, threads and OpenMP settings.

Each case runs sdkd then the reference, round after round (A/B/A/B...), so both see the same
load on a shared machine, with the same runtime settings (threads, OpenMP wait policy, glibc
malloc settings); a side's number is the median over rounds of each run's median step
time. The speed-up is reference ms / sdkd ms (above 1: sdkd is faster), in wall time and in
process CPU time (user + system over all threads, which does not grow while other processes hold
the cores, so it is the steadier figure on a shared machine). Results go to
docs/benchmarks.md between the `bench:begin`/`bench:end` markers (the rest of the file is
hand-written and kept) and, raw, to target/bench/results.json.

Sections (defaults in brackets; shapes are fixed so numbers compare across runs):
  train   distillation step on CPU, medium SD-shaped teacher (configs/bench/medium_unet_config.json)
          [students bk_small, bk_tiny; batch 2, latent 32, 1 warm-up + 5 timed steps per run]
  infer   one denoising step, SD-1.5 shapes (latent 64, CFG batch 2): teacher and each preset
          [1 warm-up + 1 timed step per run]
  wait    the training step of bk_small again with libgomp's default spin-wait on both sides
          (the main tables use OMP_WAIT_POLICY=PASSIVE on both sides), and sdkd with its own
          choice (a short spin on an idle machine, PASSIVE on a busy one: src/main.rs)
          [1 warm-up + 2 timed steps per run: spinning on a busy machine is very slow]
  own     each side as it runs out of the box: sdkd with its own OpenMP and malloc settings,
          PyTorch with libgomp's default spin and glibc's default malloc; the SD-1.5 teacher's
          inference step and the training step of bk_small [1 warm-up + 2 timed steps per run]
  decode  `cargo bench --bench decode` (images/s of the data loader)
  loader  scripts/bench_loader.py: the loader on webdataset shards of LAION-like JPEGs against
          webdataset + PIL + torch DataLoader, same transforms and worker count
  eval    scripts/bench_eval.py: `sdkd eval --model` generation (batch 1 and 8) against BK-SDM's
          diffusers loop (StableDiffusionPipeline, batch 1, one generator) on the tiny 4-stage test
          pipeline at 64 px [10 images, 10 PNDM steps per run]
  sdxl    one denoising step of an SDXL-shaped UNet (configs/bench/sdxl_shaped_unet_config.json:
          SDXL-base's blocks, transformer depths 1/2/10, mid depth 10, heads 5/10/20 and text_time
          embedding, every width divided by 4: 161M parameters) against diffusers' eager forward
          [latent 64, CFG batch 2, 1 warm-up + 2 timed steps per run]
  lcm     LCM sampling: the same pipeline with its UNet given a guidance embedding as diffusers'
          LCD scripts make an LCM student (tests/reference/lcm_unet.py), `sdkd eval --model
          --scheduler lcm` against diffusers' StableDiffusionPipeline + LCMScheduler at batch 1
          [10 images, 4 LCM steps, guidance 6 embedded]

Environment:
  SDKD_BENCH_QUICK=1          smoke run: tiny shapes, one round, docs/benchmarks.md untouched
  SDKD_BENCH_ROUNDS=N         rounds per case [3]
  SDKD_BENCH_THREADS=N        intra-op threads of both sides [all cores]
  SDKD_BENCH_SECTIONS=a,b     sections to run [train,infer,wait,own,decode,loader,eval,sdxl,lcm]
  SDKD_BENCH_STUDENTS=a,b     students of the train section [bk_small,bk_tiny]
  SDKD_BENCH_NO_DOCS=1        print the tables only
"""
import datetime, json, os, platform, re, statistics, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
SDKD = ROOT / "target" / "release" / "sdkd"
PYTHON = ROOT / ".venv" / "bin" / "python"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin (written by scripts/bench.py) -->", "<!-- bench:end -->"
MEDIUM = "configs/bench/medium_unet_config.json"
SD15 = "configs/reference/sd15_unet_config.json"
SDXL_SHAPED = "configs/bench/sdxl_shaped_unet_config.json"
# libgomp's own default when OMP_WAIT_POLICY is unset is a 300000-iteration spin before
# sleeping; naming it explicitly keeps sdkd from switching itself to PASSIVE (see main.rs).
# "auto" sets neither: sdkd then picks its own setting (src/main.rs), Python keeps libgomp's.
# "own" is "auto" without the equal malloc settings below: each side exactly as it runs by default.
POLICIES = {"passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin": {"GOMP_SPINCOUNT": "300000"}, "auto": {}, "own": {}}
# sdkd keeps freed memory in glibc's heap (mallopt in src/main.rs); the reference gets the same
# malloc settings, so that the runtime settings of both sides are equal and the code differs.
MALLOC = {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=18446744073709551615"}

env = os.environ
QUICK = env.get("SDKD_BENCH_QUICK", "") not in ("", "0")
ROUNDS = int(env.get("SDKD_BENCH_ROUNDS", "1" if QUICK else "3"))
THREADS = int(env.get("SDKD_BENCH_THREADS", str(os.cpu_count() or 1)))
SECTIONS = env.get("SDKD_BENCH_SECTIONS", "train,infer,wait,own,decode,loader,eval,sdxl,lcm").split(",")
STUDENTS = env.get("SDKD_BENCH_STUDENTS", "bk_small,bk_tiny").split(",")
WRITE_DOCS = not QUICK and env.get("SDKD_BENCH_NO_DOCS", "") in ("", "0")
if QUICK:
    TRAIN = dict(teacher=MEDIUM, batch=1, latent=16, warmup=1, steps=2)
    INFER = dict(teacher=MEDIUM, batch=1, latent=16, warmup=1, steps=2, unets=["teacher", "bk_tiny"])
    SDXL = dict(teacher=SDXL_SHAPED, batch=1, latent=16, warmup=1, steps=1)
else:
    TRAIN = dict(teacher=MEDIUM, batch=2, latent=32, warmup=1, steps=5)
    INFER = dict(teacher=SD15, batch=1, latent=64, warmup=1, steps=1, unets=["teacher", "bk_base", "bk_small", "bk_tiny"])
    SDXL = dict(teacher=SDXL_SHAPED, batch=1, latent=64, warmup=1, steps=2)

records = []  # every run, for results.json


def run_json(cmd, policy, label):
    """Runs one benchmark process and returns its JSON line."""
    e = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    e.update(POLICIES[policy])
    if policy != "own":
        e.update(MALLOC)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=e, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        sys.exit(f"bench: {label} failed (exit {p.returncode}):\n{' '.join(map(str, cmd))}\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["_label"], r["_policy"], r["_wall_s"], r["_load"] = label, policy, time.time() - t0, os.getloadavg()[0]
    records.append(r)
    print(f"  {label:<40} {policy:<8} {r['step_ms_median']:10.1f} ms/step  (run {r['_wall_s']:.0f}s, load {r['_load']:.1f})", flush=True)
    return r


def sdkd_cmd(mode, teacher, student, c):
    return [SDKD, "bench", "--json", "--mode", mode, "--device", "cpu", "--threads", THREADS, "--teacher", teacher,
            "--student", student, "--batch-size", c["batch"], "--latent-size", c["latent"], "--steps", c["steps"],
            "--warmup", c["warmup"]]


def ref_cmd(mode, teacher, student_cfg, pairs, c):
    cmd = [PYTHON, "scripts/bench_reference.py", "--mode", mode, "--threads", THREADS, "--teacher", teacher,
           "--batch-size", c["batch"], "--latent-size", c["latent"], "--steps", c["steps"], "--warmup", c["warmup"]]
    if student_cfg:
        cmd += ["--student", student_cfg]
    if pairs:
        cmd += ["--pairs", pairs]
    return cmd


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def ab(name, mode, teacher, student, c, policy):
    """Rounds of (sdkd, reference) on one case; returns both sides' runs."""
    a, b = [], []
    files = None
    for _ in range(ROUNDS):
        r = run_json(sdkd_cmd(mode, teacher, student, c), policy, f"sdkd {name}")
        a.append(r)
        if files is None:
            if mode == "train":
                files = (write(OUT / name / "student_config.json", r["student"]["config"]),
                         write(OUT / name / "pairs.json", r["student"]["feature_pairs"]))
            else:
                cfg = None if student == "teacher" else write(OUT / name / "unet_config.json", r["unet"]["config"])
                files = (cfg, None)
        b.append(run_json(ref_cmd(mode, teacher, files[0], files[1], c), policy, f"pytorch {name}"))
    return a, b


def med(runs, key="step_ms_median"):
    return statistics.median(r[key] for r in runs)


def cpu(runs):
    return med(runs, "step_cpu_ms_median")


def spread(a, b):
    """Range of the per-round speed-ups (reference / sdkd of the same round)."""
    ratios = [y["step_ms_median"] / x["step_ms_median"] for x, y in zip(a, b)]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"


def fmt_ms(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def machine():
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "no AVX2")
    except (OSError, StopIteration):
        isa = "?"
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", open("/proc/meminfo").read()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    return f"{model} ({isa}), {os.cpu_count()} logical cores, {mem} RAM, {platform.system()} {platform.release()}"


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "?"


def eval_pipeline():
    """The tiny 4-stage test pipeline the eval and lcm sections generate with (made once)."""
    pipe = OUT / "eval-pipeline"
    if not (pipe / "model_index.json").exists():
        subprocess.run([str(PYTHON), str(ROOT / "tests" / "reference" / "make_pipeline.py"), str(pipe), "--stages", "4",
                        "--sample-size", "32"], cwd=ROOT, check=True, capture_output=True)
    return pipe


def lcm_section():
    """LCM sampling, sdkd against diffusers' LCMScheduler pipeline: the eval pipeline with its UNet
    given `time_cond_proj_dim` 256 (an LCM student's shape; its weights are not distilled, which
    changes nothing for speed)."""
    import shutil
    base, pipe = eval_pipeline(), OUT / "lcm-pipeline"
    if not (pipe / "unet" / "config.json").exists():
        shutil.rmtree(pipe, ignore_errors=True)
        shutil.copytree(base, pipe, ignore=shutil.ignore_patterns("unet"))
        subprocess.run([str(PYTHON), str(ROOT / "tests" / "reference" / "lcm_unet.py"), str(base / "unet"), str(pipe / "unet"), "256"],
                       cwd=ROOT, check=True, capture_output=True)
    count, steps, guidance = 10, 4, 6.0
    print(f"LCM sampling: sdkd eval --model --scheduler lcm against diffusers' LCMScheduler at batch 1, {ROUNDS} round(s)", flush=True)
    r = bench_eval("lcm", pipe, count, steps, "--scheduler", "lcm", "--guidance", str(guidance))
    return [
        "### LCM sampling (`sdkd eval --model --scheduler lcm` vs diffusers' `LCMScheduler`)",
        "",
        f"The eval section's tiny pipeline with its UNet given a guidance embedding (`time_cond_proj_dim` 256, as diffusers' "
        f"LCD scripts make the student; tests/reference/lcm_unet.py), {count} prompts, 64x64, {steps} LCM steps, guidance "
        f"{guidance:g} embedded (one UNet call per step, no CFG batch, on both sides); diffusers' `StableDiffusionPipeline` "
        f"with `LCMScheduler`, one prompt per call, one CPU generator; sdkd seeds per image; {THREADS} threads, {ROUNDS} rounds A/B/C.",
        "",
        *images_per_second_table(r),
    ]


def sdxl_section():
    """One CFG denoising step of the SDXL-shaped UNet, sdkd against diffusers' eager forward."""
    c = SDXL
    print(f"SDXL-shaped inference step: {c['teacher']}, latent {c['latent']}, CFG batch {2 * c['batch']}, {ROUNDS} round(s)", flush=True)
    a, b = ab("infer-sdxl", "infer", c["teacher"], "teacher", c, "passive")
    return [
        "### Inference, SDXL-shaped UNet: one denoising step with classifier-free guidance (CPU, fp32)",
        "",
        f"`{c['teacher']}`: SDXL-base's block structure (DownBlock2D + two CrossAttnDownBlock2D, transformer depths "
        "1/2/10, a depth-10 mid block, heads 5/10/20, linear projections, the text_time embedding of pooled text and "
        "six time ids) with every width divided by 4 (random weights); "
        f"latent {c['latent']}x{c['latent']} ({c['latent'] * 8}px), CFG batch {2 * c['batch']}, random pooled embeddings and "
        f"square time ids on both sides, {THREADS} threads, OMP_WAIT_POLICY=PASSIVE on both sides; per run {c['warmup']} "
        f"warm-up + {c['steps']} timed step(s), {ROUNDS} rounds A/B.",
        "",
        "| UNet | params | sdkd ms/step | diffusers ms/step | speed-up (per-round range) | CPU-time speed-up | sdkd peak RSS MiB | PyTorch peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
        f"| SDXL-shaped (widths / 4) | {a[0]['unet']['params'] / 1e6:.1f}M | {fmt_ms(med(a))} | {fmt_ms(med(b))} | **{med(b) / med(a):.2f}x** "
        f"({spread(a, b)}) | {cpu(b) / cpu(a):.2f}x | {med(a, 'peak_mem_mb'):,.0f} | {med(b, 'peak_mem_mb'):,.0f} |",
        "",
    ]


def bench_eval(label, model, count, steps, *extra):
    """scripts/bench_eval.py's sdkd-vs-diffusers generation timing, recorded under `label`."""
    p = subprocess.run([str(PYTHON), str(ROOT / "scripts" / "bench_eval.py"), "--model", str(model), "--count", str(count),
                        "--steps", str(steps), "--size", "64", "--batch", "8", "--rounds", str(ROUNDS), "--threads", str(THREADS),
                        *extra], cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench: scripts/bench_eval.py {' '.join(extra)} failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    records.append({"_label": label, **r})
    return r


def images_per_second_table(r):
    """A bench_eval result as a table: each side's images/s and its speed-up over diffusers at batch 1."""
    m, per = r["median"], r["seconds_per_image"]
    ratios = [d / s for s, d in zip(per["sdkd b1"], per["diffusers b1"])]
    return [
        "| side | images/s (median) | s/image | speed-up vs diffusers batch 1 |",
        "|---|---|---|---|",
        *[f"| {k} | {1 / v:.3f} | {v:.3f} | {m['diffusers b1'] / v:.2f}x |" for k, v in m.items()],
        "",
        f"Per-round sdkd batch 1 / diffusers batch 1: {min(ratios):.2f}-{max(ratios):.2f}x.",
        "",
    ]


def main():
    if not SDKD.exists():
        sys.exit(f"bench: {SDKD} missing: run `make build`")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    lines = []
    summary = {}
    torch_version = "?"

    if "train" in SECTIONS:
        c = TRAIN
        print(f"training step: teacher {c['teacher']}, batch {c['batch']}, latent {c['latent']}, {ROUNDS} round(s)", flush=True)
        rows = []
        for s in STUDENTS:
            a, b = ab(f"train-{s}", "train", c["teacher"], s, c, "passive")
            summary[("train", s, "passive")] = (a, b)
            torch_version = b[0].get("torch", torch_version)
            rows.append(f"| {s} | {a[0]['teacher']['params'] / 1e6:.1f}M | {a[0]['student']['params'] / 1e6:.1f}M "
                        f"| {len(a[0]['student']['feature_pairs'])} | {fmt_ms(med(a))} | {fmt_ms(med(b))} "
                        f"| **{med(b) / med(a):.2f}x** ({spread(a, b)}) | {fmt_ms(cpu(a))} | {fmt_ms(cpu(b))} | {cpu(b) / cpu(a):.2f}x "
                        f"| {med(a, 'peak_mem_mb'):,.0f} | {med(b, 'peak_mem_mb'):,.0f} |")
        lines += [
            f"### Distillation training step (CPU, fp32)",
            "",
            f"Teacher `{c['teacher']}`, batch {c['batch']}, latent {c['latent']}x{c['latent']} "
            f"({c['latent'] * 8}px), {THREADS} threads, OMP_WAIT_POLICY=PASSIVE on both sides; "
            f"per run {c['warmup']} warm-up + {c['steps']} timed steps, {ROUNDS} rounds A/B. A step: noise and timesteps, "
            "frozen teacher forward with the paired features, student forward and backward, task + output-KD + "
            "feature-KD losses, clip_grad_norm(1.0), AdamW, zero_grad.",
            "",
            "| student | teacher params | student params | feature pairs | sdkd ms/step | PyTorch ms/step | speed-up (per-round range) | sdkd CPU ms/step | PyTorch CPU ms/step | CPU-time speed-up | sdkd peak RSS MiB | PyTorch peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]

    if "infer" in SECTIONS:
        c = INFER
        print(f"inference step: {c['teacher']}, latent {c['latent']}, CFG batch {2 * c['batch']}, {ROUNDS} round(s)", flush=True)
        res = {}
        for u in c["unets"]:
            res[u] = ab(f"infer-{u}", "infer", c["teacher"], u, c, "passive")
            summary[("infer", u, "passive")] = res[u]
            torch_version = res[u][1][0].get("torch", torch_version)
        ta, tb = res["teacher"]
        tp = ta[0]["unet"]["params"]
        rows = []
        for u, (a, b) in res.items():
            p = a[0]["unet"]["params"]
            rows.append(f"| {u} | {p / 1e6:.1f}M | {p / tp:.2f} | {fmt_ms(med(a))} | {fmt_ms(med(b))} "
                        f"| **{med(b) / med(a):.2f}x** ({spread(a, b)}) | {cpu(b) / cpu(a):.2f}x "
                        f"| {med(a) / med(ta):.2f} / {cpu(a) / cpu(ta):.2f} | {med(b) / med(tb):.2f} / {cpu(b) / cpu(tb):.2f} "
                        f"| {med(a, 'peak_mem_mb'):,.0f} | {med(b, 'peak_mem_mb'):,.0f} |")
        lines += [
            "### Inference: one denoising step with classifier-free guidance (CPU, fp32)",
            "",
            f"Config `{c['teacher']}` and its presets (random weights), latent {c['latent']}x{c['latent']} "
            f"({c['latent'] * 8}px), CFG batch {2 * c['batch']} (one UNet forward + guidance), {THREADS} threads, "
            f"OMP_WAIT_POLICY=PASSIVE on both sides; per run {c['warmup']} warm-up + {c['steps']} timed step(s), "
            f"{ROUNDS} rounds A/B.",
            "",
            "| UNet | params | params / teacher | sdkd ms/step | PyTorch ms/step | speed-up (per-round range) | CPU-time speed-up | sdkd latency / teacher (wall / CPU) | PyTorch latency / teacher (wall / CPU) | sdkd peak RSS MiB | PyTorch peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]

    if "wait" in SECTIONS:
        c = TRAIN
        s = "bk_small" if "bk_small" in STUDENTS else STUDENTS[0]
        print(f"OpenMP wait policy: training step of {s} with libgomp's default spin", flush=True)
        short = dict(c, warmup=1, steps=2)
        spin = ab(f"train-{s}", "train", c["teacher"], s, short, "spin")
        passive = summary.get(("train", s, "passive")) or ab(f"train-{s}", "train", c["teacher"], s, c, "passive")
        auto = [run_json(sdkd_cmd("train", c["teacher"], s, short), "auto", f"sdkd train-{s}") for _ in range(ROUNDS)]
        chosen = sorted({f"GOMP_SPINCOUNT={r['gomp_spincount']}" if r.get("gomp_spincount") else f"OMP_WAIT_POLICY={r.get('omp_wait_policy')}" for r in auto})
        (pa, pb), (sa, sb) = passive, spin
        lines += [
            "### OpenMP wait policy (training step, " + s + ")",
            "",
            "Unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set, `sdkd` re-executes itself with GOMP_SPINCOUNT=10000 "
            "when the 1-minute load average is below the core count and OMP_WAIT_POLICY=PASSIVE otherwise "
            "(src/main.rs); Python's PyTorch keeps libgomp's default, a 300000-iteration spin before sleeping "
            "(set here as GOMP_SPINCOUNT=300000, which is that default made explicit). Same shapes and threads as above.",
            "",
            "| OpenMP setting (both sides) | sdkd ms/step | PyTorch ms/step | speed-up | sdkd CPU ms/step | PyTorch CPU ms/step |",
            "|---|---|---|---|---|---|",
            f"| PASSIVE (as in the tables above) | {fmt_ms(med(pa))} | {fmt_ms(med(pb))} | {med(pb) / med(pa):.2f}x ({spread(pa, pb)}) | {fmt_ms(cpu(pa))} | {fmt_ms(cpu(pb))} |",
            f"| libgomp default spin (Python's default) | {fmt_ms(med(sa))} | {fmt_ms(med(sb))} | {med(sb) / med(sa):.2f}x ({spread(sa, sb)}) | {fmt_ms(cpu(sa))} | {fmt_ms(cpu(sb))} |",
            f"| each side's own default: sdkd ({', '.join(chosen)}, its choice) vs PyTorch (libgomp default spin) "
            f"| {fmt_ms(med(auto))} | {fmt_ms(med(sb))} | {med(sb) / med(auto):.2f}x | {fmt_ms(cpu(auto))} | {fmt_ms(cpu(sb))} |",
            "",
            f"Spin / passive wall time: sdkd {med(sa) / med(pa):.2f}, PyTorch {med(sb) / med(pb):.2f} "
            "(above 1: spinning is slower; spin runs: 1 warm-up + 2 timed steps). CPU time counts the spinning too.",
            "",
        ]

    if "own" in SECTIONS:
        s = "bk_small" if "bk_small" in STUDENTS else STUDENTS[0]
        print("out of the box: each side's own runtime settings", flush=True)
        cases = [(f"inference step, teacher `{INFER['teacher']}`, CFG batch {2 * INFER['batch']}, latent {INFER['latent']}", "infer", dict(INFER, warmup=1, steps=2), "teacher"),
                 (f"training step, {s} from `{TRAIN['teacher']}`, batch {TRAIN['batch']}, latent {TRAIN['latent']}", "train", dict(TRAIN, warmup=1, steps=2), s)]
        rows = []
        for label, mode, c, student in cases:
            a, b = ab(f"{mode}-{student}", mode, c["teacher"], student, c, "own")
            summary[(mode, student, "own")] = (a, b)
            torch_version = b[0].get("torch", torch_version)
            chosen = sorted({f"GOMP_SPINCOUNT={r['gomp_spincount']}" if r.get("gomp_spincount") else f"OMP_WAIT_POLICY={r.get('omp_wait_policy')}" for r in a})
            rows.append(f"| {label} | {', '.join(chosen)} | {fmt_ms(med(a))} | {fmt_ms(med(b))} | **{med(b) / med(a):.2f}x** ({spread(a, b)}) "
                        f"| {fmt_ms(cpu(a))} | {fmt_ms(cpu(b))} | {med(a, 'peak_mem_mb'):,.0f} | {med(b, 'peak_mem_mb'):,.0f} |")
        lines += [
            "### Out of the box: each side's own runtime settings",
            "",
            "What a user gets without setting anything: sdkd with its own OpenMP choice (src/main.rs) and its malloc "
            "setting (freed memory stays in the heap), PyTorch with libgomp's default spin-wait and glibc's default "
            f"malloc. {THREADS} threads, per run 1 warm-up + 2 timed steps, {ROUNDS} rounds A/B.",
            "",
            "| case | sdkd's OpenMP choice | sdkd ms/step | PyTorch ms/step | speed-up (per-round range) | sdkd CPU ms/step | PyTorch CPU ms/step | sdkd peak RSS MiB | PyTorch peak RSS MiB |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]

    if "decode" in SECTIONS:
        print("decode throughput: cargo bench --bench decode", flush=True)
        p = subprocess.run([env.get("CARGO", "cargo"), "bench", "--bench", "decode"], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"bench: cargo bench --bench decode failed:\n{p.stderr[-3000:]}")
        out = [l for l in p.stdout.splitlines() if "images/s" in l or "per image" in l]
        print("\n".join("  " + l.strip() for l in out))
        records.append({"_label": "decode", "lines": out})
        lines += ["### Data loader decode throughput (`cargo bench --bench decode`)", "", "```", *[l.strip() for l in out], "```", ""]

    if "loader" in SECTIONS:
        print("loader on webdataset shards against webdataset + PIL + DataLoader: scripts/bench_loader.py", flush=True)
        p = subprocess.run([str(PYTHON), str(ROOT / "scripts" / "bench_loader.py")], cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"bench: scripts/bench_loader.py failed:\n{p.stderr[-3000:]}")
        out = p.stdout.strip().splitlines()
        print("\n".join("  " + l for l in out))
        records.append({"_label": "loader", "lines": out})
        lines += ["### Loader on webdataset shards vs webdataset + PIL + torch DataLoader (`scripts/bench_loader.py`)", "",
                  "LAION-like 512-1024 px JPEGs, resize 512 + random crop + flip + to tensor, batch 16; median of rounds.", "", *out, ""]

    if "eval" in SECTIONS:
        pipe = eval_pipeline()
        count, steps = (10, 2) if QUICK else (10, 10)  # 10: the Inception Score sdkd eval computes needs 10 images
        print(f"eval generation: sdkd eval --model against diffusers' StableDiffusionPipeline at batch 1, {ROUNDS} round(s)", flush=True)
        r = bench_eval("eval", pipe, count, steps)
        lines += [
            "### Evaluation: generating the images (`sdkd eval --model` vs BK-SDM's diffusers loop)",
            "",
            f"The tiny 4-stage test pipeline (tests/reference/make_pipeline.py --stages 4 --sample-size 32), {count} prompts, "
            f"64x64, {steps} PNDM steps, guidance 7.5, PNGs written; diffusers' `StableDiffusionPipeline` one prompt per call "
            f"with one CPU generator (BK-SDM's generate.py at batch 1); {THREADS} threads, {ROUNDS} rounds A/B/C. "
            "Time per image from the first prompt to the last PNG, without loading (sdkd: report.json's seconds_per_image).",
            "",
            *images_per_second_table(r),
        ]

    if "sdxl" in SECTIONS:
        lines += sdxl_section()

    if "lcm" in SECTIONS:
        lines += lcm_section()

    torch_version = next((r["torch"] for r in records if "torch" in r), torch_version)
    finished = datetime.datetime.now(datetime.timezone.utc)
    head = [
        BEGIN,
        "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC by `make bench` ({(finished - started).total_seconds() / 60:.0f} min), "
        f"sdkd {git_rev()}, PyTorch {torch_version} (the same LibTorch as sdkd).",
        f"Machine: {machine()}; load average {load_before[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
        "(a shared machine: other jobs ran alongside, which is why sides alternate and medians are reported).",
        "",
    ]
    block = "\n".join(head + lines + [END])
    print()
    print(block)
    write(OUT / "results.json", records)
    if WRITE_DOCS:
        text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
        if BEGIN.split(" (")[0] in text and END in text:
            pre = text[: text.index(BEGIN.split(" (")[0])]
            post = text[text.index(END) + len(END):]
            text = pre + block + post
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        DOC.write_text(text)
        print(f"\nwrote {DOC.relative_to(ROOT)} and {(OUT / 'results.json').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
