"""Command line: each command is one library call; only this module prints."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from contextlib import contextmanager

from . import __version__
from .errors import RWKVDeployError, VerificationFailed


def _inspect(a):
    from .inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(a.checkpoint, values=a.values)
    print(json.dumps(info, indent=2) if a.json else format_inspect(info))


@contextmanager
def _progress(label: str):
    """A rich progress bar on stderr while a long call runs, when stderr is a terminal; else None (the library
    then logs its milestones, which is what logs and CI want)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total, what=label: bar.update(task, completed=done, total=total, description=what)


def _export(a):
    from .exporters.export import export

    with _progress("exporting") as progress:
        export(a.checkpoint, a.output, precision=a.precision, opset=a.opset, tokenizer=a.tokenizer,
               external_data=True if a.external_data else None, force=a.force, prefill=a.prefill, wkv=a.wkv,
               matmul=a.matmul, ort_include=a.ort_include, progress=progress)


def _verify(a):
    from .validation.compare import verify

    with _progress("verifying") as progress:
        report = verify(a.folder, checkpoint=a.checkpoint, steps=a.steps, batch=a.batch, seed=a.seed,
                        json_path=a.json, trust_custom_ops=a.trust_custom_ops, backend=a.backend, providers=a.provider,
                        threads=a.threads, progress=progress)
    print(report.table())
    if not report:
        raise VerificationFailed("; ".join(report.failures()))


