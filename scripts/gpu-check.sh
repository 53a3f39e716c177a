#!/usr/bin/env bash
# The check of a lent GPU machine, in one call of under 8 minutes (docs/benchmarks.md, "GPU").
# That machine has no Rust and no network: everything comes in gpu-bin/ (scripts/gpu-build.sh,
# carried with the call) and runs against the machine's own PyTorch, whose torch/lib goes on
# LD_LIBRARY_PATH. Stages:
#   1. fp32 correctness on CUDA: `sdkd generate` against the CPU image made here (also an LCM
#      student at 4 `lcm` steps, stage 1d), 20 training
#      steps against the CPU loss curve, resume (bit-exact, or within CUDA's own run-to-run
#      nondeterminism);
#   2. mixed precision: the mixed-precision test on CUDA, bf16 and fp16 training runs (finite
#      losses, the fp16 loss scale);
#   3. speed on SD-1.5 shapes, side by side with the eager PyTorch step of BK-SDM's training script (scripts/bench_reference.py)
#      (scripts/bench_reference.py on the carried diffusers): the bf16 distillation step per preset
#      at the largest batch that fits (up to 64, latent 64) and the bf16 inference step, with
#      ms/step, the ratio, the caching allocator's peak and the MFU;
#   3m. memory: `sdkd plan` for bk_base in two settings, its 24 GB batch checked by one real step
#      (the caching allocator's peak against the prediction);
#   S. SDXL: one bf16 CFG denoising step of SDXL-base's UNet at 1024 px against diffusers' eager
#      forward (ms, MFU, the caching allocator's peak); stage 1e with 1d is the LCM stage: a
#      2-step `method: lcm` run against the CPU's losses;
#   4. data parallel: the 20 fp32 steps as a one-rank data-parallel run (WORLD_SIZE=1 set by
#      hand, then under torchrun): NCCL on CUDA (Gloo in the dry run), against the CPU curve.
# Each command has its own timeout and a stage is skipped, not cut, when the time left cannot
# hold it. The report is ${OUT:-gpu-out}/gpu-check.md (logs beside it); exit 0 only when every
# stage passed: a SKIP (out of time, a table row not run) fails the check like a FAIL, except
# the one expected skip, "SKIP (expected)": the CUDA case of tests/precision.rs in the dry run
# (no GPU there).
#
# usage: scripts/gpu-check.sh [--cpu-dry-run]
#   --cpu-dry-run  every stage on this machine's CPU with the same gpu-bin/ (tiny shapes for the
#                  speed stage, a few minutes): what a lent machine will run, minus the GPU.
# env: SDKD_GPU_PYTHON (the Python with the machine's torch; default python3, else
#      /opt/torch/.venv/bin/python3), GPU_CHECK_BUDGET_S (default 450), SDKD_GPU_BATCHES
#      (training batches tried, largest first; default "64 32 16 8").
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dry=false
case "${1:-}" in
  "") ;;
  --cpu-dry-run) dry=true ;;
  *) echo "usage: scripts/gpu-check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
