#!/usr/bin/env bash
# Set up and run the test suite (CPU). torch first, as a pinned CPU wheel, so pip does not
# pull a multi-GB CUDA build; then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== installing torch==2.13.0 (the first time this is a large download: minutes)"
python -m pip install torch==2.13.0
echo "== installing asyndm (editable) with its test extras"
python -m pip install -e ".[test]"
echo "== running the tests ($(python -c 'import asyndm; print(asyndm.__file__)'))"
python -m pytest "$@"
