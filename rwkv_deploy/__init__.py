"""rwkv-deploy: RWKV checkpoints to ONNX with certified parity. Heavy imports happen inside functions."""
__version__ = "0.1.0"


def open_session(path, backend: str = "ort", providers=None, threads=None, *, trust_custom_ops: bool = False,
                 **kw):
    """A Session (runtime/contract.py: init_state, step, prefill, forward, named State) on an export folder with
    ONNX Runtime (backend "ort": no torch needed), or on a checkpoint or an export's source checkpoint with the
    PyTorch reference (backend "torch"); see runtime.session.open_session.

    trust_custom_ops=True loads a custom-op library that this installation did not build (it runs native code).
    """
    from .runtime.session import open_session as _open

    return _open(path, backend, providers, threads, trust_custom_ops=trust_custom_ops, **kw)


def export(checkpoint, out, **kw):
    """Export a checkpoint to an export folder; see exporters.export.export."""
    from .exporters.export import export as _export

    return _export(checkpoint, out, **kw)
