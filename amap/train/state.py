"""The checkpoint codec: one folder format for training, the pruning search and the fine-tune.

A checkpoint is a folder ``<ckpt_dir>/step_<N>/`` holding ``state.safetensors`` (every tensor: weights, optimizer
moments, ...) and ``state.json`` (everything else: counters, optimizer hyper-parameters, scheduler, scaler, the RNG
states of every rank, history, config). Both files carry the same random ``id`` (the JSON also the format id
``amap.train_state/1``), so a pair that does not belong together is refused. The folder appears complete or not at
all (:func:`amap.utils.io.atomic_dir`), is then published by atomically replacing ``<ckpt_dir>/latest.json``, and the
older folders beyond the newest ``keep`` are deleted. Rank 0 writes; every rank learns whether the write failed.

:func:`write_state` / :func:`read_state` are the codec for any state (the pipeline stores the search with them);
:func:`save_train_state` / :func:`load_train_state` apply it to a :class:`~amap.train.loop.TrainState`.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..utils.distributed import DistInfo, all_gather_object
from ..utils.io import (
    atomic_dir,
    atomic_write_json,
    atomic_write_safetensors,
    read_json,
    read_safetensors,
    remove_dir,
    remove_stale_temps,
    to_jsonable,
)
from .loop import TrainState

__all__ = [
    'CHECKPOINT_DIR', 'STATE_FORMAT', 'rng_states', 'set_rng_states', 'restore_rng_states', 'optimizer_to_files',
    'optimizer_from_files', 'tensors_under', 'rank0_writes', 'write_state', 'read_state', 'latest_train_state',
    'save_train_state', 'load_train_state',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
STATE_FORMAT = 'amap.train_state/1'
LATEST = 'latest.json'
STATE_TENSORS = 'state.safetensors'
STATE_JSON = 'state.json'


# ------------------------------------------------------------------------------------------------------------ pieces
def rng_states() -> dict[str, Any]:
    """This process's Python, NumPy, torch (and initialised CUDA) RNG states, JSON-able."""
    state: dict[str, Any] = {
        'python': random.getstate(),
        'numpy': list(np.random.get_state()),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s for s in torch.cuda.get_rng_state_all()]
    return to_jsonable(state)


def set_rng_states(state: Mapping[str, Any]) -> None:
    """Restore the RNG states saved by :func:`rng_states` (CUDA only with the same number of devices)."""
    v, internal, gauss = state['python']
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.tensor(state['torch'], dtype=torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state['cuda']]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def restore_rng_states(doc: Mapping[str, Any], info: DistInfo | None = None) -> None:
    """Restore this rank's RNG states from a document read by :func:`read_state` (its ``rng`` entry: one state per
    rank; a single state, as search checkpoints of earlier versions hold, serves every rank)."""
    info = info or DistInfo()
    rngs = doc.get('rng') or []
    if isinstance(rngs, Mapping):
        set_rng_states(rngs)
        return
    if rngs:
        if len(rngs) != info.world_size:
            _logger.warning('checkpoint was written by %d processes, resuming with %d: RNG streams differ',
                            len(rngs), info.world_size)
        set_rng_states(rngs[info.rank % len(rngs)])


