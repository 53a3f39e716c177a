# Two commands on a fresh machine: `make demo` and `make test`. Both set up first.
CARGO ?= cargo
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup build test demo bench gpu-build gpu-dry-run clean-runs

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release

test: build
	python3 scripts/import_cycles.py
	python3 scripts/fn_lengths.py
	$(CARGO) test --release

demo: build
	target/release/sdkd demo --out demo-out --overwrite $(DEMO_ARGS)

bench: build
	scripts/bench.sh

# gpu-bin/ for a lent GPU machine (sdkd built against its LibTorch, fixtures, wheels), and its
# check run here on the CPU (docs/benchmarks.md, "GPU")
gpu-build: setup
	scripts/gpu-build.sh

gpu-dry-run: gpu-build
	GPU_CHECK_BUDGET_S=$${GPU_CHECK_BUDGET_S:-900} scripts/gpu-check.sh --cpu-dry-run

clean-runs:
	rm -rf runs demo-out
