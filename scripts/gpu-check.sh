#!/usr/bin/env bash
# One script for a borrowed CUDA machine (see docs/benchmarks.md): set up, build, run the CUDA
# tests and the bf16 training-step bench for the SD-1.5 teacher with each preset, in under 8
# minutes. Writes everything it measures to ${OUT:-gpu-out}/gpu-check.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; log="$out/gpu-check.md"
exec > >(tee -a "$log") 2>&1
echo "# gpu-check $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
time make setup build
echo "## CUDA tests"
SDKD_TEST_DEVICE=cuda timeout 180 cargo test --release -- --include-ignored cuda 2>&1 | tail -15
echo "## bf16 training step, SD-1.5 teacher, batch 8, latent 64"
for p in bk_base bk_small bk_tiny; do
  timeout 120 target/release/sdkd bench --teacher configs/reference/sd15_unet_config.json --student "$p" \
    --batch-size 8 --latent-size 64 --steps 10 --device cuda --precision bf16 --json | sed "s/^/$p: /"
done
echo "## inference, ms per denoising step (CFG batch 2, 512px)"
for p in teacher bk_base bk_small bk_tiny; do
  timeout 60 target/release/sdkd bench --mode infer --teacher configs/reference/sd15_unet_config.json \
    --student "$p" --latent-size 64 --steps 20 --device cuda --precision bf16 --json | sed "s/^/$p: /"
done
