"""Errors a user can act on. Each message says what went wrong and what to do."""


class ErqError(Exception):
    """Base of all user-facing engine errors (the CLI prints the message and exits with 2)."""


class ConfigError(ErqError, ValueError):
    """A parameter is out of range or malformed."""


class ModelLoadError(ErqError):
    """The model cannot be built or its weights cannot be had."""


class DatasetError(ErqError):
    """The dataset folder is missing, empty or holds unreadable files."""


class CheckpointError(ErqError):
    """A checkpoint or quantized folder is not what it claims to be."""
