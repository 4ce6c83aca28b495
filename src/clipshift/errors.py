"""Errors a user can act on: each message names the problem and the fix."""


class ClipshiftError(Exception):
    """Base of every error clipshift raises on purpose; the CLI prints these without a traceback."""


class ConfigError(ClipshiftError):
    """params.yaml or a flow parameter is invalid."""


class DataError(ClipshiftError):
    """Input data is missing, corrupt or inconsistent."""


class ValidationFailed(ClipshiftError):
    """A data-quality expectation failed: the message names the data, the rule and the report."""


class CheckpointError(ClipshiftError):
    """A checkpoint is missing, truncated, unsafe or incompatible."""
