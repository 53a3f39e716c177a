#!/usr/bin/env bash
# Builds gpu-bin/: what a lent GPU machine needs to run scripts/gpu-check.sh in one call. That
# machine has no Rust, no network and its own PyTorch (at last reading torch 2.11 at
# /opt/torch/.venv, Python 3.12, transformers but no diffusers), and a call carries at most
# 64 MiB. So this builds, here, a second sdkd against that machine's LibTorch version (the main
# build stays on 2.13) and packs it with tiny fixtures, CPU reference outputs and the diffusers
# wheels of the eager reference.
#
# usage: scripts/gpu-build.sh [TORCH_VERSION]     (default 2.11.0; or SDKD_GPU_TORCH)
#
# Cache (the torch wheel, its unpacked package, patchelf): ${XDG_CACHE_HOME:-~/.cache}/sdkd, or
# SDKD_CACHE. The copy of the tree and its build live in target/gpu-build/ and are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
torch_version=${1:-${SDKD_GPU_TORCH:-2.11.0}}
# The tch release that binds each LibTorch minor version (tch's README; tch 0.26 does not
# compile against 2.11's headers).
case "${torch_version%.*}" in
  2.11) tch_version=0.24.0 ;;
  2.12) tch_version=0.25.0 ;;
  2.13) tch_version=0.26.0 ;;
  *) echo "gpu-build: torch $torch_version: no tch release known for it (2.11, 2.12, 2.13)" >&2; exit 1 ;;
esac
cache=${SDKD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sdkd}
site=$cache/torch-$torch_version/site    # the wheel unpacked: site/torch is its LibTorch
out=$root/gpu-bin
python=$root/.venv/bin/python
step() { echo "gpu-build: $*"; }

scripts/setup.sh   # the .venv: pip, diffusers (fixtures, MACs) and the project's own LibTorch

# 1. The torch wheel, once. Unpacked whole: its lib/ and include/ are the LibTorch to build
#    against, and the whole package lets the dry run import that same torch version.
if [ ! -e "$site/torch/lib/libtorch_cpu.so" ]; then
  mkdir -p "$cache/wheels"
  wheel=$(ls "$cache"/wheels/torch-"$torch_version"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    step "downloading torch==$torch_version (once, into $cache/wheels)"
    "$python" -m pip download -q --no-deps "torch==$torch_version" -d "$cache/wheels"
    wheel=$(ls "$cache"/wheels/torch-"$torch_version"-*.whl | head -1)
  fi
  step "unpacking $(basename "$wheel")"
  rm -rf "$site.partial"
  mkdir -p "$site.partial"
  (cd "$site.partial" && unzip -q "$wheel")
  rm -rf "$site"
  mv "$site.partial" "$site"
fi
# The torchvision of that torch, beside it: the dry run imports the .venv's transformers, which
# imports any torchvision it finds, and the .venv's is built for torch 2.13.
vision_version=$(case "${torch_version%.*}" in 2.11) echo 0.26.0 ;; 2.12) echo 0.27.0 ;; 2.13) echo 0.28.0 ;; esac)
if [ ! -e "$site/torchvision-$vision_version.dist-info" ]; then
  step "downloading torchvision==$vision_version (once, into $cache/wheels)"
  "$python" -m pip download -q --no-deps "torchvision==$vision_version" -d "$cache/wheels"
  (cd "$site" && unzip -q -o "$(ls "$cache"/wheels/torchvision-"$vision_version"-*.whl | head -1)")
fi
libtorch=$site/torch

# patchelf, to drop the rpath build.rs bakes in (it names this machine's cache, not the device's
# torch, which gpu-check.sh puts on LD_LIBRARY_PATH).
patchelf=$(command -v patchelf || true)
if [ -z "$patchelf" ]; then
  patchelf=$(ls "$cache"/patchelf/*/scripts/patchelf "$cache"/patchelf/*/patchelf 2>/dev/null | head -1 || true)
  if [ -z "$patchelf" ]; then
    step "downloading patchelf (once)"
    rm -rf "$cache/patchelf"
    "$python" -m pip download -q --no-deps --only-binary=:all: patchelf -d "$cache/patchelf"
    (cd "$cache/patchelf" && unzip -q -o ./*.whl)
    patchelf=$(ls "$cache"/patchelf/*/scripts/patchelf | head -1)
    chmod +x "$patchelf"
  fi
