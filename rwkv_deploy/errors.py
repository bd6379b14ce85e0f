"""The one exception type for user errors (bad input, bad usage)."""


class RWKVDeployError(Exception):
    """A problem with what the user gave us. The CLI prints it as one `error:` line and exits 2."""


class VerificationFailed(Exception):
    """A verification ran and its result is out of tolerance (CLI exit code 1)."""


def check_batch(batch) -> int:
    """A batch size is a whole number >= 1 (batch 0 would run a graph on empty tensors and fail somewhere inside)."""
    if isinstance(batch, bool) or not isinstance(batch, int) and not hasattr(batch, "__index__") or int(batch) < 1:
        raise RWKVDeployError(f"the batch size must be an integer >= 1, got {batch!r}")
    return int(batch)
