#!/usr/bin/env bash
# Set up and run the test suite (CPU). torch first, as a pinned CPU wheel, so pip does not
# pull a multi-GB CUDA build; then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
python -m pytest "$@"
