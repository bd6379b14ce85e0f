"""`rwkv-deploy export`: checkpoint -> export folder (design.md §2), written atomically."""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

from .. import __version__
from ..custom_ops.build import file_sha256
from ..errors import RWKVDeployError
from ..models import load_checkpoint
from ..models.common import Params
from ..models.model import RWKV, at_precision
from ..models.quant import LORA, PRECISIONS
from ..runtime.manifest import FORMAT, MANIFEST, tokenizer_entry, write_json_atomic
from ..runtime.tokenizer import default_tokenizer_file
from ..staging import check_destination, destination, sigterm_raises_exit, staged
from ..validation.loop import LayerReplay
from ..validation.metrics import normalised
from .onnx_graph import (EXTERNAL_THRESHOLD, LOGITS, TOKENS, WEIGHTS_FILE, PrefillGraph, StepGraph, WeightWriter,
                         skeleton, state_io_names, trace_graph)

log = logging.getLogger(__name__)

WKV_MODES = ("portable", "fused")
MATMUL_MODES = ("portable", "cpu")
NP_DTYPE = {torch.float32: "float32", torch.float16: "float16"}

# Golden logits (manifest "golden"): GOLDEN_STEPS ids drawn with a fixed seed from the whole vocabulary (so they
# do not depend on the tokenizer, which `rwkv-deploy tokenizer` may replace), fed one at a time through the float64
# reference. Their tolerance: GOLDEN_FACTOR x our reference's distance at the export's precision, within
# GOLDEN_BOUNDS (floor, cap) per precision; see _golden.
GOLDEN_FILE, GOLDEN_STEPS, GOLDEN_SEED = "golden/logits.bin", 8, 20261124
GOLDEN_FACTOR = 10
GOLDEN_BOUNDS = {"fp32": (1e-4, 1e-3), "fp16": (0.1, 0.25), "int8": (0.1, 0.25), "int4": (0.1, 0.5)}