bin=$root/gpu-bin
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/logs" "$out/gpu-bench.jsonl"   # this script's own output of an earlier run
mkdir -p "$out/logs"
report=$out/gpu-check.md
: > "$report"
work=$(mktemp -d "${TMPDIR:-/tmp}/sdkd-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-450}
left() { echo $((budget - ($(date +%s) - start))); }
say() { echo "$*" | tee -a "$report"; }
die() { say "**stopped: $***"; exit 1; }
# t SECONDS CMD...: CMD under a timeout of SECONDS, cut to the time left.
t() {
  local s=$1; shift
  local l; l=$(left)
  (( s > l )) && s=$l
  (( s < 1 )) && return 124
  timeout --kill-after=5 "$s" "$@"
}
results=()   # "stage|verdict|detail"; verdicts PASS, FAIL, SKIP, "SKIP (expected)"
record() { results+=("$1|$2|$3"); say ""; say "**$1: $2** ($3)"; }

[ -x "$bin/bin/sdkd" ] || die "gpu-bin/bin/sdkd missing: run scripts/gpu-build.sh on the build machine and carry gpu-bin"
[ -e "$bin/reference/made-by" ] || die "gpu-bin/reference/made-by missing: gpu-bin/ is from an older scripts/gpu-build.sh, rebuild it"
want_torch=$(cat "$bin/torch-version")

# --- The Python with this machine's torch, its libraries, the carried wheels ---------------------
if $dry; then
  # Here: the .venv's Python importing the very torch the binary was built against (the wheel
  # gpu-build.sh unpacked), as the device's Python imports its own.
  py=${SDKD_GPU_PYTHON:-$root/.venv/bin/python}
  export PYTHONPATH=$(cat "$bin/build-torch-site")
  dev=cpu
else
  py=${SDKD_GPU_PYTHON:-}
  if [ -z "$py" ]; then
    for c in python3 /opt/torch/.venv/bin/python3; do
      if "$c" -c 'import torch' 2>/dev/null; then py=$c; break; fi
    done
  fi
  [ -n "$py" ] || die "no Python that imports torch (set SDKD_GPU_PYTHON)"
  dev=cuda
fi
have_torch=$("$py" -c 'import torch; print(torch.__version__)' 2>&1) || die "$py cannot import torch: $have_torch"
[ "${have_torch%%+*}" = "$want_torch" ] || die "gpu-bin/ was built for torch $want_torch, this machine has $have_torch: run scripts/gpu-build.sh ${have_torch%%+*}"
torch_dir=$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')
# torch/lib, and the CUDA libraries of the nvidia-* packages wherever this Python finds them
# (libtorch_cuda's own rpath names them relative to an installed torch).
nvidia_libs=$("$py" -c 'import glob, os, sys
print(":".join(sorted({d for p in sys.path for d in glob.glob(os.path.join(p, "nvidia", "*", "lib"))})))')
export LD_LIBRARY_PATH=$torch_dir/lib${nvidia_libs:+:$nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
sdkd=$bin/bin/sdkd
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no network there: never let a library try

pylib=$work/pylib
mkdir -p "$pylib"
# diffusers always (the device has none), then, following requirements, every carried wheel this
# Python lacks or has in a version the requirer does not accept. A wheel is a zip: unpacked
# directly where this Python has no pip.
"$py" - "$bin/wheels" "$pylib" > "$out/logs/wheels.txt" 2>&1 <<'EOF'
import glob, importlib.metadata as md, os, subprocess, sys, zipfile
from packaging.requirements import Requirement
wheels, target = sys.argv[1], sys.argv[2]
norm = lambda name: name.lower().replace("_", "-")
carried = {norm(os.path.basename(w).split("-")[0]): w for w in glob.glob(os.path.join(wheels, "*.whl"))}
def requirements(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(l.split(":", 1)[1].strip()) for l in lines if l.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
install, todo, missing = [carried["diffusers"]], [carried["diffusers"]], []
while todo:
    for r in requirements(todo.pop()):
        try:
            ok = r.specifier.contains(md.version(r.name), prereleases=True)
        except md.PackageNotFoundError:
            ok = False
        w = carried.get(norm(r.name))
        print(f"{r}: {'present' if ok else 'missing here'}{'' if ok or w else ', not carried'}")
        if not ok and w and w not in install:
            install.append(w); todo.append(w)
        elif not ok and not w:
            missing.append(str(r))
has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
for w in install:
    print("installing", os.path.basename(w))
    if has_pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", target, w], check=True)
    else:
        zipfile.ZipFile(w).extractall(target)
if missing:
    print("not carried, missing here:", ", ".join(missing))
EOF
wheels_rc=$?
export PYTHONPATH=$pylib${PYTHONPATH:+:$PYTHONPATH}

say "# gpu-check $(date -u +%FT%TZ)$($dry && echo ', CPU dry run')"
say ""
say "gpu-bin: sdkd $(cat "$bin/commit") built with tch $(cat "$bin/tch-version") for torch $want_torch, $(du -sh "$bin" | cut -f1) carried."
say "Machine: torch $have_torch ($py), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
if ! $dry; then
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
fi
say "Ran: $sdkd (LD_LIBRARY_PATH from $torch_dir/lib)"
version=$("$sdkd" --version 2>&1) || die "$sdkd --version failed: $version"
say "Its build: $version"
case "$version" in *"process groups: gloo nccl"*) ;; *) die "gpu-bin's sdkd has no NCCL process group ($version): scripts/gpu-build.sh refuses such a build" ;; esac
say "The CPU references (stage 1) were made by another build: $(cat "$bin/reference/made-by")"
say "Wheels installed into a temporary --target: $(grep '^installing' "$out/logs/wheels.txt" | cut -d' ' -f2 | paste -sd' ' -)$(grep '^not carried' "$out/logs/wheels.txt" | sed 's/^/; /')"
(( wheels_rc == 0 )) || { cat "$out/logs/wheels.txt"; die "installing the carried wheels failed (logs/wheels.txt)"; }
t 60 "$py" -c 'import diffusers; print(diffusers.__version__)' > "$out/logs/diffusers.txt" 2>&1 ||
  { cat "$out/logs/diffusers.txt"; die "diffusers does not import from the carried wheels (logs/diffusers.txt)"; }
say "diffusers $(tail -1 "$out/logs/diffusers.txt") from the carried wheel"

# --- 1. fp32 correctness ---------------------------------------------------------------------
say ""
say "## 1. Correctness in fp32 on $dev"
if $dry; then
  # The references were made by the main build (LibTorch 2.13) on the CPU, this is the 2.11
  # build on the same CPU: the same arithmetic on another LibTorch's CPU kernels. Held to the
  # CUDA stage's tolerances until a dry run has measured how far apart the two builds are.
  image_tol="0.5 8"; loss_tol=1e-2; first_tol=1e-3
else
  # LibTorch lets cuDNN use TF32 for fp32 convolutions (its default on Ampere and later) and CUDA
  # kernels sum in other orders than the CPU's: a close image, not the same bytes.
  image_tol="0.5 8"; loss_tol=1e-2; first_tol=1e-3
fi
prompt="two small red circles on a blue background"
# image_verdict REF GOT: "PASS|..." or "FAIL|..." for GOT against the CPU's REF within $image_tol.
image_verdict() {
  "$py" - "$1" "$2" $image_tol <<'EOF'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1]).convert("RGB"), dtype=np.int16)
