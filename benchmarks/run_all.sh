#!/usr/bin/env bash
# Run every benchmark case with small step counts (about 10 minutes on a 2-core CPU).
#
# usage:  benchmarks/run_all.sh                              # CPU, float32
#         benchmarks/run_all.sh --device cuda --dtype float16
# Results (JSON) go to $BENCH_OUT (default out/benchmarks); the tables are printed.
# On a GPU, raise --steps / --repeats by hand for steadier medians (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${BENCH_OUT:-out/benchmarks}"
mkdir -p "$out"
device_args=("$@")  # only --device / --dtype: every script takes both

echo "== 1. SD 2.1-base UNet, 512 px, CFG, DM vs AsynDM vs naive =="
python benchmarks/bench_sd21.py --steps 4 --repeats 1 --naive --threads 1 \
    --json "$out/sd21.json" "${device_args[@]}"

echo "== 2. embedded model, full pipeline, demo settings (25 steps) =="
python benchmarks/bench_embedded.py --steps 25 --repeats 3 --threads 1 \
    --json "$out/embedded.json" "${device_args[@]}"

echo "== 3. where the overhead goes: operators per UNet call (SD 2.1-base UNet) =="
python benchmarks/profile_overhead.py --resolution 256 --iters 0 --threads 1 "${device_args[@]}"
