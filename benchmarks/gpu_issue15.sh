#!/usr/bin/env bash
# Issue 15's GPU measurements in one script (about 5 minutes of an H200, compiles included):
# SD 2.1-base UNet, fp16, 512 px, batch 1 with CFG, DM and AsynDM eager and compiled,
# interleaved in one process; then the operator / sync profile with compiled graphs.
#
# usage:  benchmarks/gpu_issue15.sh [OUT]          (OUT default: out/gpu_issue15)
#         DEVICE=cpu DTYPE=float32 RES=128 STEPS=4 REPEATS=1 BACKEND=eager \
#             benchmarks/gpu_issue15.sh out/gpu_issue15_check
#           (the same script, small, as a check on a CPU before a device is lent)
# Keep OUT in the repository (benchmarks/results/) and write the numbers into README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/gpu_issue15}"
mkdir -p "$out"
dev=(--device "${DEVICE:-cuda}" --dtype "${DTYPE:-float16}")
res="${RES:-512}"
python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/versions.txt"
for mode in default reduce-overhead; do
    echo "== SD 2.1, eager and compiled ($mode), interleaved =="
    python benchmarks/bench_sd21.py "${dev[@]}" --resolution "$res" --steps "${STEPS:-10}" \
        --repeats "${REPEATS:-4}" --compile "$mode" \
        --compile-backend "${BACKEND:-inductor}" --json "$out/sd21_$mode.json" \
        | tee "$out/sd21_$mode.log"
done
echo "== operators and host syncs per step, compiled graphs =="
python benchmarks/profile_overhead.py "${dev[@]}" --resolution "$res" --iters 5 \
    --compile default --compile-backend "${BACKEND:-inductor}" | tee "$out/profile.log"
