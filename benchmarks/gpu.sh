#!/bin/sh
# The paper-scale benchmark on one GPU (see benchmarks/gpu.py --help); extra flags pass through.
cd "$(dirname "$0")/.." && exec python benchmarks/gpu.py --json "${GPU_JSON:-gpu.json}" "$@"
