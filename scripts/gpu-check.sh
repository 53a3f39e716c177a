#!/usr/bin/env bash
# One script for a borrowed CUDA machine (see docs/benchmarks.md, "GPU"): set up, build, run the
# CUDA tests, then `sdkd bench` on SD-1.5 shapes: the bf16 training step (teacher -> each preset,
# with the GPU memory held) and the inference step (teacher and each preset). Under 8 minutes
# on one H100-class GPU: every stage has its own timeout, and the benches are skipped, not cut,
# when the time left cannot hold them. Everything it measures goes to ${OUT:-gpu-out}/gpu-check.md
# (and the raw JSON lines to gpu-bench.jsonl): paste the tables into docs/benchmarks.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; log="$out/gpu-check.md"; raw="$out/gpu-bench.jsonl"
: > "$raw"
exec > >(tee -a "$log") 2>&1
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-470}   # 8 minutes, less a margin for the report
left() { echo $((budget - ($(date +%s) - start))); }
echo "# gpu-check $(date -u +%FT%TZ), sdkd $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"

echo "## build"
time timeout $(( $(left) - 200 )) make setup build >"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; echo "build failed or ran out of time"; exit 1; }

echo "## CUDA tests"
# Test binaries build in parallel on the machine's cores; the tests themselves pick CUDA through
# SDKD_TEST_DEVICE and the `cuda` name filter.
SDKD_TEST_DEVICE=cuda timeout $(( $(left) - 150 > 60 ? $(left) - 150 : 60 )) \
  cargo test --release -- --include-ignored cuda 2>&1 | grep -E "^test |test result|panicked|error" | tail -25

sdkd=target/release/sdkd
sd15=configs/reference/sd15_unet_config.json
bench() { # label, args...: one JSON line into $raw, one table row on stdout
  local label=$1; shift
  if (( $(left) < 25 )); then echo "| $label | skipped: out of time | | | |"; return; fi
  local line
  line=$(timeout $(( $(left) - 5 )) "$sdkd" bench --json --device cuda "$@" 2>"$out/bench-err.txt" | tail -1)
  if [ -z "$line" ]; then echo "| $label | failed: $(tail -1 "$out/bench-err.txt") | | | |"; return; fi
  echo "{\"label\": \"$label\", \"result\": $line}" >> "$raw"
  python3 - "$label" "$line" <<'EOF'
import json, sys
label, r = sys.argv[1], json.loads(sys.argv[2])
params = r.get("student", r.get("unet", {})).get("params", 0)
gpu = r.get("gpu_mem_mb")
print(f"| {label} | {params / 1e6:.0f}M | {r['step_ms_median']:.1f} | {r['steps_per_s']:.2f} | {'%.0f' % gpu if gpu else 'n/a'} |")
EOF
}

echo "## bf16 training step, SD-1.5 teacher (bf16, frozen) -> student (fp32 master weights, bf16 compute), batch 8, latent 64"
echo "| student | params | ms/step (median) | steps/s | GPU MiB held |"
echo "|---|---|---|---|---|"
for p in bk_base bk_small bk_tiny; do
  bench "$p" --teacher "$sd15" --student "$p" --batch-size 8 --latent-size 64 --steps 10 --warmup 3 --precision bf16
done

echo "## inference, ms per denoising step (CFG batch 2, 512px, bf16)"
echo "| UNet | params | ms/step (median) | steps/s | GPU MiB held |"
echo "|---|---|---|---|---|"
for p in teacher bk_base bk_small bk_tiny; do
  bench "$p" --mode infer --teacher "$sd15" --student "$p" --latent-size 64 --steps 20 --warmup 5 --precision bf16
done
echo "total $(( $(date +%s) - start )) s"
