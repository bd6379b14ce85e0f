"""`rwkv-deploy triton`: an export folder -> a Triton Inference Server model repository, written atomically.

    REPO/rwkv_deploy_triton.json          # what wrote it, from what (Triton ignores files beside the models)
    REPO/<name>/config.pbtxt              # sequence batcher; onnxruntime/tensorrt: implicit state (config.py)
    REPO/<name>/initial_state/*.bin       # non-zero initial states (v4's pp, state-tuned models)
    onnxruntime: REPO/<name>/1/model.onnx (+ weights.onnx.data)        the step graph with the token guard
    tensorrt:    REPO/<name>/onnx/model.onnx (+ weights), build_plan.sh  -> 1/model.plan, built on the target GPU
    python:      REPO/<name>/1/model.py, REPO/<name>/1/export/         our Session; state per correlation id
"""
from __future__ import annotations

import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import RWKVDeployError, check_batch
from ..runtime.manifest import MANIFEST, Manifest, check_schema, read_manifest, write_json_atomic
from ..staging import check_destination, destination, sigterm_raises_exit, staged
from .config import (BACKENDS, IDLE_SECONDS, INITIAL_STATE_DIR, STRATEGIES, config_text, initial_state_file,
                     state_needs_file)

log = logging.getLogger(__name__)

MARKER = "rwkv_deploy_triton.json"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # a model name is a folder name and a URL path part
MAX_BATCH = 1024


