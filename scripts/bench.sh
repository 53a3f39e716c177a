#!/usr/bin/env bash
# `make bench`: sdkd vs the PyTorch eager reference, A/B/A/B, into docs/benchmarks.md.
# The work is in scripts/bench.py (its docstring lists the knobs: SDKD_BENCH_QUICK=1 for a smoke
# run, SDKD_BENCH_ROUNDS, SDKD_BENCH_THREADS, SDKD_BENCH_SECTIONS, SDKD_BENCH_STUDENTS).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/bench.py "$@"