b = np.asarray(Image.open(sys.argv[2]).convert("RGB"), dtype=np.int16)
mean_tol, max_tol = float(sys.argv[3]), float(sys.argv[4])
d = np.abs(a - b)
ok = a.shape == b.shape and d.mean() <= mean_tol and d.max() <= max_tol
print(("PASS" if ok else "FAIL") + f"|{a.shape[1]}x{a.shape[0]} image vs the CPU's: mean abs diff {d.mean():.4f}/255, max {d.max()}/255, "
      f"{(d > 0).mean() * 100:.2f}% of values differ (tolerance: mean <= {mean_tol}/255, max <= {max_tol:g}/255)")
EOF
}
if t 120 "$sdkd" generate --model "$bin/pipeline" --prompt "$prompt" --scheduler unipc --steps 20 --seed 1 \
    --width 32 --height 32 --device "$dev" --out "$work/image.png" > "$out/logs/generate.txt" 2>&1; then
  verdict=$(image_verdict "$bin/reference/cpu.png" "$work/image.png")
  record "1a generate (tiny pipeline, UniPC, 20 steps, fp32)" "${verdict%%|*}" "${verdict#*|}"
else
  record "1a generate (tiny pipeline, UniPC, 20 steps, fp32)" FAIL "sdkd generate failed: $(tail -2 "$out/logs/generate.txt" | tr '\n' ' ')"
fi
# 1d: an LCM student (guidance embedded through time_cond_proj_dim, the lcm sampler's seeded
# re-noising drawn on the CPU generator and moved to the device), 4 steps
if t 60 "$sdkd" generate --model "$bin/pipeline" --unet "$bin/lcm_unet" --prompt "$prompt" --scheduler lcm --steps 4 \
    --guidance-scale 6 --seed 1 --width 32 --height 32 --device "$dev" --out "$work/image-lcm.png" > "$out/logs/generate-lcm.txt" 2>&1; then
  verdict=$(image_verdict "$bin/reference/cpu-lcm.png" "$work/image-lcm.png")
  record "1d generate an LCM student (lcm, 4 steps, fp32)" "${verdict%%|*}" "${verdict#*|}"
else
  record "1d generate an LCM student (lcm, 4 steps, fp32)" FAIL "sdkd generate failed: $(tail -2 "$out/logs/generate-lcm.txt" | tr '\n' ' ')"
fi

# train NAME STEPS PRECISION [--resume latest]: a run of the carried YAML ($train_yaml, default
# train.yaml.in) into $work/NAME; its
# losses, one "step loss" line per step, into $work/NAME.losses. $launch (an array, empty by
# default) goes before sdkd: a launcher and its arguments, or `env VAR=...`.
launch=()
train() {
  local name=$1 steps=$2 precision=$3; shift 3
  sed -e "s|@ROOT@|$bin|" -e "s|@RUN@|$work/$name|" -e "s|@STEPS@|$steps|" -e "s|@DEVICE@|$dev|" \
    -e "s|@PRECISION@|$precision|" "${train_yaml:-$bin/train.yaml.in}" > "$work/$name-$steps.yaml"
  t 120 "${launch[@]}" "$sdkd" train --config "$work/$name-$steps.yaml" "$@" > /dev/null 2>> "$out/logs/train-$name.txt" || return 1
  sed -n 's|^step \([0-9]*\)/[0-9]* ([0-9.]*%) loss \([^ ]*\) .*|\1 \2|p' "$out/logs/train-$name.txt" > "$work/$name.losses"
}
# curve_verdict RUN_LOSSES: "PASS|..." or "FAIL|..." for a run's losses against the CPU curve
curve_verdict() {
  "$py" - "$bin/reference/cpu-losses.txt" "$1" "$loss_tol" "$first_tol" <<'EOF'
import sys
def curve(path):
    return {int(s): float(l) for s, l in (line.split() for line in open(path))}
cpu, run = curve(sys.argv[1]), curve(sys.argv[2])
tol, first_tol = float(sys.argv[3]), float(sys.argv[4])
if sorted(run) != sorted(cpu):
    print(f"FAIL|steps logged {sorted(run)} vs the CPU's {sorted(cpu)}"); sys.exit()
rel = {s: abs(run[s] - cpu[s]) / abs(cpu[s]) for s in cpu}
worst = max(rel, key=rel.get)
ok = rel[1] <= first_tol and rel[worst] <= tol
print(("PASS" if ok else "FAIL") + f"|{len(cpu)} steps: loss {run[1]:.4f} -> {run[max(run)]:.4f} (CPU {cpu[1]:.4f} -> {cpu[max(cpu)]:.4f}); "
      f"relative difference step 1 {rel[1]:.2e}, worst {rel[worst]:.2e} at step {worst} (tolerance {first_tol:g} at step 1, {tol:g} overall; "
      "losses as logged, 4 decimals)")
EOF
}
if train fp32 20 fp32; then
  verdict=$(curve_verdict "$work/fp32.losses")
  record "1b 20 training steps vs the CPU loss curve (fp32)" "${verdict%%|*}" "${verdict#*|}"
else
  record "1b 20 training steps vs the CPU loss curve (fp32)" FAIL "sdkd train failed: $(tail -2 "$out/logs/train-fp32.txt" | tr '\n' ' ')"
fi

