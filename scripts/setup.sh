#!/usr/bin/env bash
# Idempotent set-up: a project-local .venv holding PyPI torch==2.13.0 (the only LibTorch this
# machine can reach) and the reference packages the tests compare against. Fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.setup-stamp
want=$(cat scripts/constraints.txt scripts/requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -e .venv/libtorch/lib/libtorch.so ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade-strategy only-if-needed \
  -c scripts/constraints.txt -r scripts/requirements-test.txt
# open-clip-torch is installed only for its data file (OpenAI's BPE merges), so without its deps.
.venv/bin/python -m pip install -q --no-deps open-clip-torch==3.3.0
# peft is the LoRA referee (diffusers' load_lora_weights needs it too); it and accelerate, which
# peft imports, go in without their deps so that nothing can move torch.
.venv/bin/python -m pip install -q --no-deps peft==0.21.2 accelerate==1.16.0
# The CUDA headers NCCL's c10d header includes that torch's own nvidia packages lack (crt/ and
# CCCL; header-only, 3 MB), so build.rs compiles the NCCL process group (docs/distributed.md).
.venv/bin/python -m pip install -q --no-deps nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85
site=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$site" .venv/libtorch
.venv/bin/python -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
echo "$want" > "$stamp"
echo "setup: .venv ready (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
