"""The PyTorch reference: checkpoint loading, the version registry, one module per version."""
from .checkpoint import Checkpoint, load_checkpoint
from .common import Dims, StateKind
from .model import RWKV, StateTensor, load_model, state_table
from .versions import VERSIONS, detect_version

__all__ = ["Checkpoint", "load_checkpoint", "Dims", "StateKind", "RWKV", "StateTensor", "load_model",
           "state_table", "VERSIONS", "detect_version"]