# Resume: 10 steps, then --resume latest to 20, against the straight run; a second straight run
# measures the device's own run-to-run nondeterminism (cuDNN/atomics), which resume may not exceed.
if (( $(left) < 60 )); then
  record "1c resume" SKIP "out of time"
elif train fp32-again 20 fp32 && train split 10 fp32 && train split 20 fp32 --resume latest; then
  verdict=$("$py" - "$work/fp32" "$work/fp32-again" "$work/split" <<'EOF'
import sys, torch
from safetensors.torch import load_file
def ckpt(run):
    return {f: load_file(f"{run}/checkpoints/step-20/{f}.safetensors") for f in ("student", "ema", "optimizer")}
def diff(a, b):
    worst, exact = 0.0, True
    for f in a:
        assert a[f].keys() == b[f].keys(), f
        for k in a[f]:
            x, y = a[f][k], b[f][k]
            exact &= torch.equal(x, y)
            if x.is_floating_point():
                worst = max(worst, (x.double() - y.double()).abs().max().item())
    return exact, worst
straight, again, split = (ckpt(r) for r in sys.argv[1:4])
run_exact, run_diff = diff(straight, again)
res_exact, res_diff = diff(straight, split)
n = sum(len(v) for v in straight.values())
if res_exact:
    print(f"PASS|bit-exact: 10 steps + resume + 10 steps equals 20 steps in all {n} tensors (student, EMA, AdamW)")
elif not run_exact and res_diff <= 2 * run_diff:
    print(f"PASS|within the device's nondeterminism: resumed vs straight max abs diff {res_diff:.3e}, "
          f"two straight runs {run_diff:.3e} (tolerance: twice the latter)")
else:
    print(f"FAIL|resumed vs straight max abs diff {res_diff:.3e}; two straight runs {'identical' if run_exact else f'{run_diff:.3e}'}")
EOF
  )
  record "1c resume (10 + resume 10 vs 20 steps)" "${verdict%%|*}" "${verdict#*|}"
else
  record "1c resume (10 + resume 10 vs 20 steps)" FAIL "a training run failed: logs/train-*.txt"
fi

# 1e (with 1d, the LCM stage): a `method: lcm` run, 2 steps (the consistency loss against the
# target network, the teacher's guided DDIM step, the guidance embedding; the target EMA update),
# against the same run on the CPU by the main build
lcm_verdict() {
  "$py" - "$bin/reference/cpu-lcm-losses.txt" "$1" "$first_tol" <<'EOF_PY'
import sys
cpu = [float(l.split()[1]) for l in open(sys.argv[1])]
run = [float(l.split()[1]) for l in open(sys.argv[2])]
tol = float(sys.argv[3])
rel = [abs(a - b) / abs(b) for a, b in zip(run, cpu)]
ok = len(run) == len(cpu) and max(rel) <= tol
print(("PASS" if ok else "FAIL") + f"|losses {', '.join(f'{x:.4f}' for x in run)} vs the CPU's {', '.join(f'{x:.4f}' for x in cpu)}: "
      f"relative difference at most {max(rel, default=float('nan')):.2e} (tolerance {tol:g}; losses as logged, 4 decimals)")
EOF_PY
}
train_yaml=$bin/lcm.yaml.in
if (( $(left) < 40 )); then
  record "1e method: lcm training (2 steps, fp32)" SKIP "out of time"
elif train lcm 2 fp32; then
  verdict=$(lcm_verdict "$work/lcm.losses")
  record "1e method: lcm training (2 steps, fp32) vs the CPU" "${verdict%%|*}" "${verdict#*|}"
else
  record "1e method: lcm training (2 steps, fp32) vs the CPU" FAIL "sdkd train failed: $(tail -2 "$out/logs/train-lcm.txt" | tr '\n' ' ')"
fi
train_yaml=$bin/train.yaml.in

# --- 2. Mixed precision ------------------------------------------------------------------------
say ""
say "## 2. Mixed precision on $dev"
# tests/precision.rs, built as a binary: on CUDA its ignored case, bf16/fp16 against fp32 there.
filter=(); $dry || filter=(--include-ignored)
if t 120 "$bin/bin/precision-test" "${filter[@]}" > "$out/logs/precision-test.txt" 2>&1; then
  record "2a tests/precision.rs" PASS "$(grep -E '^test result' "$out/logs/precision-test.txt" | head -1); $($dry && echo 'its CPU cases' || echo 'with its CUDA case')"
else
  record "2a tests/precision.rs" FAIL "$(grep -E 'panicked|FAILED|test result' "$out/logs/precision-test.txt" | head -3 | tr '\n' ' ')"
fi
if $dry; then
  if grep -qE '^test result: ok\. [0-9]+ passed; 0 failed; 1 ignored' "$out/logs/precision-test.txt"; then
    record "2a' tests/precision.rs, CUDA case" "SKIP (expected)" "no GPU in the dry run: its one ignored case"
  else
    record "2a' tests/precision.rs, CUDA case" FAIL "expected exactly one ignored case (the CUDA one): $(grep -E '^test result' "$out/logs/precision-test.txt" | head -1)"
  fi