@sigterm_raises_exit
def export(checkpoint, out, *, precision: str = "fp32", opset: int = 18, tokenizer=None,
           external_data: bool | None = None, force: bool = False, prefill: str | bool | None = None,
           wkv: str = "portable", matmul: str | None = None, ort_include=None, progress=None) -> Path:
    """Export `checkpoint` to the folder `out`; returns its path. Nothing is left at `out` on failure.

    prefill: None (step graph only), "last" (prefill.onnx returns the last position's logits) or "all"
    (every position's). True means "last".
    matmul: "cpu" multiplies the step graph's fp16/int8/int4 weights with the custom-op library's CPU kernels
    (rwkv::MatMulF16/Q8/Q4, which read the stored bytes as they are), "portable" with ONNX operators; None: "cpu"
    for fused int8/int4 exports, else "portable".
    """
    prefill = "last" if prefill is True else (prefill or None)
    if prefill not in (None, "last", "all"):
        raise RWKVDeployError(f"unknown prefill mode {prefill!r}; expected last or all")
    if precision not in PRECISIONS:
        raise RWKVDeployError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if wkv not in WKV_MODES:
        raise RWKVDeployError(f"unknown --wkv {wkv!r}; expected one of {', '.join(WKV_MODES)}")
    matmul = _matmul_mode(matmul, precision, wkv)
    if not 17 <= opset <= 23:  # 17 brings LayerNormalization
        raise RWKVDeployError(f"opset {opset} is not supported; use 17..23 (default 18)")
    out = destination(out)
    # everything about OUT that can be refused is refused here, before the checkpoint is loaded
    check_destination(out, force, checkpoint, "the checkpoint being exported", _is_export_folder,
                      f"an rwkv-deploy export folder (no {MANIFEST} of an rwkv-deploy format)")
    t0 = time.time()
    ckpt = load_checkpoint(checkpoint)  # headers and shapes; each tensor is read when it is written
    log.info("[1/4] opened RWKV-%s %s (%d layers x %d, %s params) in %.1fs", ckpt.version, ckpt.path.name,
             ckpt.dims.n_layer, ckpt.dims.n_embd, f"{ckpt.n_params:,}", time.time() - t0)
    tok_src, tok_entry = _find_tokenizer(ckpt, tokenizer)
    dtype, quant = PRECISIONS[precision]  # int8/int4: projections and head blockwise-quantized (models/quant.py)
    library = None
    if wkv == "fused":
        from ..custom_ops.build import build_library

        library = build_library(ort_include=ort_include)
    # The graphs are traced from a skeleton (shapes, no values); the real weights are then prepared one layer at a
    # time from the checkpoint and streamed to the folder: peak memory is about one copy of the export's weights.
    model = _skeleton(ckpt, dtype, wkv)
    weight_names = {f"model.{n}" for n, _ in model.named_buffers()}
    weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    # one graph: weights inside it unless large; several graphs: always one shared file (each weight stored once)
    external = external_data if external_data is not None else bool(prefill) or weight_bytes > EXTERNAL_THRESHOLD
    if not external and weight_bytes > EXTERNAL_THRESHOLD:
        raise RWKVDeployError(f"{weight_bytes / 1e9:.1f} GB of weights cannot be stored inside one .onnx file "
                              "(protobuf's 2 GiB limit); export with external data (the default)")
    d = ckpt.dims
    with staged(out, "export") as tmp:
        t1 = time.time()
        _phase(progress, 0, "tracing the graphs")
        writer = WeightWriter(tmp / WEIGHTS_FILE, external, quant, quant and _quantizable(quant), kernels=matmul == "cpu")
        files = {"step": "model.onnx"}
        writer.bind(trace_graph(StepGraph(model), model, torch.zeros(2, dtype=torch.long), tmp / "model.onnx", opset),
                    weight_names, tmp / "model.onnx")
        graphs = {"step": _graph_entry("model.onnx", external, ["batch"], d.vocab_size)}
        if prefill:
            # example T = 3: the T = 1 shortcut of models/wkv.py must not be taken, so the WKV becomes a Loop
            writer.bind(trace_graph(PrefillGraph(model, prefill == "all"), model, torch.zeros(2, 3, dtype=torch.long),
                                    tmp / "prefill.onnx", opset), weight_names, tmp / "prefill.onnx",
                        half_kernels=False)
            files["prefill"] = "prefill.onnx"
            graphs["prefill"] = _graph_entry("prefill.onnx", external, ["batch", "seq"], d.vocab_size)
            graphs["prefill"]["positions"] = prefill
            if prefill == "all":
                graphs["prefill"]["logits_shape"] = ["batch", "seq", d.vocab_size]
        del model
        log.info("[2/4] %s traced in %.1fs", " and ".join(files.values()), time.time() - t1)
        t1 = time.time()
        model = at_precision(ckpt, precision, wkv=wkv, lazy=True)  # real weights, one layer at a time
        # the golden tokens run through each layer as it is written, at the export's precision and in float64,
        # so the checkpoint is read once (a layer's pages are still in memory when its float64 copy is made)
        tokens = np.random.default_rng(GOLDEN_SEED).integers(0, d.vocab_size, GOLDEN_STEPS).tolist()
        exact_model = at_precision(ckpt, precision, exact=True, lazy=True)
        replay_at, exact = (LayerReplay(m, torch.tensor([tokens])) for m in (model, exact_model))

        def replay(i, block):
            replay_at.layer(i, Params(block))
            exact.layer(i, exact_model.blocks[i])

        writer.write(((f"model.{n}", t) for n, t in model.prepared_weights(replay)),
                     progress=progress and (lambda i, n: progress(i, n, "writing weights")))
        for file in files.values():
            onnx.checker.check_model(str(tmp / file))  # by path: works past 2 GiB
        writer_quantized, written = writer.quantized, writer.bytes_written  # int8/int4: fewer than traced
        lora_quantized = bool(writer.direct)  # RWKV-7's LoRA factors, the weights a product reads as they are
        tiled = bool(writer.tiled)
        del writer
        log.info("[2/4] %.2f GB of weights written%s (golden tokens replayed alongside) in %.1fs", written / 1e9,
                 f" to {WEIGHTS_FILE}" if external else "", time.time() - t1)
        _phase(progress, 3, "golden logits (float64 reference)")
        state = _state_entries(model, tmp)
        custom_ops = None
        if library is not None:  # shipped in the folder so that the export runs where it is copied to
            shutil.copyfile(library, tmp / library.name)
            custom_ops = {"domain": "rwkv", "ops": _custom_ops(tmp, graphs, "rwkv"),
                          "libraries": {"CPUExecutionProvider": {"path": library.name,
                                                                 "sha256": file_sha256(tmp / library.name)}}}
        if tok_src is not None:
            shutil.copyfile(tok_src, tmp / tok_entry["file"])
        log.info("[3/4] state table (%d tensors) and tokenizer (%s) written", len(state),
                 tok_entry["kind"] if tok_entry else "none")
        t1 = time.time()
        rescale_every = model.rescale_every
        golden = _golden(tokens, replay_at.result()[0][0], exact.result()[0][0], precision, tmp)
        log.info("[3/4] golden logits (%d tokens, float64 reference) in %.1fs", len(tokens), time.time() - t1)
        manifest = {
            "format": FORMAT, "rwkv_version": d.version, "n_layer": d.n_layer, "n_embd": d.n_embd,
            "dim_att": d.dim_att, "dim_ffn": d.dim_ffn, "n_head": d.n_head, "head_size": d.head_size,
            "vocab_size": d.vocab_size, "precision": precision,
            "weights_dtype": precision if quant else NP_DTYPE[dtype], "compute_dtype": NP_DTYPE[dtype],
            "quantization": quant and {
                "method": quant.describe(lora=lora_quantized, kernels=tiled),
                "block_size": quant.block, "head_bits": quant.of("head").bits,
                **({"lora_bits": quant.lora_bits} if lora_quantized else {}), "tensors": sorted(writer_quantized),
                # what ONNX Runtime's fused MatMulNBits does by default and the certificate's reference too
                "activations": f"int8, symmetric per block of {quant.block} along each product's input"},
            "wkv": wkv, "opset": max(opset, 21) if quant else opset,
            "rescale_every": rescale_every,
            "graphs": graphs,
            "state": state,
            "tokenizer": tok_entry,
            "requires": {"custom_ops": custom_ops},
            "golden": golden,
            "engines": [],
            "source": {"path": str(ckpt.path.absolute()), "format": ckpt.format, "sha256": ckpt.sha256},
            "rwkv_deploy_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    log.info("[4/4] exported to %s in %.1fs (%s)", out, time.time() - t0, _size(out))
    return out


def _skeleton(ckpt, dtype, wkv: str) -> RWKV:
    """The model with every weight a placeholder of its shape and dtype: what the graphs are traced from."""
    return skeleton(RWKV(replace(ckpt, weights={k: torch.empty(t.shape, dtype=t.dtype, device="meta")
                                               for k, t in ckpt.weights.items()}), dtype, wkv=wkv).eval())


def weight_digests(ckpt, precision: str, wkv: str = "portable", opset: int = 18, quant=None,
                   matmul: str = "portable") -> dict[str, str]:
    """{initializer: sha256 of its bytes} of the step graph that exporting `ckpt` would write, computed the way
    export writes them (same preparation, folds and dtype) without writing anything. verify holds an export's
    weights to these: a damaged or substituted weight shows at any model size, where at 2.9B and fp16 its effect
    on the logits can sit within a few times the precision's own noise. matmul: "cpu" where the export's products
    are rwkv::MatMulF16/Q8/Q4 (their weights are stored in tiles)."""
    import tempfile

    dtype, default = PRECISIONS[precision]
    quant = quant if quant is not None else default  # an export's own (models.quant.manifest_quant)
    model = _skeleton(ckpt, dtype, wkv)
    writer = WeightWriter(None, True, quant, quant and _quantizable(quant), kernels=matmul == "cpu")  # digests
    with tempfile.TemporaryDirectory(prefix="rwkv-deploy-trace-") as tmp:
        path = Path(tmp) / "model.onnx"
        # initializers are named after the weights whatever the opset; torch's exporter traces at most opset 20
        # (int8/int4 manifests say 21: their DequantizeLinear nodes are added after tracing)
        writer.bind(trace_graph(StepGraph(model), model, torch.zeros(2, dtype=torch.long), path, min(opset, 20)),
                    {f"model.{n}" for n, _ in model.named_buffers()}, path)
    del model
    real = at_precision(ckpt, precision, wkv=wkv, lazy=True, quant=quant)
    writer.write((f"model.{n}", t) for n, t in real.prepared_weights())
    return writer.digests


def _phase(progress, done: int, what: str) -> None:
    """Report which of the export's 4 phases runs next (the CLI shows it; tracing itself cannot report steps)."""
    if progress:
        progress(done, 4, what)


def _graph_entry(file: str, external: bool, tokens_shape: list, vocab: int) -> dict:
    return {"file": file, "external_data": WEIGHTS_FILE if external else None, "tokens": TOKENS,
            "tokens_dtype": "int64", "tokens_shape": tokens_shape, "logits": LOGITS, "logits_dtype": "float32",
            "logits_shape": ["batch", vocab]}


def _is_export_folder(folder: Path) -> bool:
    """A manifest.json that parses and whose format is rwkv-deploy/<n>: a folder this tool wrote."""
    manifest = folder / MANIFEST
    try:
        if not manifest.is_file() or manifest.stat().st_size > 64 << 20:
            return False
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("format"), str) and data["format"].startswith("rwkv-deploy/")


