#!/usr/bin/env bash
# The CPU goals side by side with PyTorch eager, each an interleaved A/B in its own process
# (benchmarks/RESULTS.md, "CPU goals per CPU model"): training steps and forward passes at 256x256,
# and native-size inference at 500x500 (the paper's Table 1 setting). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
ab() { $PY -m benchmarks.cpu_ab "$@" 2>&1 | grep -v -i warning; echo; }
ab --arch fcn8s --size 256 --rounds 7 --variants jax jax-amd torch
ab --arch fcn32s --size 256 --rounds 5 --variants jax torch
ab --arch fcn_googlenet --size 256 --rounds 7 --variants jax jax-eigen torch
for arch in fcn8s fcn32s fcn_googlenet fcn_alexnet; do
  ab --arch $arch --size 256 --step forward --rounds 5 --variants jax torch
done
for arch in fcn32s fcn8s fcn_googlenet fcn_alexnet; do
  ab --arch $arch --size 500 --step forward --rounds 3 --variants jax torch
done
