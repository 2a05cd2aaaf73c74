#!/usr/bin/env bash
# Set up and run the demo on the embedded model: DM | DM_concave | AsynDM grid + animation.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== installing torch==2.13.0 (the first time this is a large download: minutes)"
python -m pip install torch==2.13.0
echo "== installing asyndm (editable)"
python -m pip install -e .
echo "== running asyndm demo"
asyndm demo --out "${1:-out/demo}"