def _state_entries(model: RWKV, folder: Path) -> list[dict]:
    ins, outs = state_io_names(model)
    entries = []
    for s, i, o, init in zip(model.states, ins, outs, model.init_state(1)):
        e = {"input": i, "output": o, "layer": s.layer, "kind": s.kind.name, "shape": ["batch", *s.shape],
             "dtype": NP_DTYPE[s.dtype], "init": s.kind.init, "init_file": None}
        if not torch.all(init == s.kind.init):  # a state-tuned initial state: ship the values
            e["init_file"] = f"state_init/{i}.bin"
            (folder / "state_init").mkdir(exist_ok=True)
            init[0].numpy().astype(np.dtype(NP_DTYPE[s.dtype]).newbyteorder("<")).tofile(folder / e["init_file"])
        entries.append(e)
    return entries


def _find_tokenizer(ckpt, given) -> tuple[Path | None, dict | None]:
    """The tokenizer file to copy in (given, the HF folder's own, or World's for vocab 65536) and its manifest
    entry; checked here, before the slow work, so that a wrong file fails fast."""
    path = Path(given) if given is not None else default_tokenizer_file(ckpt.tokenizer_file, ckpt.dims.vocab_size)
    if path is None and ckpt.dims.vocab_size == 65536:
        log.warning("vocab 65536 suggests the RWKV World tokenizer, but the `rwkv` package that ships it is not "
                    "installed; exporting without a tokenizer (pip install rwkv, or pass --tokenizer)")
        return None, None
    if path is None:
        log.warning("no tokenizer: pass --tokenizer FILE (e.g. 20B_tokenizer.json for Pile models) to use `run`")
        return None, None
    return path, tokenizer_entry(path, ckpt.dims.vocab_size)


