"""Exceptions whose message is meant for the user; the CLI prints them as one line."""


class NTMError(Exception):
    """Base class of user-facing errors (bad data, unknown names, unreadable checkpoints)."""


class DataError(NTMError, ValueError):
    """The data could not be loaded or has the wrong shape or values."""


class CheckpointError(NTMError):
    """A checkpoint is missing, corrupt, or not an ntm checkpoint."""


class ConfigError(NTMError, ValueError):
    """An unknown preset, option or inconsistent configuration."""
