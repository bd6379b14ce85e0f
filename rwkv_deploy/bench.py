"""`rwkv-deploy bench`: how fast an export runs here, against the memory-bandwidth floor measured in the same run.

    decode tok/s   batch x N single steps per repeat, median of repeats after a warm-up
    prefill tok/s  batch x T prompt tokens in one `forward` call (the prefill graph when the export has one)
    TTFT           the time of that call: a prompt's first logits
    floor          weight bytes read per decode step / the bandwidth a matrix-vector product reading as many bytes
                   reaches on this machine now; decode cannot beat bytes/bandwidth at batch 1, so decode / floor
                   says how close
    peak RSS       of this process (the session and its weights)

`against="rwkv"` times the official package on the same checkpoint in the same run (validation/official.py).
Nothing here asserts on time: it measures and reports.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import RWKVDeployError, check_batch

log = logging.getLogger(__name__)

# The bandwidth probe reads as many bytes as a decode step, within these bounds: caches are large enough here
# (2 CPUs of a 480 MiB-L3 host) that a 128 MB read runs at 1.6x and a 256 MB one at 1.1x the rate of 1 GB,
# so one fixed size would flatter large exports' floors and understate small ones'.
PROBE_BYTES = (16 << 20, 512 << 20)
PEERS = ("rwkv",)  # the official package; rwkv.cpp is compared by bench/speed_table.py (it is not on PyPI)


@dataclass
class BenchResult:
    """One run of `bench`; tok/s figures are medians of `repeats` timings (all kept in `decode_reps` etc.)."""

    target: str
    backend: str
    precision: str | None
    batch: int
    tokens: int
    prompt_len: int
    decode_tok_s: float
    decode_reps: list[float]
    prefill_tok_s: float
    prefill_reps: list[float]
    prefill_one_call: bool  # False: the export has no prefill graph, the prompt went through step by step
    ttft_s: float
    weight_bytes_read: int | None  # per decode step, as the runtime reads them
    weight_bytes_note: str
    bandwidth_gb_s: float
    floor_tok_s: float | None  # batch-1 decode bound: bandwidth / bytes per step
    peak_rss_bytes: int
    threads: int | None
    peers: dict = field(default_factory=dict)  # name -> {"decode_tok_s", "prefill_tok_s"}

    def table(self) -> str:
        rows = [("decode", f"{self.decode_tok_s:.1f} tok/s", f"batch {self.batch} x {self.tokens} steps, "
                 f"repeats {' '.join(f'{r:.1f}' for r in self.decode_reps)}"),
                ("prefill", f"{self.prefill_tok_s:.1f} tok/s", f"batch {self.batch} x {self.prompt_len} tokens "
                 + ("in one call" if self.prefill_one_call else "step by step (no prefill graph)")),
                ("time to first token", f"{self.ttft_s * 1e3:.1f} ms", f"prompt of {self.prompt_len}"),
                ("bandwidth", f"{self.bandwidth_gb_s:.1f} GB/s", "a float32 matrix-vector product reading as much, now")]
        if self.floor_tok_s:
            rows.append(("floor (batch 1)", f"{self.floor_tok_s:.1f} tok/s",
                         f"{self.weight_bytes_read / 1e6:.0f} MB read per step ({self.weight_bytes_note}); decode at "
                         f"{self.decode_tok_s / self.batch / self.floor_tok_s:.0%} of it per sequence"))
        rows.append(("peak RSS", f"{self.peak_rss_bytes / 1e9:.2f} GB", "this process"))
        for name, p in self.peers.items():
            rows.append((name, f"{p['decode_tok_s']:.1f} tok/s decode", f"{p['prefill_tok_s']:.1f} tok/s prefill "
                         f"({self.decode_tok_s / p['decode_tok_s']:.2f}x / {self.prefill_tok_s / p['prefill_tok_s']:.2f}x"
                         " for us)"))
        width = max(len(r[0]) for r in rows)
        head = f"{self.target} on {self.backend} ({self.precision or 'reference'})"
        return "\n".join([head] + [f"  {a:<{width}}  {b:>16}  {c}" for a, b, c in rows])

    def to_json(self) -> dict:
        return asdict(self)


def measure_bandwidth(nbytes: int | None = None, threads: int | None = None, seconds: float = 0.3) -> float:
    """Bytes/s that ONNX Runtime's float32 MatMul pulls from memory for a [1, K] x [K, N] product of `nbytes`
    (clamped to PROBE_BYTES; the upper bound without a size), with the thread count the model runs with: the
    same kind and size of read a decode step does, so the floor is what this machine gives that kernel now
    (other load included), not a datasheet figure."""
    from onnx import TensorProto, helper

    from .runtime.session import _ort

    ort = _ort()
    K = 4096
    N = min(max(nbytes or PROBE_BYTES[1], PROBE_BYTES[0]), PROBE_BYTES[1]) // 4 // K
    w = np.full((K, N), 0.5, np.float32)  # [K, N]: fed as an input, so ONNX Runtime reads this array, no copy
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "bandwidth",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, N])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.ones((1, K), np.float32), "w": w}
    sess.run(None, feed)
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return w.nbytes / float(np.median(times))


def weight_bytes_per_step(folder: Path, manifest, providers: list[str]) -> tuple[int, str]:
    """Bytes of weights a decode step reads: every initializer of the step graph but the embedding table (a
    step gathers B rows of it). ONNX Runtime's CPU provider computes fp16 MatMuls in float32 on x86, casting the
    weights once at load, so there an fp16 weight is read as 4 bytes, unless only rwkv::MatMulF16 reads it."""
    import onnx

    proto = onnx.load(str(folder / manifest.graph("step")["file"]), load_external_data=False)
    T = onnx.TensorProto
    bits = {T.FLOAT: 32, T.FLOAT16: 16, T.BFLOAT16: 16, T.DOUBLE: 64, T.INT64: 64, T.INT32: 32, T.INT8: 8,
            T.UINT8: 8, T.INT4: 4, T.UINT4: 4}
    cpu = providers[:1] == ["CPUExecutionProvider"]
    widening = {x for n in proto.graph.node if n.op_type != "MatMulF16" for x in n.input}  # ONNX Runtime's own ops
    total, widened = 0, 0
    for t in proto.graph.initializer:
        if t.name.startswith("model.emb"):
            continue
        n = int(np.prod(t.dims, dtype=np.int64))
        if t.data_type == onnx.TensorProto.FLOAT16 and cpu and t.name in widening:
            widened += n * 2
        total += (n * bits.get(t.data_type, 32) + 7) // 8  # int4: two values a byte
    mb = f"{widened / 1e6:.0f}" if widened >= 1e6 else f"{widened / 1e6:.2g}"
    note = "as stored" if not widened else f"fp16 weights read as float32 by the CPU provider: {mb} MB more"
    return total + widened, note


def bench(target, backend: str = "ort", batch: int = 1, tokens: int = 64, prompt_len: int = 256, repeats: int = 5,
          warmup: int = 8, threads: int | None = None, providers=None, against: list[str] | None = None,
          trust_custom_ops: bool = False, progress=None) -> BenchResult:
    """Time decode and prefill of `target` (an export folder; a checkpoint with backend="torch")."""
    from .runtime.session import open_session

    batch, tokens, prompt_len, repeats = (check_batch(x) for x in (batch, tokens, prompt_len, repeats))
    unknown = [p for p in against or [] if p not in PEERS]
    if unknown:
        raise RWKVDeployError(f"unknown --against {unknown[0]!r}; expected one of {', '.join(PEERS)}")
    target = Path(target)
    say = progress or (lambda what: log.info("%s", what))
    sess = open_session(target, backend, providers, threads, trust_custom_ops=trust_custom_ops)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, sess.vocab_size, (batch, warmup + tokens), dtype=np.int64)  # [B, warmup + N]

    say(f"decode: {repeats} x {tokens} steps at batch {batch}")
    state = sess.init_state(batch)
    for t in range(warmup):
        _, state = sess.step(ids[:, t], state)
    decode = []
    for _ in range(repeats):
        s, t0 = state, time.perf_counter()
        for t in range(warmup, warmup + tokens):
            _, s = sess.step(ids[:, t], s)
        decode.append(batch * tokens / (time.perf_counter() - t0))

    say(f"prefill: {repeats} x {prompt_len} tokens at batch {batch}")
    prompt = rng.integers(0, sess.vocab_size, (batch, prompt_len), dtype=np.int64)  # [B, T]
    sess.forward(prompt[:, :min(prompt_len, 8)], sess.init_state(batch))  # warm-up
    calls = []
    for _ in range(repeats):
        s = sess.init_state(batch)
        t0 = time.perf_counter()
        sess.forward(prompt, s)
        calls.append(time.perf_counter() - t0)
    prefill = [batch * prompt_len / c for c in calls]

    manifest = sess.manifest if backend != "torch" or target.is_dir() else None
    used = list(getattr(sess, "providers", None) or ["CPUExecutionProvider"])
    read, note = (weight_bytes_per_step(target, manifest, used) if backend == "ort" and manifest is not None
                  else (None, "not measured for this backend"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the probe's matrix
    say("bandwidth probe")
    bw = measure_bandwidth(read, threads)
    result = BenchResult(
        target=str(target), backend=sess.backend, precision=(manifest or {}).get("precision"), batch=batch,
        tokens=tokens, prompt_len=prompt_len, decode_tok_s=float(np.median(decode)), decode_reps=decode,
        prefill_tok_s=float(np.median(prefill)), prefill_reps=prefill, prefill_one_call=sess.has_prefill,
        ttft_s=float(np.median(calls)), weight_bytes_read=read, weight_bytes_note=note, bandwidth_gb_s=bw / 1e9,
        floor_tok_s=bw / read if read else None, peak_rss_bytes=peak, threads=threads)
    del sess
    for peer in against or []:
        say(f"{peer}: the same checkpoint in the same run")
        result.peers[peer] = _peer(peer, target, manifest, prompt[0].tolist(), repeats)
    return result


def _peer(name: str, target: Path, manifest, prompt: list[int], repeats: int) -> dict:
    """The official package (`rwkv`) on the checkpoint this export came from, fp32 on the CPU."""
    from .validation.official import official_speed

    source = Path(manifest["source"]["path"]) if manifest is not None else target
    if not source.is_file() or source.suffix != ".pth":
        raise RWKVDeployError(f"--against rwkv needs the .pth checkpoint the export came from; {source} is not one")
    speed = official_speed(source, manifest["rwkv_version"] if manifest is not None else _version(source), prompt,
                           reps=repeats)
    return {"decode_tok_s": speed["decode"], "prefill_tok_s": speed["prefill"], "strategy": "cpu fp32"}


def _version(path: Path) -> str:
    from .models import load_checkpoint

    return load_checkpoint(path).version


def write_outputs(results: list[BenchResult], json_path=None, plot_path=None) -> None:
    """--json (a list of results) and --plot (tok/s per run with each run's floor drawn), written atomically."""
    from .runtime.manifest import write_bytes_atomic, write_json_atomic

    if json_path:
        write_json_atomic(Path(json_path), [r.to_json() for r in results])
    if plot_path:
        write_bytes_atomic(Path(plot_path), plot(results))


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise RWKVDeployError("--plot needs matplotlib: pip install 'rwkv-deploy[bench]'")
    return matplotlib


def plot(results: list[BenchResult]) -> bytes:
    """A PNG: decode and prefill tok/s per run (bars) and each run's bandwidth floor (a line over its bar)."""
    matplotlib = require_matplotlib()
    import io

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    labels = [f"{Path(r.target).name}\n{r.precision or r.backend.split()[0]}, batch {r.batch}" for r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(results)), 4), dpi=120)
    ax.bar(x - 0.2, [r.decode_tok_s for r in results], 0.4, label="decode")
    ax.bar(x + 0.2, [r.prefill_tok_s for r in results], 0.4, label="prefill")
    labelled = set()  # one legend entry per kind of mark

    def once(label):
        return None if label in labelled or labelled.add(label) else label

    for i, r in enumerate(results):
        if r.floor_tok_s:
            ax.hlines(r.floor_tok_s * r.batch, i - 0.4, i, colors="k", linestyles="--",
                      label=once("bandwidth floor (decode)"))
        for peer, p in r.peers.items():
            ax.plot([i - 0.2, i + 0.2], [p["decode_tok_s"], p["prefill_tok_s"]], "x", color="crimson",
                    markersize=9, label=once(f"{peer} (decode, prefill)"))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"rwkv-deploy bench ({os.cpu_count()} CPUs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def load_results(paths: list) -> list[BenchResult]:
    """BenchResults from --json files (to plot runs of several exports together)."""
    return [BenchResult(**r) for p in paths for r in json.loads(Path(p).read_text())]