def _quantizable(quant):
    """quantizable(initializer name, shape, transposed) -> the Quant it is stored with, or None, for WeightWriter:
    the layers' projections and the head, which the graphs read transposed, and RWKV-7's LoRA factors, read as
    they are."""
    def pick(name: str, shape, transposed: bool):
        key = "head" if name == "model.head" else name.split(".", 3)[3] if name.startswith("model.blocks.") else ""
        ok = key and quant.applies(key, shape) and transposed == (key not in LORA)
        return quant.of(key) if ok else None
    return pick


def _golden(tokens: list[int], at_precision: np.ndarray, exact: np.ndarray, precision: str, folder: Path) -> dict:
    """Write the golden logits (design.md §2) into `folder`; returns manifest["golden"]. `exact` and
    `at_precision` are `tokens`' logits [T, V] fed one at a time from the initial state, batch 1, by the float64
    reference and by the reference at the export's precision.

    The logits are the float64 reference's: what every client can reproduce with the step graph, held against
    exact math rather than against another implementation at some precision. The tolerance scales with how far
    our PyTorch reference at the export's precision (`at_precision`, same tokens) is from float64, as verify's
    verdict does (design.md §5): the first steps from the initial state are the worst conditioned, and how badly
    depends on the model. Measured on random 12x768 exports (vocab 65536), ONNX Runtime CPU sits from float64 at
    up to 3e-6..3e-5 (fp32) and 3e-3..9e-2 (fp16), 1-3x further than the reference at its precision; the floors
    leave room for clients on other hardware, the caps still fail a wrong graph.
    """
    (folder / GOLDEN_FILE).parent.mkdir(exist_ok=True)
    exact.astype("<f4").tofile(folder / GOLDEN_FILE)
    floor, cap = GOLDEN_BOUNDS[precision]
    allowed = min(max(GOLDEN_FACTOR * float(normalised(at_precision, exact).max()), floor), cap)
    return {"tokens": tokens, "logits_file": GOLDEN_FILE, "shape": list(exact.shape), "dtype": "float32",
            "tolerance": {"normalised": float(f"{allowed:.2g}"), "top1": 1.0}}


def _custom_ops(folder: Path, graphs: dict, domain: str) -> list[str]:
    """The op types of `domain` that the graphs use (Loop bodies included), read back from the files."""
    import onnx

    def walk(graph):
        for node in graph.node:
            if node.domain == domain:
                yield node.op_type
            for attr in node.attribute:
                yield from (op for g in [attr.g, *attr.graphs] for op in walk(g))

    return sorted({op for g in graphs.values()
                   for op in walk(onnx.load(str(folder / g["file"]), load_external_data=False).graph)})


def _matmul_mode(matmul: str | None, precision: str, wkv: str) -> str:
    """The products' form (see export); refused where it cannot apply."""
    if matmul is None:
        return "cpu" if wkv == "fused" and precision in ("int8", "int4") else "portable"
    if matmul not in MATMUL_MODES:
        raise RWKVDeployError(f"unknown --matmul {matmul!r}; expected one of {', '.join(MATMUL_MODES)}")
    if matmul == "cpu" and precision == "fp32":
        raise RWKVDeployError("--matmul cpu multiplies fp16/int8/int4 weights; fp32 products are ONNX Runtime's own "
                              "(export with --precision fp16, int8 or int4, or drop --matmul)")
    if matmul == "cpu" and wkv != "fused":
        raise RWKVDeployError("--matmul cpu needs the custom-op library that --wkv fused builds and ships: add "
                              "--wkv fused")
    return matmul


def _size(folder: Path) -> str:
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e6:.1f} MB"
