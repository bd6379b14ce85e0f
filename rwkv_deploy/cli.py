"""Command line: each command is one library call; only this module prints."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .errors import RWKVDeployError, VerificationFailed


def _inspect(a):
    from .inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(a.checkpoint)
    print(json.dumps(info, indent=2) if a.json else format_inspect(info))


def _export(a):
    from .exporters.export import export

    export(a.checkpoint, a.output, precision=a.precision, opset=a.opset, tokenizer=a.tokenizer,
           external_data=True if a.external_data else None, force=a.force, prefill=a.prefill, wkv=a.wkv,
           ort_include=a.ort_include)


def _verify(a):
    from .validation.compare import verify

    report = verify(a.folder, checkpoint=a.checkpoint, steps=a.steps, batch=a.batch, seed=a.seed, json_path=a.json,
                    floor=a.float64)
    print(report.table())
    if not report:
        raise VerificationFailed("; ".join(report.failures()))


def _run(a):
    from .runtime.generate import generate
    from .runtime.session import open_session

    sess = open_session(a.folder)
    sys.stdout.write(a.prompt)
    for piece in generate(sess, a.prompt, a.max_tokens, a.temperature, a.top_p, a.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _build_ops(a):
    from .custom_ops.build import build_library

    print(build_library(force=a.force, ort_include=a.ort_include, cuda=a.cuda))


def _demo(a):
    from .demo import demo

    if not demo(a.dir):
        raise VerificationFailed("the demo export did not match the reference")


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the same contract as bad input: one `error:` line on stderr, exit code 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rwkv-deploy", description="Export RWKV checkpoints to ONNX with certified parity.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="version, dimensions, parameters and state table of a checkpoint")
    s.add_argument("checkpoint", help="BlinkDL .pth, .safetensors, or Hugging Face RWKV-4 folder")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("export", help="checkpoint -> export folder (ONNX graphs + manifest.json)")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, help="export folder to create")
    s.add_argument("--precision", default="fp32", help="fp32 (default) or fp16")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.add_argument("--tokenizer", help="tokenizer file to copy in: tokenizers .json or RWKV World .txt")
    s.add_argument("--external-data", action="store_true",
                   help="weights in weights.onnx.data, shared by both graphs (automatic above 1.8 GB)")
    s.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    s.add_argument("--prefill", nargs="?", const="last", choices=["last", "all"],
                   help="also write prefill.onnx: a whole prompt in one call, returning the logits of the last "
                        "position (default) or of all positions")
    s.add_argument("--wkv", default="portable",
                   help="portable (standard ONNX ops, default) or fused (one rwkv::WKV node per layer; needs the "
                        "custom-op library, built on first use)")
    s.add_argument("--ort-include", help="ONNX Runtime headers for building the custom-op library (default: fetched "
                                         "with npm)")
    s.set_defaults(fn=_export)

    s = sub.add_parser("verify", help="step-by-step parity of an export against the PyTorch reference")
    s.add_argument("folder")
    s.add_argument("--checkpoint", help="reference checkpoint (default: the one recorded in the manifest)")
    s.add_argument("--steps", type=int, default=64)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--seed", type=int, default=0, help="seed of the random token stream")
    s.add_argument("--json", help="also write the report here (OUT/verify.json is always written)")
    s.add_argument("--float64", action="store_true",
                   help="also run a float64 reference and report how far fp32 itself is from it (the floor)")
    s.set_defaults(fn=_verify)

    s = sub.add_parser("run", help="generate text with an export folder")
    s.add_argument("folder")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-tokens", type=int, default=100)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=0.85)
    s.add_argument("--seed", type=int, help="fix for reproducible output")
    s.set_defaults(fn=_run)

    s = sub.add_parser("build-ops", help="build the ONNX Runtime custom-op library (fused WKV) and print its path")
    s.add_argument("--force", action="store_true", help="rebuild even if it is built")
    s.add_argument("--ort-include", help="ONNX Runtime headers (default: fetched with npm)")
    s.add_argument("--cuda", action="store_true",
                   help="also CUDA-provider kernels (needs nvcc): librwkv_ops_cuda.so, for onnxruntime-gpu")
    s.set_defaults(fn=_build_ops)

    s = sub.add_parser("demo", help="make, export, verify and run a small model: no files needed")
    s.add_argument("--dir", default="rwkv-deploy-demo", help="working folder (default ./rwkv-deploy-demo)")
    s.set_defaults(fn=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # progress and warnings go to stderr, results to stdout
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s" if a.debug else "%(message)s"))
    root = logging.getLogger("rwkv_deploy")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if a.debug else logging.INFO)
    try:
        a.fn(a)
    except RWKVDeployError as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerificationFailed as e:
        print(f"verification failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
