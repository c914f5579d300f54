#!/usr/bin/env bash
# The prepared accelerator benchmark (effjax/bench/accelerator.py), from the repository root:
#   bench/accelerator.sh --out=results/perf/accelerator --wheels=.whl
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m effjax.bench.accelerator "$@"
