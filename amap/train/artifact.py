"""The trained-model artifact: ``model.safetensors`` (weights, with the model description as JSON in its header) and
``model.json`` (the same JSON), so the file alone rebuilds the model and the pair can never disagree in what
:func:`load_trained` uses.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import CheckpointError, ModelError
from ..utils.distributed import unwrap_model
from ..utils.io import (
    atomic_write_json,
    atomic_write_safetensors,
    read_json,
    read_safetensors,
    read_safetensors_metadata,
    to_jsonable,
)
from .factory import build_model, is_model, unknown_model_message

__all__ = ['MODEL_FILE', 'MODEL_META_FILE', 'save_trained', 'read_trained_meta', 'load_trained']

MODEL_FILE = 'model.safetensors'
MODEL_META_FILE = 'model.json'
_MODEL_FORMAT = 'amap.trained/1'
_META_KEY = 'amap'


def save_trained(
        path: str | os.PathLike,
        model: nn.Module,
        meta: Mapping[str, Any],
) -> None:
    """Write ``model.safetensors`` (weights; ``meta`` as JSON in its header) and ``model.json`` (the same JSON).

    Args:
        path: The ``.safetensors`` file; ``model.json`` goes next to it (same stem).
        model: The model (DDP wrapper unwrapped).
        meta: JSON-able description: ``model``, ``model_kwargs`` (to ``timm.create_model``), ``num_classes``,
            ``img_size``, ``mean``, ``std``, ``interpolation``, ``class_names``, ``epoch``, ``step``, ``metrics``.
    """
    path = Path(path)
    doc = to_jsonable({'format': _MODEL_FORMAT, 'id': uuid.uuid4().hex, **meta})
    atomic_write_safetensors(path, unwrap_model(model).state_dict(),
                             metadata={_META_KEY: json.dumps(doc), 'format': 'pt'})
    atomic_write_json(path.with_suffix('.json'), doc)


def _resolve_model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f'{path}: file not found; pass a run folder or its {MODEL_FILE}')
    return path


def read_trained_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The description saved with a model by :func:`save_trained`, or None for a foreign safetensors file."""
    path = _resolve_model_file(path)
    if path.suffix != '.safetensors':
        return None
    header = read_safetensors_metadata(path)
    if _META_KEY in header:
        try:
            return json.loads(header[_META_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f'{path}: its metadata is not valid JSON; the file is corrupt') from None
    side = path.with_suffix('.json')
    if side.is_file():
        doc = read_json(side)
        if isinstance(doc, dict) and doc.get('format') == _MODEL_FORMAT:
            return doc
    return None


def load_trained(
        path: str | os.PathLike,
        *,
        device: str | torch.device = 'cpu',
) -> nn.Module:
    """Rebuild a model trained by :func:`train` from its run folder or ``model.safetensors`` (eval mode).

    The saved description is available as ``model.amap_meta`` (a dict).

    Raises:
        CheckpointError: missing, corrupt, or foreign file (use :func:`amap.load_checkpoint` for those).
    """
    file = _resolve_model_file(path)
    meta = read_trained_meta(file)
    if meta is None:
        raise CheckpointError(f'{file}: not a model saved by amap train (no model description); build the model '
                              f'and use amap.load_checkpoint(model, path) instead')
    name = meta.get('model')
    if not isinstance(name, str) or not is_model(name):
        raise CheckpointError(f'{file}: saved model name {name!r} is not registered; '
                              f'{unknown_model_message(str(name))}')
    try:
        model = build_model(name, dict(meta.get('model_kwargs') or {}))
    except (ModelError, TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f'{file}: cannot rebuild {name!r} from its saved arguments ({e})') from None
    tensors, _ = read_safetensors(file)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f'{file}: weights do not match the saved architecture {name!r} ({first})') from None
    model.amap_meta = meta  # type: ignore[assignment]
    return model.to(device).eval()