@sigterm_raises_exit
def write_repository(export, out, *, backend: str = "onnxruntime", max_batch: int = 8, strategy: str = "oldest",
                     name: str = "rwkv", force: bool = False) -> Path:
    """Write a Triton model repository serving the export folder `export` at `out`; returns its path. Nothing is
    left at `out` on failure; an existing non-empty `out` is replaced only with force, and only if this command
    wrote it."""
    if backend not in BACKENDS:
        raise RWKVDeployError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if strategy not in STRATEGIES:
        raise RWKVDeployError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    max_batch = check_batch(max_batch)
    if max_batch > MAX_BATCH:
        raise RWKVDeployError(f"--max-batch {max_batch} is more than {MAX_BATCH}; Triton batches are GPU batches")
    if not NAME.fullmatch(name):  # fullmatch: `$` would accept a trailing newline
        raise RWKVDeployError(f"model name {name!r} must be letters, digits, '_', '.' or '-' (at most 100)")
    m = read_manifest(export)
    if backend != "python" and m.custom_op_library("CPUExecutionProvider") is not None:
        raise RWKVDeployError(f"{export} is a fused export (rwkv custom ops), which Triton's {backend} backend "
                              "cannot run; re-export with --wkv portable, or use --backend python")
    out = destination(out)
    src = Path(export).resolve()
    if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
        raise RWKVDeployError(f"-o {out} overlaps the export folder {src}; choose a folder outside it")
    check_destination(out, force, src, "the export being served", lambda o: (o / MARKER).is_file(),
                      f"a repository written by `rwkv-deploy triton` (no {MARKER})")
    with staged(out, "repository") as tmp:
        model = tmp / name
        (model / "1").mkdir(parents=True)
        WRITERS[backend](m, model, max_batch, strategy)
        if backend != "python":
            _initial_states(m, model)
        write_json_atomic(tmp / MARKER, {
            "written_by": f"rwkv-deploy {__version__}", "source": str(src), "model": name, "backend": backend,
            "strategy": strategy, "max_batch": max_batch, "rwkv_version": m["rwkv_version"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    log.info("wrote the Triton model repository %s (model %r, %s backend, %s strategy, max batch %d)",
             out, name, backend, strategy, max_batch)
    return out


def _write_config(model: Path, text: str) -> None:
    (model / "config.pbtxt").write_text(text)


def _copy_graph(m: Manifest, dest: Path, ready: bool) -> None:
    """The step graph with the token guard (graph.py), and its weights file beside it (same relative name)."""
    from .graph import guard_tokens

    g = m.graph("step")
    dest.mkdir(parents=True, exist_ok=True)
    guard_tokens(m.path("graphs.step.file", g["file"]), dest / "model.onnx", g["tokens"], int(m["vocab_size"]),
                 ready)
    if g.get("external_data"):
        shutil.copyfile(m.path("graphs.step.external_data", g["external_data"]), dest / g["external_data"])


def _onnxruntime(m: Manifest, model: Path, max_batch: int, strategy: str) -> None:
    _copy_graph(m, model / "1", ready=strategy == "direct")
    _write_config(model, config_text(m, model.name, "onnxruntime", max_batch, strategy))


def _tensorrt(m: Manifest, model: Path, max_batch: int, strategy: str) -> None:
    """A plan is specific to a GPU and a TensorRT version, so it is built where it runs (inside the Triton
    container, by trtexec) from the guarded graph; build_plan.sh holds the command with the batch profile.
    --stronglyTyped (TensorRT 10): every tensor keeps the export's dtype, so an fp16 export's fp32 islands (the
    WKV state) stay fp32; --fp16 would let TensorRT run them in fp16 (docs/tensorrt.md: precision follows the
    export)."""
    _copy_graph(m, model / "onnx", ready=strategy == "direct")
    _write_config(model, config_text(m, model.name, "tensorrt", max_batch, strategy))

    def shapes(batch: int) -> str:
        dims = [f"{m.graph('step')['tokens']}:{batch}"] + [f"{s.input}:{'x'.join(map(str, [batch, *s.shape[1:]]))}"
                                                           for s in m.state]
        if strategy == "direct":
            dims.append(f"READY:{batch}x1")
        return ",".join(dims)

    script = model / "build_plan.sh"
    script.write_text(
        "#!/bin/sh\n# Build 1/model.plan for this GPU and TensorRT version: run inside the Triton container, e.g.\n"
        "#   docker run --gpus all --rm -v $PWD:/models nvcr.io/nvidia/tritonserver:<xx.yy>-py3 "
        f"sh /models/{model.name}/build_plan.sh\n"
        "set -e\ncd \"$(dirname \"$0\")\"\n"
        f"trtexec --onnx=onnx/model.onnx --saveEngine=1/model.plan --minShapes='{shapes(1)}' "
        f"--optShapes='{shapes(max_batch)}' --maxShapes='{shapes(max_batch)}' --stronglyTyped\n")
    script.chmod(0o755)


def _python(m: Manifest, model: Path, max_batch: int, strategy: str) -> None:
    shutil.copyfile(Path(__file__).with_name("python_model.py"), model / "1" / "model.py")
    export = model / "1" / "export"
    export.mkdir()
    # The export as OnnxSession reads it: no TensorRT engines (gigabytes, never used here), so the copy's manifest
    # lists none, and their records and data loader, which the manifest does not name, stay behind too.
    served = Manifest(m, engines=[]) if "engines" in m else Manifest(m)
    served.folder = m.folder
    check_schema(served, export / MANIFEST)
    write_json_atomic(export / MANIFEST, served)
    for key, rel in served.named_paths():  # the files the manifest names, and nothing else (no verify.json, no strays)
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.path(key, rel), export / rel)
    params = {"export": "export", "idle_seconds": str(IDLE_SECONDS), "threads": "", "trust_custom_ops": "false"}
    _write_config(model, config_text(m, model.name, "python", max_batch, strategy, params))


WRITERS = {"onnxruntime": _onnxruntime, "tensorrt": _tensorrt, "python": _python}


def _initial_states(m: Manifest, model: Path) -> None:
    """One batch row of each non-zero initial state, raw in the state's dtype (Triton reads data_file so)."""
    for s in m.state:
        if state_needs_file(s):
            (model / INITIAL_STATE_DIR).mkdir(exist_ok=True)
            row = s.initial(m.folder, 1)[0]
            row.astype(row.dtype.newbyteorder("<")).tofile(model / INITIAL_STATE_DIR / initial_state_file(s.input))