fi

# 2. A copy of the tree with the matching tch pin, built into its own target dir. Only files
#    whose content changed are copied (getting a new mtime), so cargo rebuilds exactly those.
src=$root/target/gpu-build/src-$torch_version
target_dir=$root/target/gpu-build/target-$torch_version
mkdir -p "$src"
while IFS= read -r f; do
  if ! cmp -s "$f" "$src/$f"; then mkdir -p "$src/$(dirname "$f")"; cp "$f" "$src/$f"; fi
done < <(find src csrc tests benches configs assets build.rs -type f)
while IFS= read -r f; do
  [ -e "$f" ] || rm "$src/$f"
done < <(cd "$src" && find src csrc tests benches configs assets -type f)
# cargo moves tch and torch-sys in the copied lock to the pinned release (once per lock: offline
# reruns need no registry)
if ! cmp -s Cargo.lock "$src/Cargo.lock.main"; then cp Cargo.lock "$src/Cargo.lock"; cp Cargo.lock "$src/Cargo.lock.main"; fi
sed "s/^tch = \".*\"/tch = \"=$tch_version\"/" Cargo.toml > "$src/Cargo.toml.new"
grep -q "^tch = \"=$tch_version\"" "$src/Cargo.toml.new" || { echo "gpu-build: no tch line to pin in Cargo.toml" >&2; exit 1; }
if cmp -s "$src/Cargo.toml.new" "$src/Cargo.toml"; then rm "$src/Cargo.toml.new"; else mv "$src/Cargo.toml.new" "$src/Cargo.toml"; fi
step "building sdkd with tch $tch_version against LibTorch $torch_version (target/gpu-build/)"
# The wheel alone has no CUDA or NCCL headers: those of the .venv's nvidia packages (the same
# CUDA 13.0; setup.sh adds crt/ and CCCL) let build.rs compile the NCCL process group.
nvidia=$("$python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__file__) if nvidia.__file__ else list(nvidia.__path__)[0])')
export SDKD_CUDA_INCLUDE=$nvidia/cu13/include:$nvidia/cu13/include/cccl:$nvidia/nccl/include
export LIBTORCH=$libtorch LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR=$target_dir
(cd "$src" && cargo build --release --bin sdkd)
# It must have the NCCL process group (build.rs compiles it out, with a warning, when the CUDA
# and NCCL headers are missing; `sdkd --version` says which it has).
nvidia_libs=$(ls -d "$root"/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | paste -sd: -)
version=$(LD_LIBRARY_PATH="$libtorch/lib:$nvidia_libs" "$target_dir/release/sdkd" --version)
case "$version" in
  *"process groups: gloo nccl"*) step "built: $version" ;;
  *) echo "gpu-build: $version: built without NCCL; the GPU build needs the CUDA and NCCL headers (SDKD_CUDA_INCLUDE: $SDKD_CUDA_INCLUDE)" >&2; exit 1 ;;
