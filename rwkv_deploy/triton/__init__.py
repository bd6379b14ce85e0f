"""Triton Inference Server model repositories from export folders (`rwkv-deploy triton`); docs/triton.md.

Imports nothing heavy: the Python-backend model (python_model.py) imports `rwkv_deploy.triton.sequences` inside
the server, where neither torch nor onnx is installed.
"""


def write_repository(export, out, **kw):
    """See triton.repository.write_repository."""
    from .repository import write_repository as _write

    return _write(export, out, **kw)
