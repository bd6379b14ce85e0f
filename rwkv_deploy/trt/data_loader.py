"""Polygraphy data loader for an rwkv-deploy export folder: one step (or one prefill) from the initial state.

`rwkv-deploy engine` copies this file into the export folder as polygraphy_data_loader.py; there it needs only
numpy and the folder's manifest.json (no rwkv-deploy), so on a GPU machine

    polygraphy run OUT/model.onnx --onnxrt --trt --data-loader-script OUT/polygraphy_data_loader.py
    polygraphy run OUT/prefill.onnx --onnxrt --trt --data-loader-script OUT/polygraphy_data_loader.py \
        --data-loader-func-name load_prefill_data --trt-min-shapes ... (or build with `rwkv-deploy engine`)

compares the graph across runtimes on the same inputs: the first golden tokens at batch 1 and the initial state
of the state table (init values, or the init_file of a state-tuned model).
"""
import json
from pathlib import Path

import numpy as np

FOLDER = Path(__file__).resolve().parent
PREFILL_TOKENS = 4  # positions fed to the prefill graph


def manifest(folder=FOLDER) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))


def initial_state(m: dict, folder=FOLDER, batch: int = 1) -> dict:
    """{state input name: array [batch, ...]} as the manifest's state table defines it."""
    root = Path(folder).resolve()
    out = {}
    for s in m["state"]:
        shape = [batch, *s["shape"][1:]]
        if s.get("init_file"):
            path = (root / s["init_file"]).resolve()
            if not path.is_relative_to(root):  # the folder is data: it may not name files outside itself
                raise ValueError(f"init_file {s['init_file']!r} leaves {root}")
            row = np.fromfile(path, dtype=np.dtype(s["dtype"]).newbyteorder("<")).reshape(shape[1:])
            out[s["input"]] = np.ascontiguousarray(np.broadcast_to(row, shape).astype(s["dtype"]))
        else:
            out[s["input"]] = np.full(shape, s["init"], dtype=s["dtype"])
    return out


def tokens(m: dict, n: int) -> list:
    """The first n golden tokens (ids valid for this model), else 0, 1, 2, ..."""
    golden = (m.get("golden") or {}).get("tokens") or list(range(n))
    return [int(t) % int(m["vocab_size"]) for t in (golden * n)[:n]]


def feed(graph: str = "step", folder=FOLDER) -> dict:
    """One feed dict of `graph` at batch 1: tokens [1] (step) or [1, PREFILL_TOKENS] (prefill), initial state."""
    m = manifest(folder)
    g = m["graphs"][graph]
    ids = tokens(m, 1 if graph == "step" else PREFILL_TOKENS)
    toks = np.array(ids if graph == "step" else [ids], dtype=np.int64)  # [1] or [1, T]
    return {g["tokens"]: toks, **initial_state(m, folder)}


def load_data():
    """Polygraphy's default entry point: feeds of the step graph (model.onnx)."""
    yield feed("step")


def load_prefill_data():
    """Feeds of the prefill graph (prefill.onnx): --data-loader-func-name load_prefill_data."""
    yield feed("prefill")
