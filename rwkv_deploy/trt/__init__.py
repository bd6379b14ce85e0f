"""TensorRT for export folders: engine building (engine.py), the rwkv::WKV* plugins (plugin.py), a TensorRT
Session (session.py) and the Polygraphy data loader that the engine command writes (data_loader.py).

TensorRT is optional: nothing here is imported by the rest of the package, and every entry point goes through
`import_tensorrt`, so a missing TensorRT is one error that names the extra to install.
"""
from __future__ import annotations

import importlib

from ..errors import RWKVDeployError

# full TensorRT first: where both are installed, the datacentre build is the one the user asked for
FLAVOURS = ("tensorrt", "tensorrt_rtx")
INSTALL = "pip install 'rwkv-deploy[trt]'"


def import_tensorrt():
    """(module, flavour): `tensorrt` if importable, else `tensorrt_rtx`, else an RWKVDeployError naming the extra."""
    for name in FLAVOURS:
        try:
            return importlib.import_module(name), name
        except ImportError:  # a stub wheel without libraries raises ImportError too
            continue
    raise RWKVDeployError(f"TensorRT is not installed (neither tensorrt nor tensorrt_rtx imports): {INSTALL} "
                          "(TensorRT-RTX; full TensorRT comes from NVIDIA's tensorrt package)")
