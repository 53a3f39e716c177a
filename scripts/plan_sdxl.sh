#!/usr/bin/env bash
# docs/benchmarks.md's SDXL memory table: `sdkd plan` for every SDXL student preset at 1024 px in
# bf16 with bf16 AdamW moments, with and without gradient checkpointing, as one of 8 ranks with
# optim.shard_state and on one rank, on 24/40/80 GB; and SDXL-base's own inference step. The
# teacher is SDXL-base's UNet config (configs/reference/sdxl_unet_config.json, by shape: no
# weights). Probes: widths / 32 at 256 px on this machine's CPU (`--probe-width-divisor 32
# --probe-resolution 256`), so nothing of full size is ever stepped. One plan per preset and
# checkpointing (`--shard-ranks 8`); the one-rank figures are the same plan with the 7/8 of the
# moments that sharding leaves to other ranks added back (what `--shard-ranks 1` prints; plan's
# probes do not depend on the ranks). Prints one JSON line per plan and a Markdown table.
#
# usage: scripts/plan_sdxl.sh [OUT_DIR]      (default target/plan-sdxl)
set -euo pipefail
sdkd=${SDKD:-target/release/sdkd}
cd "$(dirname "$0")/.."
out=${1:-target/plan-sdxl}
mkdir -p "$out/pipe/unet"
cp configs/reference/sdxl_unet_config.json "$out/pipe/unet/config.json"
echo '{"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}' > "$out/pipe/model_index.json"
: > "$out/plans.jsonl"
plan() {  # PRESET CHECKPOINTING [EXTRA...]
  local preset=$1 ckpt=$2; shift 2
  printf 'teacher: pipe\nstudent: %s\noutput_dir: out\ndata:\n  cache: cache\n  resolution: 1024\ntrain:\n  batch_size: 1\n  device: auto\n  precision: bf16\n  gradient_checkpointing: %s\noptim:\n  state_dtype: bf16\nvalidation:\n  every: 0\n' \
    "$preset" "$ckpt" > "$out/$preset-$ckpt.yaml"
  "$sdkd" plan --json --config "$out/$preset-$ckpt.yaml" --device cpu --probe-width-divisor 32 --probe-resolution 256 \
    --gpu-mem 24GB,40GB,80GB --shard-ranks 8 "$@" 2>/dev/null | tee -a "$out/plans.jsonl" | cut -c1-160
}
for preset in ssd_1b vega koala_1b koala_700m; do
  for ckpt in none blocks; do
    extra=(); [ "$preset-$ckpt" = vega-none ] && extra=(--teacher-inference)
    plan "$preset" "$ckpt" "${extra[@]}"
  done
done
.venv/bin/python - "$out/plans.jsonl" <<'PY'
import json, sys
plans = [json.loads(l) for l in open(sys.argv[1])]
gib = lambda mb: mb / 1024
print("| preset | params | gradient_checkpointing | activations per sample GiB | fixed GiB, 1 rank | largest batch 24 / 40 / 80 GB, 1 rank | fixed GiB, 8 ranks | largest batch 24 / 40 / 80 GB, 8 ranks |")
print("|---|---|---|---|---|---|---|---|")
for p in plans:
    per, fixed8 = p["activations_per_sample_mb"], p["fixed_mb"]
    fixed1 = fixed8 + p["optimizer_mb"] * (p["shard_ranks"] - 1)
    largest = lambda fixed: " / ".join(str(max(0, int((g["gpu_mem_mb"] - fixed) // per))) for g in p["gpus"])
    assert largest(fixed8) == " / ".join(str(g["largest_batch"]) for g in p["gpus"])
    print(f"| {p['student']} | {p['student_params']:,} | {p['gradient_checkpointing']} | {gib(per):.2f} | {gib(fixed1):.1f} | {largest(fixed1)} | {gib(fixed8):.1f} | {largest(fixed8)} |")
t = next(p["teacher_inference"] for p in plans if "teacher_inference" in p)
print(f"\nteacher inference: weights {gib(t['weights_mb']):.2f} GiB, {gib(t['activations_per_image_mb']):.3f} GiB per image, fixed {gib(t['fixed_mb']):.2f} GiB; images per CFG step:", [g["largest_batch"] for g in t["gpus"]])
PY
