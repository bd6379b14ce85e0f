"""rwkv-deploy: RWKV checkpoints to ONNX with certified parity. Heavy imports happen inside functions."""
__version__ = "0.1.0"


def open_session(folder, *, trust_custom_ops: bool = False, **kw):
    """Open an export folder with ONNX Runtime (no torch needed); see runtime.session.OnnxSession.

    trust_custom_ops=True loads a custom-op library that this installation did not build (it runs native code).
    """
    from .runtime.session import open_session as _open

    return _open(folder, trust_custom_ops=trust_custom_ops, **kw)


def export(checkpoint, out, **kw):
    """Export a checkpoint to an export folder; see exporters.export.export."""
    from .exporters.export import export as _export

    return _export(checkpoint, out, **kw)
