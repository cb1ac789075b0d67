"""Exception types of the public API.

Every error a user can cause (a wrong path, a mismatching checkpoint, a bad argument) is raised as a subclass of
:class:`AmapError` with a one-line message that names the file or argument and says how to fix it. The CLI prints
that line and exits with a non-zero code instead of showing a traceback.
"""
from __future__ import annotations

__all__ = ['AmapError', 'CheckpointError', 'DataError', 'ConfigError', 'ModelError', 'Interrupted', 'OutputError',
           'FolderInUse']


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


class Interrupted(AmapError):
    """A run was stopped by SIGINT/SIGTERM after writing its checkpoint; ``--resume`` continues it.

    Attributes:
        checkpoint: The checkpoint folder written before stopping (``None`` if the run had nothing to save).
        step: The last completed step.
    """

    def __init__(self, message: str, *, checkpoint: str | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


class OutputError(AmapError):
    """An output file or folder cannot be written (disk full, no permission, read-only file system).

    Raised by the atomic writers of :mod:`amap.utils.io` after they removed their temp file, so the previous version
    of the output (if any) is left unchanged.

    Attributes:
        path: The output file or folder that could not be written.
        errno: The operating system's error number (``errno.ENOSPC`` for a full disk), or None.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class FolderInUse(AmapError):
    """Another AMAP process is writing the run folder (see :func:`amap.utils.runfolder.run_lock`).

    Attributes:
        path: The folder.
        pid: The process holding its lock (None when it could not be read).
    """

    def __init__(self, message: str, *, path: str | None = None, pid: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.pid = pid
