#!/usr/bin/env bash
# Builds the C# client with mono's C# compiler (Debian: apt-get install mono-devel):
#   bin/RwkvDeploy.dll     the library (manifest, state loop, tokenizers, sampling, golden check, ONNX Runtime C API)
#   bin/rwkv-deploy-cs.exe the command-line program (run it with `mono bin/rwkv-deploy-cs.exe ...`)
# The Microsoft.ML.OnnxRuntime binding (src/RwkvDeploy/OrtDotnet.cs) is compiled only by `dotnet build` (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
command -v mcs >/dev/null || { echo "error: mcs (the mono C# compiler) is not installed: apt-get install mono-devel" >&2; exit 2; }
mkdir -p bin
FLAGS=(-langversion:7 -optimize+ -nologo)
mcs "${FLAGS[@]}" -target:library -out:bin/RwkvDeploy.dll \
    -r:System.Json.dll \
    $(ls src/RwkvDeploy/*.cs | grep -v OrtDotnet.cs)
mcs "${FLAGS[@]}" -target:exe -out:bin/rwkv-deploy-cs.exe -r:bin/RwkvDeploy.dll src/Cli/Program.cs