fi
for precision in bf16 fp16; do
  if (( $(left) < 40 )); then record "2b $precision training" SKIP "out of time"; continue; fi
  if train "$precision" 20 "$precision"; then
    verdict=$("$py" - "$work/$precision" "$work/$precision.losses" "$precision" "$dev" "$out/logs/train-$precision.txt" <<'EOF'
import json, math, sys
run, losses, precision, dev, log = sys.argv[1:6]
curve = [float(line.split()[1]) for line in open(losses)]
state = json.load(open(f"{run}/checkpoints/step-20/state.json"))
def find(o):
    if isinstance(o, dict):
        return o.get("loss_scale") or next((r for r in map(find, o.values()) if r), None)
scale = find(state)
overflows = open(log).read().count("fp16 gradients overflowed")
problems = [] if len(curve) == 20 and all(map(math.isfinite, curve)) else [f"not 20 finite losses: {curve}"]
note = f"{len(curve)} losses, {curve[0]:.4f} -> {curve[-1]:.4f}" if curve else "no losses"
if precision == "fp16" and dev == "cpu":
    # the trainer computes in fp32 on the CPU (train.precision applies on a GPU): no scale to check
    if scale is not None: problems.append(f"a loss scale {scale} on the CPU")
    note += "; on the CPU the trainer computes in fp32, so no loss scale (tests/precision.rs checks the scaling there)"
elif precision == "fp16":
    # GradScaler's rules: starts at 2^16, halves per overflowing (skipped) step, doubles after
    # 2000 good steps (not reached in 20)
    want = 65536.0 / 2 ** overflows
    if scale is None:
        problems.append("no loss scale in the fp16 checkpoint")
    else:
        if scale["scale"] != want or scale["good_steps"] > 20 - overflows:
            problems.append(f"loss scale {scale}, expected {want:g} after {overflows} overflow(s)")
        note += f"; loss scale {scale['scale']:g} after {overflows} overflowed step(s) (65536 halved per overflow), {scale['good_steps']} good steps since the last"
print(("FAIL" if problems else "PASS") + "|" + note + ("; " + "; ".join(problems) if problems else ""))
EOF
    )
    record "2b $precision training (20 steps)" "${verdict%%|*}" "${verdict#*|}"
  else
    record "2b $precision training (20 steps)" FAIL "sdkd train failed: $(tail -2 "$out/logs/train-$precision.txt" | tr '\n' ' ')"
  fi
done

# --- S. SDXL: one bf16 CFG denoising step of SDXL-base's UNet at 1024 px ----------------------
# sdkd's UNet against diffusers' eager UNet2DConditionModel on the same device, config, random
# pooled embeddings and square time ids (scripts/bench_reference.py): ms/step, MFU and the
# caching allocator's peak (weights included). The dry run: the same blocks with every width
# divided by 16 at latent 8, one timed step.
if $dry; then
  sdxl=tiny sdxl_steps="--steps 1 --warmup 1"
else
  sdxl=base sdxl_steps="--steps 10 --warmup 3"
fi
sdxl_latent=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["latent"])' "$bin/reference/sdxl/macs.json" "$sdxl")
say ""
say "## S. SDXL: one CFG denoising step (CFG batch 2), bf16, $sdxl UNet at latent $sdxl_latent, sdkd vs diffusers' eager forward on $dev"
say ""
say "| UNet | params | sdkd ms/step | diffusers ms/step | speed-up | TFLOP/step | sdkd MFU | diffusers MFU | sdkd peak MiB | diffusers peak MiB |"
say "|---|---|---|---|---|---|---|---|---|---|"
ours=$out/logs/sdxl-$sdxl.json eager=$out/logs/sdxl-$sdxl-eager.json
if (( $(left) < 60 )); then
  say "| $sdxl | skipped: out of time | | | | | | | | |"; record "S SDXL forward" SKIP "out of time"
elif t 180 "$sdkd" bench --json --mode infer --device "$dev" --precision bf16 --teacher "$bin/reference/sdxl/$sdxl.json" --student teacher \
       --latent-size "$sdxl_latent" $sdxl_steps > "$ours" 2> "$ours.err" &&
     t 180 "$py" scripts/bench_reference.py --mode infer --device "$dev" --precision bf16 --teacher "$bin/reference/sdxl/$sdxl.json" \
       --latent-size "$sdxl_latent" $sdxl_steps > "$eager" 2> "$eager.err"; then
  lines=$("$py" - "$bin/reference/sdxl/macs.json" "$sdxl" "$ours" "$eager" "$dev" <<'EOF_PY'
import json, math, sys
macs, name, dev = json.load(open(sys.argv[1]))[sys.argv[2]], sys.argv[2], sys.argv[5]
ours, eager = (json.loads(open(f).read().splitlines()[-1]) for f in sys.argv[3:5])
flops = 2 * 2 * macs["macs"]  # CFG batch 2, FLOPs = 2 MACs
o, e = ours["step_ms_median"], eager["step_ms_median"]
mfu = lambda ms: f"{100 * flops / (ms / 1e3) / 989.4e12:.3g}%"
# CUDA: the caching allocator's peak of allocated bytes; the CPU dry run: each process's peak RSS
peak = lambda r: r.get("gpu_peak_allocated_mb") if dev != "cpu" else r["peak_mem_mb"]
mem = lambda mb: "n/a" if mb is None else f"{mb:,.0f}"
params = ours["unet"]["params"]
print(f"| {name} | {params / 1e6:,.1f}M | {o:,.1f} | {e:,.1f} | **{e / o:.2f}x** | {flops / 1e12:.3g} | {mfu(o)} | {mfu(e)} | {mem(peak(ours))} | {mem(peak(eager))} |")
problems = [] if params == macs["params"] == eager["params"] else [f"parameter counts differ: sdkd {params}, diffusers {eager['params']}, counted {macs['params']}"]
problems += [] if all(math.isfinite(x) and x > 0 for x in (o, e)) else ["a time is not finite"]
print(("FAIL|" if problems else "PASS|") + (", ".join(problems) or f"{o:,.1f} ms vs {e:,.1f} ms ({e / o:.2f}x); peaks {mem(peak(ours))} vs {mem(peak(eager))} MiB"))
EOF_PY
  )
  say "$(echo "$lines" | head -1)"
  verdict=$(echo "$lines" | tail -1)
  record "S SDXL forward ($sdxl UNet, latent $sdxl_latent, bf16)" "${verdict%%|*}" "${verdict#*|}"
