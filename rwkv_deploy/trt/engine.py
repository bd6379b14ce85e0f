"""`rwkv-deploy engine OUT`: a TensorRT engine per graph of an export folder, with a JSON record beside each and
the list in manifest.json `engines` (design.md §2).

Profiles come from the state table (batch 1..max_batch; seq 1..max_seq for prefill). Precision follows the
export: TensorRT-RTX networks are always strongly typed, and full TensorRT is asked for a strongly typed one, so
an fp16 export (with its fp32 islands) gives an fp16 engine and an fp32 export an fp32 one. TensorRT-RTX builds
without a GPU for the targets named (--target); nothing here runs an engine.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..custom_ops import CPU_PRODUCTS
from ..errors import RWKVDeployError, check_batch
from ..runtime.manifest import MANIFEST, Manifest, check_schema, read_manifest, write_bytes_atomic, write_json_atomic
from ..staging import sigterm_raises_exit
from . import import_tensorrt
from .plugin import NAMESPACE, OPS, VERSION, register_plugins

log = logging.getLogger(__name__)

DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
          "INT8": "int8", "BOOL": "bool"}
COMPUTE_DTYPES = ("float32", "float16")
DATA_LOADER = "polygraphy_data_loader.py"
# Far beyond any engine worth building, and small enough that the profile's shapes stay well inside TensorRT's
# tensor dimensions (the CLI accepts any positive integer).
BATCH_LIMIT, SEQ_LIMIT = 4096, 1 << 20
# What the session takes from a manifest entry; `rwkv-deploy engine` writes every one.
ENTRY_KEYS = ("file", "graph", "flavour", "version", "targets", "profiles", "plugins", "sha256")


def engine_file(graph: str) -> str:
    return f"{graph}.engine"


def record_file(entry_file: str) -> str:
    """The JSON record beside an engine: its file name plus .json."""
    return f"{entry_file}.json"


# ---- what to build -------------------------------------------------------------------------------------------

def profile_shapes(manifest: Manifest, graph: str, max_batch: int, max_seq: int) -> dict[str, dict[str, list]]:
    """{input: {min, opt, max}} for one graph, from the manifest alone: "batch" spans 1..max_batch, "seq"
    1..max_seq, every other dim is fixed. opt is the smallest shape, one token of one sequence (the decode loop's
    shape); TensorRT-RTX 1.7 checks shape constraints at build time at opt only, and one token is where a
    chunked loop runs zero times, the case that once failed (tests/test_trt_parse.py)."""
    max_batch, max_seq = check_limits(max_batch, max_seq)
    g = manifest.graph(graph)
    span = {"batch": (1, max_batch), "seq": (1, max_seq)}
    shapes = {g["tokens"]: g["tokens_shape"], **{s.input: s.shape for s in manifest.state}}
    out = {}
    for name, shape in shapes.items():
        unknown = [d for d in shape if isinstance(d, str) and d not in span]
        if unknown:
            raise RWKVDeployError(f"{name} has the dynamic dims {unknown}; an engine profile knows only batch and seq")
        low = [span[d][0] if isinstance(d, str) else d for d in shape]
        high = [span[d][1] if isinstance(d, str) else d for d in shape]
        out[name] = {"min": low, "opt": list(low), "max": high}
    return out


def check_limits(max_batch: int, max_seq: int) -> tuple[int, int]:
    """--max-batch and --max-seq as integers from 1 to BATCH_LIMIT and SEQ_LIMIT."""
    out = []
    for flag, value, limit in (("--max-batch", max_batch, BATCH_LIMIT), ("--max-seq", max_seq, SEQ_LIMIT)):
        value = check_batch(value)
        if value > limit:
            raise RWKVDeployError(f"{flag} {value} is more than an engine profile takes here (at most {limit})")
        out.append(value)
    return out[0], out[1]


def parse_targets(trt, flavour: str, targets: list[str] | None) -> list[str]:
    """--target values as TensorRT-RTX ComputeCapability names ("SM89"); "89", "sm_89", "8.9" are accepted.

    None: the GPU of this machine ("CURRENT"), which TensorRT-RTX can only build for when there is one. Full
    TensorRT always builds for the GPU it runs on and takes no targets.
    """
    if flavour == "tensorrt":
        if targets:
            raise RWKVDeployError("--target is for TensorRT-RTX; full TensorRT builds for the GPU it runs on "
                                  "(build on the target GPU, or install tensorrt-rtx)")
        return ["CURRENT"]
    known = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
    if not targets:
        from .cuda import no_gpu_reason

        reason = no_gpu_reason()
        if reason:
            raise RWKVDeployError(f"cannot build for this machine's GPU ({reason}); name the target GPUs with "
                                  f"--target (one or more of {' '.join(known)})")
        return ["CURRENT"]
    out = []
    for t in targets:
        digits = str(t).strip().upper().removeprefix("SM").lstrip("_").replace(".", "")
        name = f"SM{digits}"
        if name not in known:
            raise RWKVDeployError(f"unknown --target {t!r}; this {flavour} builds for {' '.join(known)} "
                                  f"(compute capability, e.g. SM89 for an RTX 4090)")
        if name not in out:
            out.append(name)
    return out


def network_flags(trt, flavour: str) -> int:
    """Strongly typed networks: TensorRT-RTX has no other kind (flag 0); full TensorRT is asked for one, so both
    compute in the export's own types (design.md §6)."""
    if flavour == "tensorrt_rtx":
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def compute_dtype(manifest: Manifest) -> str:
    """The engine's compute dtype: the export's (format 1 manifests name only `precision`)."""
    dtype = manifest.get("compute_dtype") or {"fp32": "float32", "fp16": "float16"}.get(manifest["precision"])
    if dtype not in COMPUTE_DTYPES:
        raise RWKVDeployError(f"{manifest.folder}: TensorRT engines are built from float32 or float16 exports; this "
                              f"one computes in {dtype or manifest['precision']}")
    return dtype


