#!/usr/bin/env bash
# Train the embedded model (src/asyndm/shapes/weights/shapes-base) again, in its three stages.
#
#   bash scripts/train_embedded.sh [DEVICE] [RUN_ROOT]      # default: cuda runs/embedded
#
# Each stage starts from the previous stage's exported EMA weights (--init-from) with a fresh
# optimiser. The shipped weights were trained with time budgets on one NVIDIA H200 (2.5 + 7.0
# + 2.6 minutes); here --max-steps fixes the step counts those budgets reached, so the data
# stream and schedule are the same on any machine (bit-equality also needs the same device
# kind and library versions). On a 2-core CPU (45-60 images/s) the 1.66 M images take
# 8-10 hours; use a GPU.
# Then: cp -r RUN_ROOT/stage3/model/{unet,text_encoder} src/asyndm/shapes/weights/shapes-base/
set -euo pipefail
DEV=${1:-cuda}
ROOT=${2:-runs/embedded}
common=(--device "$DEV" --num-workers 12 --render-on-device --minutes 10000 --log-every 50
        --checkpoint-every-minutes 2)
asyndm train-shapes --out "$ROOT/stage1" "${common[@]}" --max-steps 1046 --batch-size 512 \
    --lr 3e-4 --warmup-steps 500
asyndm train-shapes --out "$ROOT/stage2" "${common[@]}" --max-steps 3124 --batch-size 256 \
    --lr 4e-4 --warmup-steps 200 --init-from "$ROOT/stage1/model"
asyndm train-shapes --out "$ROOT/stage3" "${common[@]}" --max-steps 1272 --batch-size 256 \
    --lr 1.5e-4 --warmup-steps 50 --init-from "$ROOT/stage2/model"
python scripts/plot_training_stages.py "$ROOT/stage1" "$ROOT/stage2" "$ROOT/stage3" \
    --out "$ROOT/loss_curve.png"
