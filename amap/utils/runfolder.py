"""Run folders you can trust: one writer at a time, ``--resume`` only of the same run, only names AMAP owns.

Every command that writes a run folder (``train``, ``prune``, ``export``, with or without ``--resume``) calls
:func:`run_lock` before it writes anything, then :func:`begin_run`:

* **One writer.** :func:`run_lock` takes an exclusive ``fcntl.flock`` on ``<folder>/.amap-run.lock`` and writes its
  PID into it. A second writer gets :class:`~amap.errors.FolderInUse`, one line naming the folder and the PID that
  holds it. The kernel releases the lock when the holder's last file descriptor closes, so a SIGKILLed run never
  leaves a stale lock; forked children (data-loader workers) close their inherited copy at once, so a killed run's
  surviving workers do not hold it either. The lock file is removed on release. Readers (``eval``, ``report``,
  ``macs``) never take it. Under DDP only rank 0 locks and every rank gets the same outcome.
* **Only its own names.** :func:`begin_run` refuses a folder that holds, under a name the command writes, something
  AMAP did not write (one line suggesting ``--overwrite`` or another folder). What AMAP wrote is recorded in
  ``<folder>/.amap-run.json`` (the manifest: the names each command writes there, claimed before it writes them,
  and one record per command with its run id).
* **Resume what is there, as it was started.** ``--resume`` on a folder without a run of the command is an error
  naming ``--resume``; :func:`check_resume` (used by training and by the pruning pipeline) refuses to continue with
  settings that change the result, listing every differing key on one line.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import AmapError, ConfigError, FolderInUse
from .distributed import DistInfo, broadcast_object
from .io import atomic_write_json, output_error, read_json

__all__ = [
    'LOCK_FILE', 'MANIFEST_FILE', 'run_lock', 'lock_holder', 'begin_run', 'read_manifest', 'run_record',
    'check_resume', 'flatten_settings', 'file_digest',
]

LOCK_FILE = '.amap-run.lock'
MANIFEST_FILE = '.amap-run.json'
_MANIFEST_FORMAT = 'amap.run/1'
_PID_WAIT_S = 1.0  # how long a refused writer waits for the holder to write its PID (it does so right after flock)

_held: dict[int, Path] = {}  # fd -> lock file held by this process


def _close_in_child() -> None:
    """After ``fork``: the child shares the parent's lock; closing its copy (no LOCK_UN, which would release the
    parent's) lets the lock go as soon as the parent's descriptor is closed, e.g. when the parent is SIGKILLed while
    its data-loader workers still run."""
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


# ------------------------------------------------------------------------------------------------------------- lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(fd: int) -> int | None:
    """The PID written in the lock file open as ``fd``, waiting briefly for a holder that has just taken it."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        with contextlib.suppress(OSError, ValueError):
            pid = int(os.pread(fd, 32, 0).decode().strip())
            if pid > 0 and _pid_alive(pid):  # not the PID a SIGKILLed holder left behind
                return pid
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _busy(folder: Path, pid: int | None, arg: str) -> FolderInUse:
    who = f'PID {pid}' if pid is not None else 'PID unknown'
    return FolderInUse(f'{arg} {folder} is in use by another AMAP process ({who}), which is writing there; wait for '
                       f'it to finish or choose another {arg}', path=os.fspath(folder), pid=pid)


def _acquire(folder: Path, arg: str) -> int:
    """Lock ``folder`` (which exists) and return the lock file's descriptor."""
    path = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise output_error(path, e, atomic=False) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd) if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _busy(folder, pid, arg) from None
            raise output_error(path, e, atomic=False) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder removed between our open() and flock()
            _held[fd] = path
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
            except OSError as e:
                _release(fd)
                raise output_error(path, e, atomic=False) from None
            return fd
        os.close(fd)


def _release(fd: int) -> None:
    path = _held.pop(fd, None)
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking: a waiter that opened it sees a removed file and opens a new one
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _agree(info: DistInfo | None, action: Callable[[], Any]) -> Any:
    """Run ``action`` on rank 0 only; every rank returns its result or raises its :class:`AmapError`."""
    outcome: tuple[Any, AmapError | None] = (None, None)
    if info is None or info.is_main:
        try:
            outcome = (action(), None)
        except AmapError as e:
            outcome = (None, e)
    if info is not None and info.distributed:
        result, error = broadcast_object(outcome if info.is_main else None)
        outcome = (result if info.is_main else None, error)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _new_dirs(folder: Path) -> list[Path]:
    """The folders that ``folder.mkdir(parents=True)`` would create, deepest first."""
    missing = []
    for p in (folder, *folder.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike, *, info: DistInfo | None = None, arg: str = '--out') -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (created if missing) for the duration of the block.

    If the block fails and the folder was created here, it is removed again when it holds nothing but AMAP's
    control files, so a refused ``--resume`` or a bad argument leaves no empty run folder behind.

    Args:
        folder: The run folder.
        info: Under DDP, only rank 0 locks; every rank raises the same error.
        arg: The option that named the folder, for the error message.

    Raises:
        FolderInUse: another process holds the lock (the message names its PID).
        OutputError: the folder or its lock file cannot be created.
    """
    folder = Path(folder)
    created = _new_dirs(folder)

    def take() -> int:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise output_error(folder, e, atomic=False) from None
        return _acquire(folder, arg)

    fd = _agree(info, take)
    try:
        yield folder
    except BaseException:
        left = set(os.listdir(folder)) if fd is not None and created and folder.is_dir() else None
        if left is not None and left <= {LOCK_FILE, MANIFEST_FILE}:
            with contextlib.suppress(OSError):
                (folder / MANIFEST_FILE).unlink(missing_ok=True)
            _release(fd)
            fd = None
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()
        raise
    finally:
        if fd is not None:
            _release(fd)


def lock_holder(folder: str | os.PathLike) -> int | None:
    """The PID of the process holding ``folder``'s writer lock: None when none holds it, -1 when it is held but the
    holder's PID cannot be read."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        pid = _read_pid(fd)
        os.close(fd)
        return pid if pid is not None else -1
    os.close(fd)  # closing releases the shared lock
    return None


