"""The pruned-model artifact: ``config.json`` (base architecture, its arguments, per-module widths and kept indices)
plus ``model.safetensors``. No pickle: :func:`load_pruned` rebuilds the model in a fresh process from the base
architecture and the adapters' :meth:`~amap.prune.adapters.base.Adapter.build`, then loads the weights strictly.

The folder is written atomically (a temp folder renamed into place), so a reader sees the old artifact or the new
one, never a mix.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ..errors import CheckpointError
from ..utils.io import atomic_dir, atomic_write_safetensors, read_json, read_safetensors, to_jsonable
from .adapters import ADAPTERS
from .surgery import set_submodule

__all__ = ['save_pruned', 'load_pruned', 'read_pruned_config', 'FORMAT', 'CONFIG_NAME', 'WEIGHTS_NAME']

FORMAT = 'amap-pruned'
VERSION = 1
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'


def save_pruned(
        model: Any,
        path: str | os.PathLike,
        *,
        architecture: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        structure: list[dict] | None = None,
        extra: dict[str, Any] | None = None,
) -> Path:
    """Write a pruned model as ``config.json`` + ``model.safetensors`` in folder ``path``.

    Args:
        model: The pruned ``nn.Module``, or a :class:`~amap.prune.api.PruneResult` (its model, structure and base).
        path: Output folder (replaced atomically if it exists).
        architecture: timm name of the base model (default: from the result, or ``model.pretrained_cfg``).
        model_kwargs: Arguments the base model was created with (e.g. ``num_classes``, ``img_size``).
        structure: Per pruned module records (default: from the result).
        extra: Anything JSON-serialisable to keep beside (e.g. metrics).

    Returns:
        The folder path.
    """
    base = {}
    if not isinstance(model, nn.Module):  # a PruneResult
        result = model
        model, structure = result.model, structure if structure is not None else result.structure
        base = dict(result.base or {})
        extra = {**result.summary(), **(extra or {})}
    architecture = architecture or base.get('architecture') or getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not architecture:
        raise CheckpointError('save_pruned needs architecture= (the timm name of the base model) to rebuild it later')
    if structure is None:
        raise CheckpointError('save_pruned needs structure= (PruneResult.structure)')
    config = {
        'format': FORMAT,
        'version': VERSION,
        'architecture': architecture,
        'model_kwargs': model_kwargs if model_kwargs is not None else base.get('model_kwargs', {}),
        'structure': structure,
        'extra': extra or {},
    }
    text = json.dumps(to_jsonable(config), indent=2)
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(text + '\n')
        atomic_write_safetensors(tmp / WEIGHTS_NAME, model.state_dict(), metadata={'format': FORMAT})
    return path


def read_pruned_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an artifact's ``config.json``."""
    path = Path(path)
    cfg_path = path / CONFIG_NAME if path.is_dir() else path
    if not cfg_path.exists():
        raise CheckpointError(f'{cfg_path}: not found; expected a folder written by amap.save_pruned')
    config = read_json(cfg_path)
    if not isinstance(config, dict) or config.get('format') != FORMAT:
        raise CheckpointError(f'{cfg_path}: not an AMAP pruned-model config (format {FORMAT!r} expected)')
    for key in ('architecture', 'model_kwargs', 'structure'):
        if key not in config:
            raise CheckpointError(f'{cfg_path}: missing {key!r}; the file is incomplete or from another tool')
    return config


def _adapter_class(name: str, cfg_path: Path) -> type:
    for cls in ADAPTERS:
        if cls.__name__ == name:
            return cls
    raise CheckpointError(f'{cfg_path}: unknown adapter {name!r}; register it (amap.prune.adapters.register_adapter) '
                          'before loading')


def build_pruned(config: dict[str, Any], *, where: Path | None = None) -> nn.Module:
    """The pruned model's structure from a config (uninitialised weights)."""
    where = where or Path(CONFIG_NAME)
    try:
        model = timm.create_model(config['architecture'], pretrained=False, **config['model_kwargs'])
    except Exception as e:  # noqa: BLE001 - reported as a one-line artifact error
        raise CheckpointError(f'{where}: cannot build base model {config["architecture"]!r}: {e}') from None
    for rec in config['structure']:
        try:
            module = model.get_submodule(rec['module'])
        except AttributeError:
            raise CheckpointError(f'{where}: module {rec["module"]!r} does not exist in {config["architecture"]}; '
                                  'config.json does not belong to this architecture') from None
        adapter = _adapter_class(rec['adapter'], where)(rec['module'], module)
        set_submodule(model, rec['module'], adapter.build(rec['widths']))
    return model


def load_pruned(path: str | os.PathLike, *, device: str | torch.device = 'cpu') -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` (no pickle), in eval mode.

    Raises:
        CheckpointError: the folder is incomplete, or config.json and the weights disagree.
    """
    path = Path(path)
    config = read_pruned_config(path)
    model = build_pruned(config, where=path / CONFIG_NAME)
    state, _ = read_safetensors(path / WEIGHTS_NAME)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing ({", ".join(missing[:3])})')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected ({", ".join(unexpected[:3])})')
        if mismatched:
            parts.append(f'{len(mismatched)} shape mismatches ({", ".join(mismatched[:3])})')
        raise CheckpointError(f'{path}: config.json and {WEIGHTS_NAME} disagree: {"; ".join(parts)}; '
                              're-export the artifact with amap.save_pruned')
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
