# Two commands on a fresh machine: `make demo` and `make test`. Both set up first.
CARGO ?= cargo
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup build test demo bench gpu-check clean-runs

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release

test: build
	$(CARGO) test --release

demo: build
	target/release/sdkd demo --out demo-out --overwrite

bench: build
	scripts/bench.sh

clean-runs:
	rm -rf runs demo-out
