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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rwkv-deploy", description="Export RWKV checkpoints to ONNX with certified parity.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("inspect", help="version, dimensions, parameters and state table of a checkpoint")
    s.add_argument("checkpoint", help="BlinkDL .pth, .safetensors, or Hugging Face RWKV-4 folder")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