def required_plugins(manifest: Manifest) -> list[str]:
    """The rwkv::WKV* operators the graphs use; one we have no plugin for is refused before parsing."""
    custom = (manifest.get("requires") or {}).get("custom_ops") or (manifest.get("custom_op_library") and
                                                                    {"domain": NAMESPACE, "ops": sorted(OPS)})
    if not custom:
        return []
    missing = [op for op in custom.get("ops", []) if custom.get("domain") != NAMESPACE or op not in OPS]
    if missing and custom.get("domain") == NAMESPACE and all(op in CPU_PRODUCTS for op in missing):
        raise RWKVDeployError(f"this {', '.join(missing)} export multiplies its weights with CPU kernels that have no "
                              "TensorRT plugin; export with --matmul portable for TensorRT (its MatMul / "
                              "DequantizeLinear form builds)")
    if missing:
        raise RWKVDeployError(f"no TensorRT plugin for {custom.get('domain')}::{', '.join(missing)} (plugins exist for "
                              f"{', '.join(f'{NAMESPACE}::{o}' for o in OPS)}); export with --wkv portable")
    return list(custom.get("ops", []))


# ---- building ------------------------------------------------------------------------------------------------

_loggers: dict = {}


def trt_logger(trt):
    """One logger per TensorRT module for the process (TensorRT keeps the first one registered): it keeps the
    latest warnings and errors for error messages and sends everything to logging at debug level."""
    if trt not in _loggers:
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.lines: list[str] = []

            def log(self, severity, msg):
                log.debug("TensorRT %s: %s", severity.name, msg)
                if severity <= trt.ILogger.Severity.WARNING:
                    self.lines = [*self.lines[-49:], f"{severity.name}: {msg}"]

        _loggers[trt] = Logger()
    return _loggers[trt]