def _run(a):
    from .runtime.generate import GenerationStats, generate
    from .runtime.session import open_session

    sess = open_session(a.model, a.backend, a.provider, a.threads, trust_custom_ops=a.trust_custom_ops)
    sess.get_tokenizer()  # a missing or bad tokenizer is an error before anything is printed
    stats = GenerationStats()
    sys.stdout.write(a.prompt)
    for piece in generate(sess, a.prompt, a.max_tokens, a.temperature, a.top_p, a.seed, stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(stats.line(), file=sys.stderr)  # stderr: stdout is the text alone


def _check(a):
    from .runtime.check import check

    result = check(a.folder, trust_custom_ops=a.trust_custom_ops)
    print(result.table())
    if not result:
        raise VerificationFailed(result.reason())


def _bench(a):
    from .bench import bench, load_results, require_matplotlib, write_outputs

    if a.plot:
        require_matplotlib()  # before minutes of timing, not after
    earlier = load_results(a.plot_with)
    result = bench(a.target, a.backend, a.batch, a.tokens, a.prompt_len, a.repeats, threads=a.threads,
                   providers=a.provider, against=a.against, trust_custom_ops=a.trust_custom_ops,
                   progress=lambda what: print(f"... {what}", file=sys.stderr, flush=True))
    print(result.table())
    write_outputs(earlier + [result], a.json, a.plot)


def _tokenizer(a):
    from .runtime.manifest import attach_tokenizer

    entry = attach_tokenizer(a.folder, a.file)["tokenizer"]
    print(f"{a.folder}: tokenizer {entry['file']} ({entry['kind']}) attached")


def _build_ops(a):
    from .custom_ops.build import build_library

    print(build_library(force=a.force, ort_include=a.ort_include, cuda=a.cuda))


def _engine(a):
    from .trt.engine import build_engines

    for e in build_engines(a.folder, max_batch=a.max_batch, max_seq=a.max_seq, targets=a.target,
                           timing_cache=a.timing_cache):
        print(f"{a.folder}/{e['file']}: {e['graph']} graph, {e['flavour']} {e['version']}, {e['compute_dtype']}, "
              f"for {' '.join(e['targets'])}" + (f", plugins {' '.join(p['name'] for p in e['plugins'])}"
                                                if e["plugins"] else ""))


def _triton(a):
    from .triton import write_repository

    out = write_repository(a.folder, a.output, backend=a.backend, max_batch=a.max_batch, strategy=a.strategy,
                           name=a.name, force=a.force)
    print(f"{out}: Triton model repository ({a.backend} backend); see docs/triton.md")


def _demo(a):
    from .demo import demo

    if not demo(a.dir):
        raise VerificationFailed("the demo export did not match the reference")


class _Help(argparse.HelpFormatter):
    """--help shows each option's default, unless the help text already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the same contract as bad input: one `error:` line on stderr, exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# Argument types: each raises ArgumentTypeError, which _Parser prints as one `error:` line (exit 2), so a bad value
# is refused before any work starts instead of failing deep inside numpy.

def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def _temperature(text: str) -> float:
    t = _number(text)
    if not (math.isfinite(t) and t >= 0):  # nan passes `t >= 0 or ...` checks silently
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 = greedy), got {text!r}")
    return t


def _top_p(text: str) -> float:
    p = _number(text)
    if not 0 < p <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return p


def _max_tokens(text: str) -> int:
    n = _number(text, int)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return n


def _positive(text: str) -> int:
    n = _number(text, int)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return n


def _seed(text: str) -> int:
    n = _number(text, int)
    if not 0 <= n < 2 ** 63:  # what numpy's default_rng accepts
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {text!r}")
    return n


def _prompt(text: str) -> str:
    from .runtime.generate import check_prompt

    try:
        check_prompt(text)
    except RWKVDeployError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _describe(e: BaseException, command: str) -> str:
    """One line for an exception that reached the CLI boundary."""
    if isinstance(e, MemoryError):
        return f"out of memory while running `{command}`; free memory or use a smaller model, batch or token count"
    if isinstance(e, RecursionError):
        return f"recursion limit reached while running `{command}` (is an input file nested too deeply?)"
    if isinstance(e, UnicodeError):
        return f"{e} (text in an argument or file that is not UTF-8, or output the terminal cannot encode)"
    if isinstance(e, OSError) and e.strerror:
        files = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{files}: {e.strerror}" if files else e.strerror
    return str(e) or type(e).__name__


def _session_options(s, backend_help: str) -> None:
    """The options that pick and tune the Session (`run` and `verify`)."""
    s.add_argument("--backend", default="ort", help=backend_help)  # checked by the library (one message for all)
    s.add_argument("--provider", choices=["cpu", "cuda"],
                   help="ort: ONNX Runtime execution provider (default: cuda if this onnxruntime has it, else cpu; "
                        "cuda keeps the state on the GPU); torch: the device (default cpu)")
    s.add_argument("--threads", type=_positive, help="CPU threads (default: the runtime's own choice)")
    s.add_argument("--trust-custom-ops", action="store_true",
                   help="load a custom-op library that this installation did not build (it runs native code)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rwkv-deploy", description="Export RWKV checkpoints to ONNX with certified parity.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--version", action="version", version=f"rwkv-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="version, dimensions, parameters and state table of a checkpoint")
    s.add_argument("checkpoint", help="BlinkDL .pth, .safetensors, or Hugging Face RWKV-4 folder")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--values", action="store_true",
                   help="also read every value (NaN/Inf check); by default only headers and shapes are read")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("export", help="checkpoint -> export folder (ONNX graphs + manifest.json)")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, help="export folder to create")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8", "int4"],
                   help="weights and activations; int8/int4: projections and head quantized, computed in float32")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.add_argument("--tokenizer", help="tokenizer file to copy in: tokenizers .json or RWKV World .txt")
    s.add_argument("--external-data", action="store_true",
                   help="weights in weights.onnx.data, shared by both graphs (automatic above 1.8 GB)")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    s.add_argument("--prefill", nargs="?", const="last", choices=["last", "all"],
                   help="also write prefill.onnx: a whole prompt in one call, returning the logits of the last "
                        "position (default) or of all positions")
    s.add_argument("--wkv", default="portable", choices=["portable", "fused"],
                   help="portable (standard ONNX ops, default) or fused (one rwkv::WKV node per layer; needs the "
                        "custom-op library, built on first use)")
    s.add_argument("--matmul", choices=["portable", "cpu"],
                   help="the step graph's fp16/int8/int4 products: portable (ONNX ops, any runtime) or cpu (the "
                        "library's x86 kernels read the stored weights as they are: fastest on a CPU, not for GPUs or "
                        "TensorRT; needs --wkv fused). Default: cpu for fused int8/int4, else portable")
    s.add_argument("--ort-include", help="ONNX Runtime headers for building the custom-op library (default: fetched "
                                         "with npm)")
    s.set_defaults(fn=_export)

    s = sub.add_parser("verify", help="step-by-step parity of an export against the PyTorch reference")
    s.add_argument("folder")
    s.add_argument("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
    s.add_argument("--steps", type=_positive, default=64, help="tokens to step through (default 64)")
    s.add_argument("--batch", type=_positive, default=1, help="independent token streams (default 1)")
    s.add_argument("--seed", type=_seed, default=0, help="seed of the random token stream (default 0)")
    s.add_argument("--json", help="also write the report here (OUT/verify.json is always written)")
    s.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)  # always on now; kept for old scripts
    _session_options(s, "the export runs on: ort (ONNX Runtime, default), trt (its TensorRT engines, on a GPU) or "
                        "torch (the PyTorch reference at the export's precision, a check of the harness)")
    s.set_defaults(fn=_verify)

    s = sub.add_parser("run", help="generate text with an export folder (or a checkpoint with --backend torch)")
    s.add_argument("model", metavar="OUT_OR_CKPT", help="export folder, or a checkpoint with --backend torch")
    s.add_argument("--prompt", required=True, type=_prompt, help="UTF-8 text to continue")
    s.add_argument("--max-tokens", type=_max_tokens, default=100, help="tokens to generate (default 100)")
    s.add_argument("--temperature", type=_temperature, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=_top_p, default=0.85, help="nucleus sampling mass, in (0, 1] (default 0.85)")
    s.add_argument("--seed", type=_seed, help="fix for reproducible output: an integer in [0, 2**63)")
    _session_options(s, "ort (ONNX Runtime on an export folder, default), trt (its TensorRT engines, on a GPU) or "
                        "torch (the PyTorch reference, on a checkpoint or on an export folder's source checkpoint)")
    s.set_defaults(fn=_run)

    s = sub.add_parser("build-ops", help="build the ONNX Runtime custom-op library (fused WKV) and print its path")
    s.add_argument("--force", action="store_true", help="rebuild even if it is built")
    s.add_argument("--ort-include", help="ONNX Runtime headers (default: fetched with npm)")
    s.add_argument("--cuda", action="store_true",
                   help="also CUDA-provider kernels (needs nvcc): librwkv_ops_cuda.so, for onnxruntime-gpu")
    s.set_defaults(fn=_build_ops)

    s = sub.add_parser("check", help="replay the golden logits of an export folder with ONNX Runtime (no torch)")
    s.add_argument("folder")
    s.add_argument("--trust-custom-ops", action="store_true",
                   help="load a custom-op library that this installation did not build (it runs native code)")
    s.set_defaults(fn=_check)

    s = sub.add_parser("tokenizer", help="attach or replace the tokenizer of an export folder (no re-export)")
    s.add_argument("folder")
    s.add_argument("file", help="tokenizers .json or RWKV World .txt")
    s.set_defaults(fn=_tokenizer)

    s = sub.add_parser("engine", help="build TensorRT engines for an export folder's graphs (listed in its manifest)")
    s.add_argument("folder")
    s.add_argument("--max-batch", type=_positive, default=8, help="largest batch the engines take")
    s.add_argument("--max-seq", type=_positive, default=512, help="longest prompt the prefill engine takes")
    s.add_argument("--target", nargs="+", metavar="SM",
                   help="TensorRT-RTX target GPUs, e.g. SM89 SM120 (default: this machine's GPU)")
    s.add_argument("--timing-cache", metavar="FILE", help="TensorRT timing cache to read and update")
    s.set_defaults(fn=_engine)

    s = sub.add_parser("triton", help="a Triton Inference Server model repository serving an export folder")
    s.add_argument("folder", metavar="OUT", help="export folder")
    s.add_argument("-o", "--output", required=True, help="repository folder to create")
    s.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt", "python"],
                   help="Triton backend: onnxruntime or tensorrt (implicit state in Triton), or python (our "
                        "ONNX Runtime session; state per sequence in the model; prompts in one request)")
    s.add_argument("--max-batch", type=_positive, default=8, help="largest batch of sequences run at once")
    s.add_argument("--strategy", default="oldest", choices=["oldest", "direct"],
                   help="sequence batcher strategy: oldest (dynamic batches of sequences) or direct (a batch slot "
                        "per sequence)")
    s.add_argument("--name", default="rwkv", help="model name in the repository")
    s.add_argument("--force", action="store_true", help="replace an existing repository written by this command")
    s.set_defaults(fn=_triton)

    s = sub.add_parser("bench", help="decode/prefill tok/s, time to first token, peak RSS and the bandwidth floor")
    s.add_argument("target", help="export folder (or a checkpoint with --backend torch)")
    s.add_argument("--batch", type=_positive, default=1, help="sequences stepped together (default 1)")
    s.add_argument("--tokens", type=_positive, default=64, help="decode steps per repeat (default 64)")
    s.add_argument("--prompt-len", type=_positive, default=256, help="prompt length for prefill (default 256)")
    s.add_argument("--repeats", type=_positive, default=5, help="timed repeats; the median is reported (default 5)")
    s.add_argument("--against", nargs="+", choices=["rwkv"], default=[],
                   help="also time the official rwkv package on the export's source .pth, in the same run")
    s.add_argument("--json", help="write the results here (a list, one entry per run)")
    s.add_argument("--plot", help="write a PNG of tok/s with the bandwidth floor drawn (needs matplotlib)")
    s.add_argument("--plot-with", nargs="+", default=[], metavar="JSON",
                   help="earlier --json files to put in the same plot and JSON (e.g. other precisions)")
    _session_options(s, "ort (ONNX Runtime, default), trt (TensorRT engines) or torch (the PyTorch reference)")
    s.set_defaults(fn=_bench)

    s = sub.add_parser("demo", help="make, export, verify and run a small model: no files needed")
    s.add_argument("--dir", default="rwkv-deploy-demo", help="working folder (default ./rwkv-deploy-demo)")
    s.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    # Progress and warnings go to stderr, results to stdout. The handler lives only for this call, so calling
    # main() again in the same process (tests, notebooks) does not print every log line twice.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if a.debug else "%(message)s"))
    log = logging.getLogger("rwkv_deploy")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if a.debug else logging.INFO)
    try:
        a.fn(a)
    except VerificationFailed as e:
        print(f"verification failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (RWKVDeployError, OSError, MemoryError, RecursionError, UnicodeError) as e:
        # Bad input and what the machine refuses (missing file, full disk, out of memory) are one line, exit 2;
        # anything else is a bug and keeps its traceback.
        if a.debug:
            raise
        print(f"error: {_describe(e, a.command)}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
