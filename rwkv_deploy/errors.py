"""The one exception type for user errors (bad input, bad usage)."""


class RWKVDeployError(Exception):
    """A problem with what the user gave us. The CLI prints it as one `error:` line and exits 2."""


class VerificationFailed(Exception):
    """A verification ran and its result is out of tolerance (CLI exit code 1)."""