@sigterm_raises_exit  # so that a SIGTERM still removes the temporary files
def build_engines(folder, max_batch: int = 8, max_seq: int = 512, targets: list[str] | None = None,
                  timing_cache=None, graphs: list[str] | None = None) -> list[dict]:
    """Build an engine for each graph of the export folder (or those named); returns the manifest entries.

    All or nothing: every engine and record is written under a temporary name first, renamed into place only when
    all graphs have built, and manifest.json is rewritten last; a failure removes the temporaries and leaves the
    folder as it was.
    """
    max_batch, max_seq = check_limits(max_batch, max_seq)
    trt, flavour = import_tensorrt()
    m = read_manifest(folder)
    if m["format"] == "rwkv-deploy/1":  # format 1 has no `engines` key to list them in
        raise RWKVDeployError(f"{folder} is a format-1 export; engines are listed in format 2 manifests: re-export it")
    dtype = compute_dtype(m)
    names = list(m["graphs"]) if graphs is None else graphs
    unknown = [g for g in names if g not in m["graphs"]]
    if unknown:
        raise RWKVDeployError(f"{folder} has no {', '.join(unknown)} graph (it has {', '.join(m['graphs'])})")
    sm = parse_targets(trt, flavour, targets)
    ops = required_plugins(m)
    plugins = []
    if ops:
        register_plugins(trt, flavour)  # before parsing: the parser maps rwkv nodes to the registered creators
        plugins = [{"name": f"{NAMESPACE}::{op}", "version": VERSION, "module": "rwkv_deploy.trt.plugin",
                    "library": "librwkv_cuda.so"} for op in ops]
    cache = Path(timing_cache) if timing_cache else None
    if cache is not None and flavour == "tensorrt_rtx":
        log.warning("TensorRT-RTX has no timing cache (its timing-cache calls are no-ops since 1.2): %s is neither "
                    "read nor written", cache)
        cache = None
    entries, staged = [], []  # staged: (temporary, final) paths
    try:
        for graph in names:
            entry, record = _build_one(trt, flavour, m, graph, profile_shapes(m, graph, max_batch, max_seq), sm,
                                       cache, staged)
            entry.update(compute_dtype=dtype, plugins=plugins)
            record.update(entry, max_batch=max_batch, max_seq=max_seq, rwkv_deploy_version=__version__,
                          created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            _stage(m.path(f"engines[{graph}] record", record_file(entry["file"])), record, staged)
            entries.append(entry)
        # the Polygraphy data loader (data_loader.py), copied in so the folder compares runtimes by itself
        _stage(m.path("data loader", DATA_LOADER), Path(__file__).with_name("data_loader.py").read_bytes(), staged)
        _stage(Path(m.folder) / MANIFEST, _manifest_with(m, entries), staged)  # last: renamed last
        for tmp, final in staged:  # every file complete on disk: only renames are left to fail
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:  # after the renames, none is left
            tmp.unlink(missing_ok=True)
    return entries


def _stage(path: Path, data, staged: list) -> Path:
    """`data` (bytes, a buffer, or a dict written as JSON) complete under a temporary name beside `path`, listed
    in `staged` as (temporary, path) for the renames or the cleanup."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.new")
    staged.append((tmp, path))
    (write_json_atomic if isinstance(data, dict) else write_bytes_atomic)(tmp, data)
    return tmp


def _build_one(trt, flavour, m: Manifest, graph: str, profile: dict, targets: list[str], cache: Path | None,
               staged: list):
    """(manifest entry, record) of one graph's engine, the engine written under a temporary name (_stage)."""
    from ..custom_ops.build import file_sha256

    logger = trt_logger(trt)
    seen = len(logger.lines)
    onnx_path = m.path(f"graphs.{graph}.file", m.graph(graph)["file"])
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, flavour))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)) or parser.num_errors:
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = "; ".join(f"node {e.node_name()!r} ({e.node_operator()}): {e.desc()}" for e in errors[:3])
        hint = ("; the rwkv plugins were not registered (rwkv_deploy.trt.plugin.register_plugins)"
                if any(e.node_operator().startswith("WKV") for e in errors) else "")
        raise RWKVDeployError(f"{flavour} cannot parse {onnx_path.name}: {first or 'no details'}{hint}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    _check_io(m, graph, onnx_path, inputs, outputs, profile)
    config = builder.create_builder_config()
    if flavour == "tensorrt_rtx":
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            if not config.set_compute_capability(getattr(trt.ComputeCapability, t), i):
                raise RWKVDeployError(f"{flavour} refused the target {t}")
    p = builder.create_optimization_profile()
    for name, s in profile.items():
        p.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(p)
    timing = _load_timing_cache(config, cache) if cache is not None else None
    log.info("building the %s engine (%s, %s) from %s", graph, flavour, " ".join(targets), onnx_path.name)
    engine = builder.build_serialized_network(network, config)
    if engine is None or engine.nbytes == 0:
        raise RWKVDeployError(f"{flavour} could not build an engine from {onnx_path.name}:\n"
                              + "\n".join(logger.lines[seen:][-10:]))
    if cache is not None:
        write_bytes_atomic(cache, memoryview(timing.serialize()))
    file = engine_file(graph)
    tmp = _stage(m.path(f"engines[{graph}].file", file), memoryview(engine), staged)
    del engine  # on disk now: an engine can be large, and the next graph is built in the same process
    entry = {"file": file, "graph": graph, "flavour": flavour, "version": trt.__version__, "targets": targets,
             "profiles": [profile], "sha256": file_sha256(tmp)}
    io = lambda ts: [{"name": t.name, "dtype": DTYPES.get(t.dtype.name, t.dtype.name), "shape": list(t.shape)}  # noqa: E731
                     for t in ts]
    record = {"source": {"file": onnx_path.name, "sha256": file_sha256(onnx_path)}, "inputs": io(inputs),
              "outputs": io(outputs), "timing_cache": str(cache) if cache else None}
    log.info("built %s (%.1f MB)", file, tmp.stat().st_size / 1e6)
    return entry, record


def _check_io(m: Manifest, graph: str, path: Path, inputs, outputs, profile: dict) -> None:
    """The network's I/O must be the manifest's, names and dtypes: a strongly typed engine computes in exactly
    these types, and every client binds by the manifest."""
    g = m.graph(graph)
    want_in = {g["tokens"]: "int64", **{s.input: s.dtype for s in m.state}}
    want_out = {g["logits"]: g.get("logits_dtype", "float32"), **{s.output: s.dtype for s in m.state}}
    for kind, want, ts in (("inputs", want_in, inputs), ("outputs", want_out, outputs)):
        got = {t.name: DTYPES.get(t.dtype.name, t.dtype.name) for t in ts}
        if got != want:
            diff = sorted(set(want.items()) ^ set(got.items()))[:4]
            raise RWKVDeployError(f"{path.name} does not match manifest.json: {kind} differ ({diff}); re-export")
    for t in inputs:
        shape = list(t.shape)
        fixed = profile[t.name]["max"]
        if len(shape) != len(fixed) or any(d != -1 and d != f for d, f in zip(shape, fixed)):
            raise RWKVDeployError(f"{path.name}: input {t.name} is {shape} in the graph, the profile needs {fixed}")


def _load_timing_cache(config, cache: Path):
    """Full TensorRT's timing cache, seeded from `cache` when that file exists (a stale or foreign one is
    rejected by TensorRT, and then ignored: it only saves build time)."""
    data = cache.read_bytes() if cache.is_file() else b""
    timing = config.create_timing_cache(data)
    if not config.set_timing_cache(timing, ignore_mismatch=True) and data:
        log.warning("%s does not fit this TensorRT; building without it", cache)
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, ignore_mismatch=True)
    return timing


