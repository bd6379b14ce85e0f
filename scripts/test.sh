#!/usr/bin/env bash
# Sets up and runs the test suite (the README's test command). Installs everything it needs.
# torch is pinned first: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
# tensorrt-rtx-cu13: TensorRT-RTX, real wheels (~330 MB) that parse ONNX and build engines without a GPU
# (tests/test_trt_parse.py); to move into a `trt` extra of pyproject.toml
python3 -m pip install -q torch==2.13.0 -e '.[test]' tensorrt-rtx-cu13==1.7.1.116
# the whole suite minus the long parity runs, plus the bounded part of those marked `ci`;
# run everything with: python3 -m pytest
python3 -m pytest -m "not slow or ci" "$@"