else
  say "| $sdxl | failed: $(tail -1 "$ours.err" "$eager.err" 2>/dev/null | grep -v '^==>' | grep . | tail -1) | | | | | | | | |"
  record "S SDXL forward ($sdxl UNet, latent $sdxl_latent, bf16)" FAIL "see logs/sdxl-*.err"
fi

# --- 3. Speed ----------------------------------------------------------------------------------
# H200 SXM: 989.4 TFLOPS dense bf16 (NVIDIA's H200 spec sheet lists 1,979 with 2:4 sparsity).
peak_tflops=989.4
if $dry; then
  shapes=$bin/reference/medium; batches=${SDKD_GPU_BATCHES:-"2 1"}; train_steps="--steps 2 --warmup 1"; infer_steps="--steps 2 --warmup 1"
else
  shapes=$bin/reference/sd15; batches=${SDKD_GPU_BATCHES:-"64 32 16 8"}; train_steps="--steps 6 --warmup 2"; infer_steps="--steps 10 --warmup 3"
fi
latent=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["latent"])' "$shapes/macs.json")
say ""
say "## 3. Speed, bf16, $(basename "$shapes") shapes (latent $latent), sdkd vs eager PyTorch on the same $dev"
say ""
say "FLOPs per step from the MACs of one forward (torch.utils.flop_counter on the same architectures,"
say "attention's products included; FLOPs = 2 MACs): training B x (teacher + 3 x student), the"
say "student's backward counted as twice its forward; inference 2B x the UNet (CFG). MFU against the"
say "H200's $peak_tflops TFLOPS dense bf16$($dry && echo ' (meaningless on a CPU: printed to check the arithmetic)')."
say "Peak memory: the CUDA caching allocator's peak of allocated bytes (sdkd through csrc/aten_extra.cpp,"
say "PyTorch's torch.cuda.max_memory_allocated), weights and optimizer state included."
"$py" - "$shapes/macs.json" <<'EOF' | tee -a "$report"
import json, sys
m = json.load(open(sys.argv[1]))
print("\n| UNet | GMACs per forward (batch 1) | without attention's QK^T/AV |\n|---|---|---|")
for n in ["teacher", "bk_base", "bk_small", "bk_tiny"]:
    print(f"| {n} | {m[n]['macs'] / 1e9:.1f} | {m[n]['macs_without_attention_products'] / 1e9:.1f} |")