def _manifest_with(m: Manifest, entries: list[dict]) -> dict:
    """The manifest with `engines` updated: the new entries replace those of the same graphs; schema-checked."""
    built = {e["graph"] for e in entries}
    data = dict(m)
    data["engines"] = [e for e in m.get("engines", []) if e["graph"] not in built] + entries
    check_schema(data, Path(m.folder) / MANIFEST)
    return data


def engine_records(folder) -> list[dict]:
    """The records of the engines an export folder lists, each engine checked against its manifest entry's sha256
    and each record against the entry. What a session relies on (graph, flavour, version, targets, profiles,
    plugins) comes from the entry, which read_manifest has schema-checked."""
    from ..custom_ops.build import file_sha256

    m = read_manifest(folder)
    out, seen = [], set()
    for i, e in enumerate(m.get("engines", [])):
        rebuild = f"; rebuild with `rwkv-deploy engine {folder}`"
        missing = [k for k in ENTRY_KEYS if k not in e]
        if missing:
            raise RWKVDeployError(f"{folder}: manifest.json engines[{i}] lacks {', '.join(missing)}{rebuild}")
        if e["graph"] not in m["graphs"] or e["graph"] in seen:
            raise RWKVDeployError(f"{folder}: manifest.json engines[{i}] is for graph {e['graph']!r}, which the "
                                  f"export {'lists twice' if e['graph'] in seen else 'does not have'}{rebuild}")
        seen.add(e["graph"])
        _check_profiles(m, i, e)
        path = m.path(f"engines[{i}].file", e["file"])
        rec = m.path(f"engines[{i}] record", record_file(e["file"]))
        if not path.is_file() or not rec.is_file():
            raise RWKVDeployError(f"{folder}: engine {e['file']} or its record is missing{rebuild}")
        if file_sha256(path) != e["sha256"]:
            raise RWKVDeployError(f"{path} is not the engine manifest.json lists (sha256 differs){rebuild}")
        try:
            record = json.loads(rec.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
            raise RWKVDeployError(f"{rec} is not an engine record ({err}){rebuild}") from None
        differ = [k for k in e if record.get(k) != e[k]] if isinstance(record, dict) else ["all"]
        if differ:
            raise RWKVDeployError(f"{rec} does not match its entry in manifest.json ({', '.join(differ)} "
                                  f"differ){rebuild}")
        out.append({**record, **e})
    return out


def _check_profiles(m: Manifest, i: int, e: dict) -> None:
    """An entry's one profile gives min/opt/max, of the right rank, for every input of its graph (the schema says
    only that `profiles` is a list)."""
    want = profile_shapes(m, e["graph"], 1, 1)
    p = e["profiles"][0] if len(e["profiles"]) == 1 else None
    ok = isinstance(p, dict) and set(p) == set(want) and all(
        isinstance(p[name], dict) and all(
            isinstance(p[name].get(k), list) and len(p[name][k]) == len(w["min"])
            and all(type(d) is int and d >= 1 for d in p[name][k]) for k in ("min", "opt", "max"))
        for name, w in want.items())
    if not ok:
        raise RWKVDeployError(f"{m.folder}: manifest.json engines[{i}].profiles is not one profile of the "
                              f"{e['graph']} graph's inputs; rebuild with `rwkv-deploy engine {m.folder}`")
