"""Exception types of the public API.

Every error a user can cause (a wrong path, a mismatching checkpoint, a bad argument) is raised as a subclass of
:class:`AmapError` with a one-line message that names the file or argument and says how to fix it. The CLI prints
that line and exits with a non-zero code instead of showing a traceback.
"""
from __future__ import annotations

__all__ = ['AmapError', 'CheckpointError', 'DataError', 'ConfigError', 'ModelError']


class AmapError(Exception):
    """Base class of all errors caused by user input."""


class CheckpointError(AmapError):
    """A checkpoint file is missing, unreadable, unsafe, or does not match the model."""


class DataError(AmapError):
    """A dataset folder is missing, empty, or holds unreadable images."""


class ConfigError(AmapError):
    """An argument or configuration value is invalid."""


class ModelError(AmapError):
    """A model name or model argument is unknown or invalid."""