EOF
# --- 3m. Memory: sdkd plan against the measured peak ------------------------------------------
# bk_base on these shapes in two settings: `sdkd plan` (probe steps at batch 1 and 2 on this
# device) predicts the largest batch that fits 24 GB and the peak at it; one real step at that
# batch (capped at 64) checks the prediction against the caching allocator's peak (within 15%)
# and that it fits. docs/benchmarks.md, "Memory", has the CPU-planned figures this checks.
say ""
say "## 3m. Memory: sdkd plan for bk_base, $(basename "$shapes") shapes (latent $latent), bf16, on $dev"
say ""
say "| gradient_checkpointing | state_dtype | per sample MiB | fixed MiB | largest batch, 24 GB | largest, 80 GB | checked at batch | predicted MiB | measured MiB | error |"
say "|---|---|---|---|---|---|---|---|---|---|"
mkdir -p "$work/plan-pipe/unet"
cp "$shapes/teacher.json" "$work/plan-pipe/unet/config.json"
echo '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}' > "$work/plan-pipe/model_index.json"
mem_ok=true mem_skipped=0
for setting in "none fp32" "blocks bf16"; do
  read -r ckpt state <<< "$setting"
  if (( $(left) < 90 )); then say "| $ckpt | $state | skipped: out of time | | | | | | | |"; mem_skipped=$((mem_skipped + 1)); continue; fi
  printf 'teacher: %s\nstudent: bk_base\noutput_dir: %s\ndata:\n  cache: %s\n  resolution: %s\ntrain:\n  batch_size: 1\n  device: %s\n  precision: bf16\n  gradient_checkpointing: %s\noptim:\n  state_dtype: %s\nvalidation:\n  every: 0\n' \
    "$work/plan-pipe" "$work/plan-out" "$work/plan-cache" $((latent * 8)) "$dev" "$ckpt" "$state" > "$work/plan-$ckpt.yaml"
  plan=$out/logs/plan-$ckpt-$state.json
  if ! t 120 "$sdkd" plan --json --config "$work/plan-$ckpt.yaml" --gpu-mem 80GB > "$plan" 2> "$plan.err"; then
    say "| $ckpt | $state | plan failed: $(tail -1 "$plan.err") | | | | | | | |"; mem_ok=false; continue
  fi
  b=$("$py" -c 'import json, sys; p = json.load(open(sys.argv[1])); print(max(1, min(64, int((24 * 1024 - p["fixed_mb"]) // max(p["activations_per_sample_mb"], 1e-9)))))' "$plan")
  $dry && (( b > 4 )) && b=4   # the CPU dry run checks the arithmetic, not 24 GB
  real=$out/logs/plan-check-$ckpt-$state.json
  t 120 "$sdkd" bench --json --report-memory --device "$dev" --precision bf16 --teacher "$shapes/teacher.json" --student bk_base \
    --batch-size "$b" --latent-size "$latent" --steps 1 --warmup 1 --gradient-checkpointing "$ckpt" --state-dtype "$state" > "$real" 2> "$real.err"
  row=$("$py" - "$plan" "$real" "$b" "$ckpt" "$state" "$dev" <<'EOF'
import json, sys
plan, real, b, ckpt, state, dev = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
p = json.load(open(plan))
try:
    r = json.loads(open(real).read().splitlines()[-1])
except Exception:
    r = None
fixed, per = p["fixed_mb"], p["activations_per_sample_mb"]
largest = lambda gb: int((gb * 1024 - fixed) // per) if per > 0 else -1
predicted = fixed + b * per
cells = f"{ckpt} | {state} | {per:,.0f} | {fixed:,.0f} | {largest(24)} | {largest(80)} | {b} | {predicted:,.0f}"
if r is None:
    print(f"FAIL|| {cells} | the step failed (out of memory?) |")
    sys.exit()
# CUDA: the allocator's peak (what plan predicts there); CPU: the process's peak RSS
measured = r["peak_mem_mb"] if dev == "cpu" else r["memory"]["peak_mb"]
err = abs(predicted - measured) / measured
ok = err < 0.15 and (dev == "cpu" or measured < 24 * 1024)
print(f"{'PASS' if ok else 'FAIL'}|| {cells} | {measured:,.0f} | {100 * err:.1f}%")
EOF
  )
  say "| ${row#*||} |"
  [ "${row%%||*}" = PASS ] || mem_ok=false
done
if ! $mem_ok; then record "3m memory plan" FAIL "see the memory table"
elif (( mem_skipped > 0 )); then record "3m memory plan" SKIP "$mem_skipped of 2 settings not run: out of time"
else record "3m memory plan" PASS "sdkd plan within 15% of the measured peak at its 24 GB batch"; fi

raw=$out/gpu-bench.jsonl
: > "$raw"
# pair MODE UNET B SDKD_JSON_FILE EAGER_JSON_FILE: one table row, one JSON line into $raw
pair() {
  "$py" - "$shapes/macs.json" "$peak_tflops" "$@" <<'EOF' | tee -a "$report"
import json, sys
macs, peak = json.load(open(sys.argv[1])), float(sys.argv[2]) * 1e12
mode, unet, b, ours, eager = sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7]
ours, eager = json.loads(open(ours).read().splitlines()[-1]), json.loads(open(eager).read().splitlines()[-1])
m = lambda n: 2 * macs[n]["macs"]
flops = b * (m("teacher") + 3 * m(unet)) if mode == "train" else 2 * b * m(unet)
mfu = lambda ms: f"{100 * flops / (ms / 1e3) / peak:.3g}%"
mem = lambda mb: "n/a" if mb is None else f"{mb:,.0f}"
o, e = ours["step_ms_median"], eager["step_ms_median"]
print(f"| {unet} | {b} | {o:,.1f} | {e:,.1f} | **{e / o:.2f}x** | {flops / 1e12:.3g} | {mfu(o)} | {mfu(e)} | "
      f"{mem(ours.get('gpu_peak_allocated_mb'))} | {mem(eager.get('gpu_peak_allocated_mb'))} |")
with open(sys.argv[8], "a") as f:
    f.write(json.dumps({"mode": mode, "unet": unet, "batch": b, "flops_per_step": flops, "sdkd": ours, "pytorch": eager}) + "\n")
EOF
}
oom() { grep -qiE "out of memory|OutOfMemoryError" "$1"; }
header="| %s | batch | sdkd ms/step | PyTorch ms/step | speed-up | TFLOP/step | sdkd MFU | PyTorch MFU | sdkd peak MiB | PyTorch peak MiB |"
sep="|---|---|---|---|---|---|---|---|---|---|"
speed_ok=true speed_skipped=0

