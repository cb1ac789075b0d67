"""Atomic, pickle-free file I/O: JSON and safetensors written through a temp file in the same folder + ``os.replace``.

A reader therefore sees either the previous file or the new one, never a half-written file, whatever kills the
writer (SIGKILL, power loss after ``fsync``, a full disk). A writer that fails (disk full, no permission, read-only
file system) removes its temp file and raises :class:`amap.errors.OutputError` with one line naming the output and
the fix; readers turn unreadable files into :class:`amap.errors.CheckpointError` with one line naming the file.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, OutputError

__all__ = [
    'atomic_path', 'atomic_dir', 'remove_dir', 'remove_stale_temps', 'atomic_write_bytes', 'atomic_write_json',
    'atomic_write_safetensors', 'read_json', 'read_safetensors', 'read_safetensors_metadata', 'to_jsonable',
    'JsonlWriter', 'output_error',
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / file system
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def output_error(path: str | os.PathLike, err: OSError | int | None, *, atomic: bool = True) -> OutputError:
    """The one-line :class:`~amap.errors.OutputError` for an output that could not be written.

    Args:
        path: The output file or folder (its final name, not a temp name).
        err: The ``OSError`` (or its errno) that stopped the write.
        atomic: The writer left the previous version unchanged (say so in the message).
    """
    code = err.errno if isinstance(err, OSError) else err
    if code == errno.ENOSPC:
        why = 'the disk is full (no space left on device); free disk space or write to another folder'
    elif code == getattr(errno, 'EDQUOT', None):
        why = 'the disk quota is exceeded (no space left for this user); free disk space or write to another folder'
    elif code == errno.EFBIG:
        why = 'the file is larger than the file system or the file-size limit (ulimit -f) allows; free space, ' \
              'raise the limit or write to another folder'
    elif code == errno.EROFS:
        why = 'the file system is read-only; write to another folder'
    elif code in (errno.EACCES, errno.EPERM):
        why = f'permission denied; make {Path(path).parent} writable (chmod u+w) or write to another folder'
    else:
        text = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else 'unknown error'
        reason = (err.strerror if isinstance(err, OSError) else None) or (os.strerror(code) if code else text)
        why = f'{reason}; check that the folder exists, is writable and has free space'
    kept = ' (any previous version is unchanged)' if atomic else ''
    return OutputError(f'cannot write {path}: {why}{kept}', path=os.fspath(path), errno=code)


def _as_output_error(exc: BaseException, final: Path, tmp: Path) -> OutputError | None:
    """``exc`` as an OutputError naming ``final`` instead of the temp path ``tmp`` (None for other errors)."""
    if isinstance(exc, OutputError):  # from a writer nested in atomic_dir's temp folder: name the final path
        if not exc.path or str(tmp) not in str(exc):
            return exc
        where = Path(exc.path)
        with contextlib.suppress(ValueError):
            where = final / where.relative_to(tmp)
        return OutputError(str(exc).replace(str(tmp), str(final)), path=os.fspath(where), errno=exc.errno)
    if isinstance(exc, OSError):
        where = final
        if exc.filename:
            with contextlib.suppress(ValueError, TypeError):
                where = final / Path(os.fsdecode(exc.filename)).relative_to(tmp)
        return output_error(where, exc)
    return None


def _remove(path: Path) -> None:
    """Delete a file or folder if present, ignoring errors (cleanup must never hide the original error)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def _completing(path: Path, tmp: Path) -> Iterator[None]:
    """Guard the block that fills ``tmp`` and renames it to ``path``: an error becomes an :class:`OutputError` naming
    ``path`` (where it is one the user can fix), and ``tmp`` is removed whatever happens."""
    try:
        yield
    except (OSError, OutputError) as e:
        converted = _as_output_error(e, path, tmp)
        if converted is e:
            raise
        raise converted from None
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` atomically, on error it is removed.

    Args:
        path: Final file path.
        fsync: Flush the file and its folder to disk before/after the rename.

    Raises:
        OutputError: the file cannot be written (disk full, no permission, ...); ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
        os.close(fd)
    except OSError as e:
        raise output_error(path, e) from None
    tmp = Path(name)
    with _completing(path, tmp):
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        if fsync:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # <linux/fs.h>


@functools.lru_cache(maxsize=1)
def _renameat2() -> Any:
    if not sys.platform.startswith('linux'):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform or file system cannot do it; raises ``OSError`` for other failures.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _old_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.old')


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; on success it is renamed to ``path``.

    A folder of several files thus appears complete or not at all. If ``path`` already exists, the two folders are
    swapped in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``) and the old one is deleted, so a reader always
    finds the old or the new folder. Where the swap is unavailable, the old folder is renamed aside to
    ``.<name>.old`` first (POSIX cannot rename a folder onto a non-empty one); if the writer dies between the two
    renames, :func:`remove_stale_temps` (or the next write) puts the old folder back.

    Raises:
        OutputError: the folder cannot be written (disk full, no permission, ...); ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _restore_old(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'))
    except OSError as e:
        raise output_error(path, e) from None
    with _completing(path, tmp):
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), 'rb') as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
        if path.exists() or path.is_symlink():
            if not _exchange(tmp, path):  # tmp now holds the old folder (deleted below)
                old = _old_name(path)
                _remove(old)
                os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)


def _restore_old(path: Path) -> bool:
    """Put back ``.<name>.old`` when ``path`` is missing: a writer died between the two renames of the fallback."""
    old = _old_name(path)
    if old.is_dir() and not (path.exists() or path.is_symlink()):
        os.replace(old, path)
        return True
    return False


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a folder so that it disappears in one step: it is renamed to a hidden temp name, then deleted.

    A plain ``shutil.rmtree`` killed half-way leaves a folder with the old name and part of its files (e.g. a
    ``step_<N>`` checkpoint folder without its ``state.json``); here a killed deletion leaves only a
    ``.<name>.<random>.tmp`` folder, which :func:`remove_stale_temps` deletes. Errors are ignored (this is cleanup).
    """
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return
    doomed = path.with_name(f'.{path.name}.{secrets.token_hex(4)}.tmp')
    try:
        os.replace(path, doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files/folders left in ``folder`` by writers killed mid-write (``.<name>.<random>.tmp``/``.old``).

    A ``.<name>.old`` folder whose ``<name>`` is missing is the previous version of a folder whose replacement was
    interrupted (see :func:`atomic_dir`): it is renamed back instead. Errors are ignored (this is only cleanup).
    Call it only when no other writer uses the folder. Returns how many entries were removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if not p.name.startswith('.'):
            continue
        if p.name.endswith('.old') and len(p.name) > len('..old'):
            with contextlib.suppress(OSError):
                if _restore_old(folder / p.name[1:-len('.old')]):
                    removed += 1
                    continue
        if p.name.endswith('.tmp') or p.name.endswith('.old'):
            _remove(p)
            removed += 1
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    Raises:
        OutputError: the file cannot be written (disk full, no permission, ...); ``path`` is left as it was.
    """
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def to_jsonable(obj: Any) -> Any:
    """Convert tuples, paths, numpy and 0-d torch values, and non-finite floats into plain JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, 'tolist') and not isinstance(obj, (str, bytes)):  # numpy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # 'nan' / 'inf': valid JSON everywhere, unlike NaN
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f'cannot store a {type(obj).__name__} in JSON')


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`to_jsonable` for accepted values).

    Raises:
        OutputError: the file cannot be written (disk full, no permission, ...); ``path`` is left as it was.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, sort_keys=False)
    atomic_write_bytes(path, (text + '\n').encode())


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU tensors; tensors sharing storage (tied weights) are cloned: safetensors refuses them."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != 'cpu':
            t = t.cpu()
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:
            t = t.clone()
        else:
            seen.add(ptr)
        out[name] = t
    return out


def atomic_write_safetensors(
        path: str | os.PathLike,
        tensors: Mapping[str, torch.Tensor],
        *,
        metadata: Mapping[str, str] | None = None,
) -> None:
    """Write tensors (and string metadata in the header) to a safetensors file atomically.

    Raises:
        OutputError: the file cannot be written (disk full, no permission, ...); ``path`` is left as it was.
    """
    prepared = _prepare_tensors(tensors)
    with atomic_path(path) as tmp:
        try:
            save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)
        except SafetensorError as e:  # an I/O error in safetensors' Rust writer: '... (os error 28)'
            found = re.search(r'os error (\d+)', str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(tmp)) from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file raises :class:`CheckpointError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f'{path}: file not found') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f'{path}: not a readable JSON file ({e}); the file is corrupt or truncated') from None


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors header (empty when there is none)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: file not found')
    try:
        with safe_open(str(path), framework='pt') as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path}: not a valid safetensors file ({e}); the file is corrupt or truncated') from None


def read_safetensors(
        path: str | os.PathLike,
        *,
        device: str | torch.device = 'cpu',
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read all tensors and the header metadata of a safetensors file.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: file not found')
    try:
        with safe_open(str(path), framework='pt', device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f'{path}: not a valid safetensors file ({e}); the file is corrupt or truncated') from None
    return tensors, meta


class JsonlWriter:
    """Append-only JSON-lines log (one record per line, flushed per record); a no-op when ``enabled`` is False.

    A torn last line left by a killed writer is terminated before new records are appended, so every complete line
    stays parseable. A failing write (disk full, no permission) raises :class:`~amap.errors.OutputError`.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                torn = self.path.is_file() and self.path.stat().st_size > 0 and \
                    not self.path.read_bytes().endswith(b'\n')
                self._file = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in close())
                if torn:
                    self._file.write('\n')
            except OSError as e:
                self.close()
                raise output_error(self.path, e, atomic=False) from None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        if self._file is not None:
            line = json.dumps(to_jsonable(record)) + '\n'
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as e:
                raise output_error(self.path, e, atomic=False) from None

    def close(self) -> None:
        """Close the file (further writes are dropped)."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # a buffered tail that no longer fits was reported by write()
                file.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
