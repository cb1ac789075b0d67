"""Atomic, pickle-free file I/O: JSON and safetensors written through a temp file in the same folder + ``os.replace``.

A reader therefore sees either the previous file or the new one, never a half-written file, whatever kills the
writer (SIGKILL, power loss after ``fsync``, a full disk). Readers turn unreadable files into
:class:`amap.errors.CheckpointError` with one line naming the file.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError

__all__ = [
    'atomic_path', 'atomic_dir', 'remove_stale_temps', 'atomic_write_bytes', 'atomic_write_json',
    'atomic_write_safetensors', 'read_json', 'read_safetensors', 'read_safetensors_metadata', 'to_jsonable',
    'JsonlWriter',
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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path next to ``path``; on success it replaces ``path`` atomically, on error it is removed.

    Args:
        path: Final file path.
        fsync: Flush the file and its folder to disk before/after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the permissions open() would
        if fsync:
            with open(tmp, 'rb+') as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to ``path``; on success it is renamed to ``path``.

    A folder of several files thus appears complete or not at all. If ``path`` already exists it is replaced: the
    old folder is renamed aside first and then deleted (POSIX cannot rename a folder onto a non-empty one), so use
    fresh names (e.g. numbered by step) where a reader must never miss the folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp'))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for child in tmp.iterdir():
            with open(child, 'rb') as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if path.exists():
            old = path.with_name(f'.{path.name}.old')
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files/folders left in ``folder`` by writers killed mid-write (``.<name>.<random>.tmp``/``.old``).

    Call it only when no other writer uses the folder. Returns how many entries were removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.iterdir():
        if p.name.startswith('.') and (p.name.endswith('.tmp') or p.name.endswith('.old')):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
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
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`to_jsonable` for accepted values)."""
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
    """Write tensors (and string metadata in the header) to a safetensors file atomically."""
    prepared = _prepare_tensors(tensors)
    with atomic_path(path) as tmp:
        save_file(prepared, str(tmp), metadata=dict(metadata) if metadata else None)


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
    stays parseable.
    """

    def __init__(self, path: str | os.PathLike, *, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self.path.is_file() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b'\n')
            self._file = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115 (closed in close())
            if torn:
                self._file.write('\n')

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record."""
        if self._file is not None:
            self._file.write(json.dumps(to_jsonable(record)) + '\n')
            self._file.flush()

    def close(self) -> None:
        """Close the file (further writes are dropped)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