def optimizer_to_files(optimizer: torch.optim.Optimizer, *, prefix: str = 'optim') -> tuple[dict[str, torch.Tensor],
                                                                                           dict[str, Any]]:
    """Split an optimizer's state dict into tensors (``<prefix>.<param index>.<name>``) and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd['state'].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f'{prefix}.{idx}.{key}'] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd['param_groups']]
    tuples = sorted({k for g in sd['param_groups'] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {'param_groups': groups, 'tuple_keys': tuples, 'scalars': scalars}


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
                         prefix: str = 'optim') -> dict[str, Any]:
    """The optimizer state dict that :func:`optimizer_to_files` split (other tensors in ``tensors`` are ignored)."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors_under(tensors, prefix).items():
        idx, key = name.split('.', 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta['scalars'].items():
        state.setdefault(int(idx), {}).update(values)
    tuple_keys = set(meta.get('tuple_keys', ()))
    groups = [{k: (tuple(v) if k in tuple_keys and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta['param_groups']]
    return {'state': state, 'param_groups': groups}


def tensors_under(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors named ``<prefix>.<key>``, as ``{key: tensor}``."""
    head = prefix + '.'
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


@contextlib.contextmanager
def rank0_writes(what: str) -> Iterator[None]:
    """Run a block that only rank 0 executes (writing files); every rank learns whether it failed, so an error on
    rank 0 (disk full, permissions) raises on all ranks instead of leaving the others waiting in a collective.

    Raises:
        CheckpointError: the block failed on another rank (the rank that failed re-raises its own error).
    """
    failure: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  re-raised below on every rank
        if not _distributed_active():
            raise
        failure = e
    errors = all_gather_object(None if failure is None else f'{type(failure).__name__}: {failure}')
    if failure is not None:
        raise failure
    first = next((x for x in errors if x is not None), None)
    if first is not None:
        raise CheckpointError(f'writing the {what} failed on another rank ({first})')


def _distributed_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


# ------------------------------------------------------------------------------------------------------------ codec
def write_state(
        ckpt_dir: str | os.PathLike,
        *,
        step: int,
        tensors: Mapping[str, torch.Tensor],
        doc: Mapping[str, Any],
        keep: int = 2,
        info: DistInfo | None = None,
) -> Path | None:
    """Write a checkpoint folder ``ckpt_dir/step_<step>/``, publish it in ``latest.json`` and keep the newest ``keep``.

    A collective under DDP (the RNG states of every rank are gathered into the document); rank 0 writes.

    Args:
        ckpt_dir: The checkpoint folder.
        step: The step the state is at (names the folder).
        tensors: Every tensor of the state.
        doc: The JSON-able rest (``format``, ``id``, ``step``, ``rng``, ``world_size`` and ``time`` are added).
        keep: How many step folders to keep (older ones are deleted after the pointer moved).
        info: Distributed info (default: single process).

    Returns:
        The folder written (rank 0), else None.

    Raises:
        OutputError / CheckpointError: the folder could not be written (on this or another rank).
    """
    info = info or DistInfo()
    rngs = all_gather_object(rng_states())
    folder = None
    with rank0_writes(f'checkpoint {ckpt_dir}'):
        if info.is_main:
            full = {'format': STATE_FORMAT, 'id': uuid.uuid4().hex, 'step': step, **doc, 'rng': rngs,
                    'world_size': info.world_size, 'time': time.time()}
            folder = _write_folder(Path(ckpt_dir), full, tensors, keep)
    return folder


def _write_folder(ckpt_dir: Path, doc: dict[str, Any], tensors: Mapping[str, torch.Tensor], keep: int) -> Path:
    step, save_id = doc['step'], doc['id']
    name = f'step_{step:09d}'
    with atomic_dir(ckpt_dir / name) as tmp:
        atomic_write_safetensors(tmp / STATE_TENSORS, dict(tensors),
                                 metadata={'format': STATE_FORMAT, 'id': save_id, 'step': str(step)})
        atomic_write_json(tmp / STATE_JSON, doc)
    counters = {k: doc[k] for k in ('epoch', 'batch_in_epoch') if k in doc}
    atomic_write_json(ckpt_dir / LATEST, {'step': step, 'dir': name, 'id': save_id, **counters})
    old = sorted(p for p in ckpt_dir.glob('step_*') if p.is_dir() and p.name != name)
    for p in old[:max(len(old) - (keep - 1), 0)]:
        remove_dir(p)  # never a half-deleted step folder under a checkpoint name
    remove_stale_temps(ckpt_dir)  # left by a run killed while writing
    return ckpt_dir / name


def read_state(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the document of a checkpoint folder written by :func:`write_state`.

    A search-state folder of earlier versions (no format and no id in either file) is read as it is.

    Raises:
        CheckpointError: a file is missing or corrupt, or the two files do not belong together.
    """
    folder = Path(folder)
    doc = read_json(folder / STATE_JSON)
    tensors, meta = read_safetensors(folder / STATE_TENSORS)
    if not isinstance(doc, dict):
        raise CheckpointError(f'{folder}: {STATE_JSON} is not a checkpoint document; resume from another folder')
    legacy = 'format' not in doc and 'id' not in doc and 'id' not in meta and 'step' in doc
    if not legacy and (doc.get('format') != STATE_FORMAT or meta.get('id') != doc.get('id')):
        raise CheckpointError(f'{folder}: {STATE_JSON} and {STATE_TENSORS} do not belong together (ids '
                              f'{doc.get("id")} vs {meta.get("id")}); resume from another checkpoint folder')
    return tensors, doc


def latest_train_state(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under a run folder, checkpoint folder, or a step folder itself.

    Follows ``latest.json``; if it is missing or broken, falls back to the newest complete ``step_*`` folder.
    Returns None when there is no checkpoint.
    """
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    ckpt_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    if not ckpt_dir.is_dir():
        return None
    try:
        pointer = read_json(ckpt_dir / LATEST)
        folder = ckpt_dir / str(pointer['dir'])
        if (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file():
            return folder
    except (CheckpointError, KeyError, TypeError):
        pass
    candidates = sorted((p for p in ckpt_dir.glob('step_*') if p.is_dir()), reverse=True)
    for folder in candidates:
        if (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file():
            _logger.warning('%s: latest.json is missing or stale; using %s', ckpt_dir, folder.name)
            return folder
    return None


# ------------------------------------------------------------------------------------------------------------ training
def save_train_state(
        ckpt_dir: str | os.PathLike,
        state: TrainState,
        *,
        extra: Mapping[str, Any] | None = None,
        keep: int = 2,
        info: DistInfo | None = None,
) -> Path | None:
    """Checkpoint ``state`` to ``ckpt_dir/step_<N>/`` and publish it in ``ckpt_dir/latest.json``.

    A collective under DDP (RNG states are gathered from every rank); rank 0 writes, all ranks leave together.

    Args:
        ckpt_dir: Checkpoint folder (usually ``out_dir/checkpoints``).
        state: The state to save.
        extra: More JSON-able entries for ``state.json`` (e.g. the config).
        keep: How many step folders to keep (older ones are deleted after the pointer moved).
        info: Distributed info (default: single process).

    Returns:
        The folder written (rank 0), else None.
    """
    tensors = {f'model.{k}': v for k, v in state.module.state_dict().items()}
    opt_tensors, opt_meta = optimizer_to_files(state.optimizer)
    tensors.update(opt_tensors)
    doc = {
        'epoch': state.epoch, 'batch_in_epoch': state.batch_in_epoch, 'best_top1': state.best_top1,
        'history': state.history, 'optimizer': opt_meta,
        'scheduler': state.scheduler.state_dict() if state.scheduler is not None else None,
        'scaler': state.scaler.state_dict() if state.scaler is not None else None,
        **(extra or {}),
    }
    return write_state(ckpt_dir, step=state.step, tensors=tensors, doc=doc, keep=keep, info=info)


def load_train_state(folder: str | os.PathLike, state: TrainState, *, info: DistInfo | None = None) -> dict[str, Any]:
    """Restore ``state`` (model, optimizer, scheduler, scaler, counters, this rank's RNG states) from a checkpoint.

    Args:
        folder: A ``step_<N>`` folder written by :func:`save_train_state`.
        state: The state to fill (model and optimizer built the same way as in the saved run).
        info: Distributed info (selects this rank's RNG states).

    Returns:
        The ``state.json`` document (config, history, ...).

    Raises:
        CheckpointError: the folder is incomplete, corrupt, or does not match the model/optimizer.
    """
    folder = Path(folder)
    tensors, doc = read_state(folder)
    try:
        state.module.load_state_dict(tensors_under(tensors, 'model'), strict=True)
        state.optimizer.load_state_dict(optimizer_from_files(tensors, doc['optimizer']))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f'{folder}: the checkpoint does not match this model/optimizer ({first}); resume '
                              f'with the same --model, --model-kwargs and --opt') from None
    if state.scheduler is not None and doc.get('scheduler'):
        state.scheduler.load_state_dict(doc['scheduler'])
    if state.scaler is not None and doc.get('scaler'):
        state.scaler.load_state_dict(doc['scaler'])
    state.step = int(doc['step'])
    state.epoch = int(doc['epoch'])
    state.batch_in_epoch = int(doc['batch_in_epoch'])
    best = doc.get('best_top1')
    state.best_top1 = float(best) if isinstance(best, (int, float)) else float('nan')
    state.history = list(doc.get('history') or [])
    if state.scheduler is not None:
        state.scheduler.step_update(num_updates=state.step)
    restore_rng_states(doc, info)
    return doc