# --------------------------------------------------------------------------------------------------------- manifest
def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``folder`` (``{'format', 'names', 'runs'}``), or None when AMAP has not written there."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get('format') != _MANIFEST_FORMAT:
        raise ConfigError(f'{path} is not a manifest of this AMAP version; delete it, or choose another --out')
    return doc


def run_record(folder: str | os.PathLike, command: str) -> dict[str, Any]:
    """What ``command`` recorded about its run in ``folder`` (e.g. input digests), empty when nothing."""
    manifest = read_manifest(folder) or {}
    return dict(((manifest.get('runs') or {}).get(command) or {}).get('record') or {})


def begin_run(
        folder: str | os.PathLike,
        *,
        command: str,
        names: Iterable[str],
        resume: bool,
        overwrite: bool,
        resumable: bool,
        record: Mapping[str, Any] | None = None,
        info: DistInfo | None = None,
) -> None:
    """Check ``folder`` for a run of ``command`` and claim the names it writes there; call it under :func:`run_lock`.

    Args:
        folder: The run folder (exists).
        command: ``'train'``, ``'prune'``, ...
        names: Every file or folder name the command writes in ``folder``.
        resume: The run continues the one in ``folder``.
        overwrite: The user allowed replacing what is there.
        resumable: ``folder`` holds what ``resume`` needs (checked only when resuming).
        record: Saved with a fresh run (e.g. the input checkpoint's digest); :func:`run_record` reads it back.
        info: Under DDP rank 0 checks and writes, and every rank raises the same error.

    Raises:
        ConfigError: ``--resume`` without a run to continue, or names in ``folder`` that AMAP did not write.
    """
    folder = Path(folder)
    names = list(dict.fromkeys(names))

    def check_and_claim() -> None:
        if resume and not resumable:
            raise ConfigError(f'--resume: {folder} holds no {command} run to continue; drop --resume to start one')
        manifest = read_manifest(folder)
        adopt = resume and manifest is None  # a run written before manifests existed, or copied here: resume it
        if not adopt and not overwrite:
            owned = set(manifest['names']) if manifest else set()
            foreign = [n for n in names if n not in owned and os.path.lexists(folder / n)]
            if foreign:
                listed = ', '.join(foreign[:4]) + (', ...' if len(foreign) > 4 else '')
                raise ConfigError(f'--out {folder} holds {listed}, which AMAP did not write (AMAP {command} writes '
                                  f'that name); move it away, pass --overwrite to replace it, or choose another --out')
        manifest = manifest or {'format': _MANIFEST_FORMAT, 'names': [], 'runs': {}}
        manifest['names'] = sorted(set(manifest['names']) | set(names))
        runs = manifest.setdefault('runs', {})
        if not resume or command not in runs:
            runs[command] = {'id': secrets.token_hex(8), 'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                             'record': dict(record or {})}
        atomic_write_json(folder / MANIFEST_FILE, manifest)

    _agree(info, check_and_claim)


# ----------------------------------------------------------------------------------------------------------- resume
def flatten_settings(doc: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested settings as ``{'data.batch_size': 32, ...}`` (``model_kwargs`` stays one value)."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        if isinstance(v, Mapping) and k != 'model_kwargs':
            out.update(flatten_settings(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # YAML/JSON turn tuples into lists
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_resume(saved: Mapping[str, Any], now: Mapping[str, Any], *, free: Collection[str], where: str) -> None:
    """Refuse to resume with settings that change the result; ``free`` lists the keys that may change.

    Args:
        saved: The settings the run was started with (nested mappings are compared key by key).
        now: The settings of this invocation.
        free: Flattened keys that may differ (threads, workers, logging, progress, device, ...).
        where: The run folder, for the message.

    Raises:
        ConfigError: one line listing every differing key with its saved and its new value.
    """
    old, new = flatten_settings(saved), flatten_settings(now)
    changed = [f'{k}={old.get(k)!r}, not {new.get(k)!r}' for k in sorted(set(old) | set(new))
               if k not in free and not _same(old.get(k), new.get(k))]
    if changed:
        raise ConfigError(f'--resume: the run in {where} was started with {"; ".join(changed)}; resume with the same '
                          f'settings or start a new run (--overwrite, or another --out)')


def file_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a weights file, or of the ``*.safetensors`` files directly in a run folder; None if missing."""
    if path is None:
        return None
    path = Path(path)
    files = sorted(path.glob('*.safetensors')) if path.is_dir() else [path] if path.is_file() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b'\0')
        with open(file, 'rb') as f:
            for block in iter(lambda f=f: f.read(1 << 20), b''):
                digest.update(block)
    return digest.hexdigest()