say ""
say "### Distillation training step: teacher (bf16, frozen) -> student (fp32 master weights, bf16 compute)"
say ""
say "$(printf "$header" student)"
say "$sep"
for p in bk_base bk_small bk_tiny; do
  done_p=false
  for b in $batches; do
    if (( $(left) < 45 )); then say "| $p | $b | skipped: out of time | | | | | | | |"; speed_skipped=$((speed_skipped + 1)); done_p=true; break; fi
    ours=$out/logs/train-$p-b$b.json eager=$out/logs/train-$p-b$b-eager.json
    t 150 "$sdkd" bench --json --device "$dev" --precision bf16 --teacher "$shapes/teacher.json" --student "$p" \
      --batch-size "$b" --latent-size "$latent" $train_steps > "$ours" 2> "$ours.err"
    rc=$?
    if (( rc != 0 )); then oom "$ours.err" && continue; say "| $p | $b | sdkd failed: $(tail -1 "$ours.err") | | | | | | | |"; speed_ok=false; done_p=true; break; fi
    t 150 "$py" scripts/bench_reference.py --device "$dev" --precision bf16 --teacher "$shapes/teacher.json" \
      --student "$shapes/$p.json" --pairs "$shapes/$p-pairs.json" --batch-size "$b" --latent-size "$latent" $train_steps > "$eager" 2> "$eager.err"
    rc=$?
    if (( rc != 0 )); then oom "$eager.err" && continue; say "| $p | $b | PyTorch failed: $(tail -1 "$eager.err") | | | | | | | |"; speed_ok=false; done_p=true; break; fi
    pair train "$p" "$b" "$ours" "$eager" "$raw" || speed_ok=false
    done_p=true
    break
  done
  $done_p || { say "| $p | | out of memory at every batch of: $batches | | | | | | | |"; speed_ok=false; }
done

say ""
say "### Inference: one denoising step with classifier-free guidance (CFG batch 2), bf16"
say ""
say "$(printf "$header" UNet)"
say "$sep"
for u in teacher bk_base bk_small bk_tiny; do
  if (( $(left) < 25 )); then say "| $u | 1 | skipped: out of time | | | | | | | |"; speed_skipped=$((speed_skipped + 1)); continue; fi
  ours=$out/logs/infer-$u.json eager=$out/logs/infer-$u-eager.json
  student_arg=(--student "$shapes/$u.json"); [ "$u" = teacher ] && student_arg=()
  if t 90 "$sdkd" bench --json --mode infer --device "$dev" --precision bf16 --teacher "$shapes/teacher.json" \
       --student "$u" --latent-size "$latent" $infer_steps > "$ours" 2> "$ours.err" &&
     t 90 "$py" scripts/bench_reference.py --mode infer --device "$dev" --precision bf16 --teacher "$shapes/teacher.json" \
       "${student_arg[@]}" --latent-size "$latent" $infer_steps > "$eager" 2> "$eager.err"; then
    pair infer "$u" 1 "$ours" "$eager" "$raw" || speed_ok=false
  else
    say "| $u | 1 | failed: $(tail -1 "$ours.err" "$eager.err" 2>/dev/null | grep -v '^==>' | grep . | tail -1) | | | | | | | |"; speed_ok=false
  fi
done
if ! $speed_ok; then record "3 speed" FAIL "see the rows marked failed"
elif (( speed_skipped > 0 )); then record "3 speed" SKIP "$speed_skipped of 7 rows not run: out of time"
else record "3 speed" PASS "tables above; raw JSON in gpu-bench.jsonl"; fi

# --- 4. Data parallel -------------------------------------------------------------------------
# One rank (the machine has one GPU; NCCL refuses two ranks on one device): the trainer's whole
# data-parallel path (rendezvous, broadcast, checksums, gradient buckets through the group, the
# agreed stop), which must leave the fp32 curve of 1b unchanged.
say ""
if $dry; then backend=Gloo; else backend=NCCL; fi
say "## 4. Data parallel ($backend, one rank)"
# dp_stage NAME TITLE: the 20 steps under $launch, recorded against the CPU curve
dp_stage() {
  if (( $(left) < 60 )); then record "$2" SKIP "out of time"; return; fi
  if train "$1" 20 fp32; then
    verdict=$(curve_verdict "$work/$1.losses")
    record "$2" "${verdict%%|*}" "${verdict#*|}"
  else
    record "$2" FAIL "sdkd train failed: $(tail -2 "$out/logs/train-$1.txt" | tr '\n' ' ')"
  fi
}
port=$(( 20000 + $$ % 20000 ))
launch=(env RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port)
dp_stage dp-env "4a WORLD_SIZE=1 ($backend) vs the CPU loss curve"
launch=("$py" -m torch.distributed.run --no-python --nproc-per-node 1 --master-port $((port + 1)))
dp_stage dp-torchrun "4b torchrun --nproc-per-node 1 on $dev ($backend) vs the CPU loss curve"
launch=()

# --- Summary ---------------------------------------------------------------------------------
say ""
say "## Summary ($(( $(date +%s) - start )) s)"
say ""
say "| stage | verdict | detail |"
say "|---|---|---|"
failed=0 skipped=0 expected=0
for r in "${results[@]}"; do
  IFS='|' read -r name verdict detail <<< "$r"
  say "| $name | $verdict | $detail |"
  case "$verdict" in
    PASS) ;;
    "SKIP (expected)") expected=$((expected + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
done
say ""
if (( failed + skipped == 0 )); then
  say "gpu-check: every stage passed ($expected expected skip(s))"
else
  say "gpu-check: $failed stage(s) failed, $skipped skipped (a skip that is not the expected one fails the check)"
fi
(( failed + skipped == 0 ))
