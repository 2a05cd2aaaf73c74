#!/usr/bin/env bash
# Set up and run the demo on the embedded model: DM | DM_concave | AsynDM grid + animation.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
asyndm demo --out "${1:-out/demo}"