esac
# The mixed-precision test (tests/precision.rs) as a binary: on the device it runs its CUDA case.
precision_test=$(cd "$src" && cargo test --release --test precision --no-run --message-format=json 2>/dev/null |
  "$python" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "precision":
        print(m["executable"])')
[ -x "$precision_test" ] || { echo "gpu-build: the precision test binary was not built" >&2; exit 1; }

# 3. gpu-bin/: the binaries without rpath, and the fixtures.
rm -rf "$out.partial"
mkdir -p "$out.partial/bin" "$out.partial/reference" "$out.partial/wheels"
cp "$target_dir/release/sdkd" "$out.partial/bin/sdkd"
cp "$precision_test" "$out.partial/bin/precision-test"
for f in "$out.partial"/bin/*; do
  "$patchelf" --remove-rpath "$f"
  strip "$f"
done
echo "$torch_version" > "$out.partial/torch-version"
echo "$tch_version" > "$out.partial/tch-version"
git rev-parse --short HEAD > "$out.partial/commit" 2>/dev/null || echo unknown > "$out.partial/commit"
echo "$site" > "$out.partial/build-torch-site"   # what the dry run here imports as the device's torch

# The 2.11 binary runs here on that LibTorch and the .venv's CUDA libraries (fixtures, configs).
# The CPU references of gpu-check.sh's stage 1 come from another build, the main one (LibTorch
# 2.13, target/release/sdkd): a reference the checked binary made itself would pass whatever it
# computes.
sdkd() { LD_LIBRARY_PATH="$libtorch/lib:$nvidia_libs" "$out.partial/bin/sdkd" "$@"; }
step "the main build, for the references (cargo build --release)"
(unset LIBTORCH LIBTORCH_CXX11_ABI CARGO_TARGET_DIR SDKD_CUDA_INCLUDE; cargo build --release --bin sdkd)
ref_sdkd() { env -u LD_LIBRARY_PATH "$root/target/release/sdkd" "$@"; }
echo "$(ref_sdkd --version), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), target/release/sdkd" > "$out.partial/reference/made-by"

step "fixtures: tiny pipeline, synthetic data, CPU references"
"$python" tests/reference/make_pipeline.py "$out.partial/pipeline" --stages 4 --sample-size 8 --scheduler ddpm \
  > "$out.partial/make_pipeline.log" 2>&1 || { cat "$out.partial/make_pipeline.log" >&2; exit 1; }
rm "$out.partial/make_pipeline.log"
# Its weights stored in fp16 (8 MB less to carry); sdkd loads them into its fp32 models, and the
# references below are computed from these very files.
"$python" - "$out.partial/pipeline" <<'EOF'
import glob, sys
from safetensors.torch import load_file, save_file
for path in glob.glob(f"{sys.argv[1]}/*/*.safetensors"):
    save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
EOF
sdkd synth --out "$out.partial/data" --count 40 --resolution 16 >/dev/null
ref_sdkd generate --model "$out.partial/pipeline" --prompt "two small red circles on a blue background" --scheduler unipc \
  --steps 20 --seed 1 --width 32 --height 32 --device cpu --out "$out.partial/reference/cpu.png" >/dev/null
# An LCM student of the tiny pipeline (its UNet with time_cond_proj_dim, docs/lcm.md) and its
# 4-step CPU image, for gpu-check.sh's stage 1d.
"$python" tests/reference/lcm_unet.py "$out.partial/pipeline/unet" "$out.partial/lcm_unet" >/dev/null
ref_sdkd generate --model "$out.partial/pipeline" --unet "$out.partial/lcm_unet" --prompt "two small red circles on a blue background" \
  --scheduler lcm --steps 4 --guidance-scale 6 --seed 1 --width 32 --height 32 --device cpu --out "$out.partial/reference/cpu-lcm.png" >/dev/null

# The run YAML of gpu-check.sh's training stages (@...@ filled in there): the tiny pipeline as
# teacher, bk_small, 20 steps, a checkpoint every 10 for the resume check, a loss every step. A
# constant learning rate after the warm-up, so that a run stopped at step 10 (max_steps 10) and
# resumed to 20 follows the same schedule as 20 straight steps (cosine's depends on max_steps).
cat > "$out.partial/train.yaml.in" <<'EOF'
teacher: @ROOT@/pipeline
student: bk_small
output_dir: @RUN@
data:
  path: @ROOT@/data
  resolution: 16
train:
  batch_size: 4
  grad_accum: 2
  max_steps: @STEPS@
  seed: 7
  device: @DEVICE@
  precision: @PRECISION@
  ema_decay: 0.9
optim:
  lr: 1.0e-3
  schedule: constant
  warmup_steps: 2
checkpoint:
  every: 10
  keep: 3
log:
  every: 1
validation:
  every: 0
EOF
# Its losses on the CPU by the main build (one "step N/M (..%) loss X" line per step on stderr)
# are the curve that CUDA (and, in the dry run, the 2.11 build on the CPU) must follow.
ref_run=$out.partial/reference/train
mkdir -p "$ref_run"
sed -e "s|@ROOT@|$out.partial|" -e "s|@RUN@|$ref_run/run|" -e "s|@STEPS@|20|" -e "s|@DEVICE@|cpu|" \
  -e "s|@PRECISION@|fp32|" "$out.partial/train.yaml.in" > "$ref_run/run.yaml"
ref_sdkd train --config "$ref_run/run.yaml" > /dev/null 2> "$ref_run/log.txt" || { cat "$ref_run/log.txt" >&2; exit 1; }
sed -n 's|^step \([0-9]*\)/[0-9]* ([0-9.]*%) loss \([^ ]*\) .*|\1 \2|p' "$ref_run/log.txt" > "$out.partial/reference/cpu-losses.txt"
if [ "$(wc -l < "$out.partial/reference/cpu-losses.txt")" != 20 ]; then
  echo "gpu-build: the CPU run did not log 20 losses" >&2; cat "$ref_run/log.txt" >&2; exit 1
fi
rm -rf "$ref_run"

# A `method: lcm` run of the same teacher (bk_small pruned on the spot, its guidance embedding
# initialised from the seed), for gpu-check.sh's stage 1e: 2 steps on the CPU by the main build,
# no warm-up, so that step 2's loss follows one real update.
sed -e 's|^student: bk_small|student: bk_small\nmethod: lcm|' -e 's|^  warmup_steps: 2|  warmup_steps: 0|' "$out.partial/train.yaml.in" > "$out.partial/lcm.yaml.in"
grep -q '^method: lcm' "$out.partial/lcm.yaml.in" || { echo "gpu-build: no method line in lcm.yaml.in" >&2; exit 1; }
sed -e "s|@ROOT@|$out.partial|" -e "s|@RUN@|$ref_run-lcm-run|" -e "s|@STEPS@|2|" -e "s|@DEVICE@|cpu|" \
  -e "s|@PRECISION@|fp32|" "$out.partial/lcm.yaml.in" > "$ref_run-lcm.yaml"
ref_sdkd train --config "$ref_run-lcm.yaml" > /dev/null 2> "$ref_run-lcm.txt" || { cat "$ref_run-lcm.txt" >&2; exit 1; }
sed -n 's|^step \([0-9]*\)/[0-9]* ([0-9.]*%) loss \([^ ]*\) .*|\1 \2|p' "$ref_run-lcm.txt" > "$out.partial/reference/cpu-lcm-losses.txt"
[ "$(wc -l < "$out.partial/reference/cpu-lcm-losses.txt")" = 2 ] || { echo "gpu-build: the CPU lcm run did not log 2 losses" >&2; cat "$ref_run-lcm.txt" >&2; exit 1; }
rm -rf "$ref_run-lcm-run" "$ref_run-lcm.yaml" "$ref_run-lcm.txt"

# SDXL, for gpu-check.sh's SDXL stage: SDXL-base's UNet config (the GPU's 1024 px step) and, for
# the dry run, the same blocks with every width divided by 16 (a few seconds a step on a CPU), with
# the MACs of one forward of each at its latent (pooled embedding and time ids included).
mkdir -p "$out.partial/reference/sdxl"
cp configs/reference/sdxl_unet_config.json "$out.partial/reference/sdxl/base.json"
"$python" - "$out.partial/reference/sdxl" > "$out.partial/reference/sdxl/macs.json" <<'EOF_PY'
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel
d, out = sys.argv[1], {}
tiny = json.load(open(f"{d}/base.json"))
tiny.update(block_out_channels=[w // 16 for w in tiny["block_out_channels"]], norm_num_groups=4, cross_attention_dim=128,
            addition_time_embed_dim=16, projection_class_embeddings_input_dim=1280 // 16 + 6 * 16)
json.dump(tiny, open(f"{d}/tiny.json", "w"), indent=1)
for name, latent in [("base", 128), ("tiny", 8)]:
    config = json.load(open(f"{d}/{name}.json"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        cond = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.randn(1, 6)}
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(torch.randn(1, 4, latent, latent), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, config["cross_attention_dim"]),
                 added_cond_kwargs=cond)
    out[name] = {"latent": latent, "macs": counter.get_total_flops() / 2, "params": sum(p.numel() for p in unet.parameters())}
print(json.dumps(out, indent=1))
EOF_PY

# The students of the speed stage as diffusers configs and feature pairs (what the eager
# reference builds), and the MACs of one forward of each UNet (FLOPs = 2 MACs) for the MFU:
# SD-1.5 at 512x512 (latent 64) for the GPU, the medium config at latent 16 for the dry run.
step "student configs and MACs"
for teacher in sd15:configs/reference/sd15_unet_config.json:64 medium:configs/bench/medium_unet_config.json:16; do
  IFS=: read -r name config latent <<< "$teacher"
  d=$out.partial/reference/$name
  mkdir -p "$d"
  cp "$config" "$d/teacher.json"
  for p in bk_base bk_small bk_tiny; do
    sdkd inspect --unet "$config" --student "$p" --json > "$d/inspect.json"
    "$python" -c 'import json, sys
s = json.load(open(sys.argv[1]))["student"]
json.dump(s["config"], open(sys.argv[2] + ".json", "w"), indent=1)
json.dump([[f["teacher"], f["student"]] for f in s["feature_pairs"]], open(sys.argv[2] + "-pairs.json", "w"))' "$d/inspect.json" "$d/$p"
  done
  rm "$d/inspect.json"
  "$python" - "$d" "$latent" > "$d/macs.json" <<'EOF'
# Counted by torch.utils.flop_counter on diffusers' UNet built from the same config (sdkd's UNet
# matches diffusers' layer for layer), on the meta device: shapes only, no arithmetic.
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers import UNet2DConditionModel
d, latent = sys.argv[1], int(sys.argv[2])
out = {"latent": latent, "tokens": 77, "batch": 1}
for name in ["teacher", "bk_base", "bk_small", "bk_tiny"]:
    config = json.load(open(f"{d}/{name}.json"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        x = torch.randn(1, config.get("in_channels", 4), latent, latent)
        ctx = torch.randn(1, 77, config["cross_attention_dim"])
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet(x, torch.tensor([500]), encoder_hidden_states=ctx)
    by_op = {str(k).removeprefix("aten."): v / 2 for k, v in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops() / 2
    # bmm: attention's QK^T and AV products, which BK-SDM's published MACs leave out
    out[name] = {"macs": total, "macs_without_attention_products": total - by_op.get("bmm", 0), "by_op": by_op}
print(json.dumps(out, indent=1))
EOF
done

# Wheels for the eager reference: diffusers and those of its requirements a torch + transformers
# install may lack (huggingface_hub in a version diffusers accepts, importlib_metadata and its
# own, Pillow); gpu-check.sh installs only what the device's Python is missing.
step "wheels: diffusers and the pure-Python requirements it may miss"
"$python" -m pip download -q --no-deps -d "$out.partial/wheels" \
  "diffusers==$("$python" -c 'import diffusers; print(diffusers.__version__)')" \
  "huggingface_hub==$("$python" -c 'import huggingface_hub; print(huggingface_hub.__version__)')" \
  importlib_metadata zipp lazy-importer
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$out.partial/wheels" Pillow

rm -rf "$out"
mv "$out.partial" "$out"
size=$(du -sb "$out" | cut -f1)
limit=$((64 * 1024 * 1024))
step "gpu-bin/ is $((size / 1024)) KiB (limit of a device call: 65536 KiB)"
du -sh "$out"/* | sed 's/^/  /'
if [ "$size" -ge "$limit" ]; then echo "gpu-build: gpu-bin/ is over 64 MiB" >&2; exit 1; fi
