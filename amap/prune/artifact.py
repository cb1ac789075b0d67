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

import torch
from torch import nn

from ..checkpoint import compare_state, mismatch_summary
from ..errors import CheckpointError
from ..train.factory import build_model
from ..utils.io import atomic_dir, atomic_write_safetensors, read_json, read_safetensors, to_jsonable
from .adapters import ADAPTERS, Adapter
from .groups import GROUP_KINDS

__all__ = ['save_pruned', 'load_pruned', 'read_pruned_config', 'pruned_folder', 'input_side', 'FORMAT', 'CONFIG_NAME',
           'WEIGHTS_NAME']

FORMAT = 'amap-pruned'
VERSION = 1
CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
_CORRUPT = 'the file is corrupt or was edited by hand; re-export the model with amap.save_pruned'
_JSON_TYPES = {str: 'a string', dict: 'an object', list: 'a list'}


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
        architecture: Name of the base model for :func:`~amap.train.factory.build_model` (a timm name,
            ``hf:<class>`` or ``torchvision:<class>``; default: from the result, or ``model.pretrained_cfg``).
        model_kwargs: Arguments the base model was created with (default: from the result, which reads every
            argument that shapes the model off it, e.g. ``num_classes``, ``img_size``, ``patch_size``).
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
    if base.get('incomplete') and base.get('architecture') and architecture is None and model_kwargs is None:
        raise CheckpointError(f'save_pruned: {base["architecture"]} built with '
                              f'{base.get("model_kwargs")} differs from the pruned model\'s base in '
                              f'{", ".join(base["incomplete"][:3])}; pass architecture= and model_kwargs= with the '
                              f'arguments it was created with')
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
    if base.get('input_size'):
        config['input_size'] = base['input_size']
    text = json.dumps(to_jsonable(config), indent=2)
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(text + '\n')
        atomic_write_safetensors(tmp / WEIGHTS_NAME, model.state_dict(), metadata={'format': FORMAT})
    return path


def read_pruned_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate an artifact's ``config.json`` (its layout and value types; :func:`load_pruned` checks the
    structure against the architecture)."""
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
    _check_type(config['architecture'], str, 'architecture', cfg_path)
    _check_type(config['model_kwargs'], dict, 'model_kwargs', cfg_path)
    _check_type(config['structure'], list, 'structure', cfg_path)
    _check_type(config.get('extra', {}), dict, 'extra', cfg_path)
    if config.get('extra', {}).get('data') is not None:
        _check_type(config['extra']['data'], dict, 'extra.data', cfg_path)
    for i, rec in enumerate(config['structure']):
        _check_type(rec, dict, f'structure[{i}]', cfg_path)
        for key, kind in (('module', str), ('adapter', str), ('widths', dict)):
            if key not in rec:
                raise CheckpointError(f'{cfg_path}: structure[{i}] has no {key!r}; {_CORRUPT}')
            _check_type(rec[key], kind, f'structure[{i}].{key}', cfg_path)
        for key in ('heads', 'indices'):  # informational (plots, reports): optional, but checked when present
            if key in rec:
                _check_type(rec[key], dict, f'structure[{i}].{key}', cfg_path)
    return config


def _check_type(value: Any, kind: type, name: str, where: Path) -> None:
    if not isinstance(value, kind):
        raise CheckpointError(f'{where}: {name} must be {_JSON_TYPES[kind]}, not {_json_repr(value)}; {_CORRUPT}')


def _json_repr(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + '...'


def _check_record(rec: dict[str, Any], i: int, adapter: Adapter, where: Path) -> None:
    """Widths, heads and kept indices of structure record ``i`` against the groups of the unpruned module."""
    groups = {g.kind: g for g in adapter.groups()}
    name = f'structure[{i}] ({rec["module"]})'
    for key in ('widths', 'heads', 'indices'):
        for kind in rec.get(key, {}):
            if kind in GROUP_KINDS and kind not in groups:
                raise CheckpointError(f'{where}: {name}.{key} names a {kind!r} group, which {rec["adapter"]} does not '
                                      f'have in this module; {_CORRUPT}')
    for kind, g in groups.items():
        width = rec['widths'].get(kind, g.dim)
        if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width <= g.dim:
            raise CheckpointError(f'{where}: {name}.widths.{kind} is {_json_repr(width)}; a pruned head keeps 1 to '
                                  f'{g.dim} channels; {_CORRUPT}')
        heads = rec.get('heads', {}).get(kind, g.num_heads)
        if type(heads) is not int or heads != g.num_heads:
            raise CheckpointError(f'{where}: {name}.heads.{kind} is {_json_repr(heads)}, the module has '
                                  f'{g.num_heads} heads; {_CORRUPT}')
        indices = rec.get('indices', {}).get(kind)
        if indices is not None and not _valid_indices(indices, g.num_heads, g.dim):
            raise CheckpointError(f'{where}: {name}.indices.{kind} must hold {g.num_heads} ascending lists of as many '
                                  f'distinct channels in [0, {g.dim}) (one per head); {_CORRUPT}')


def _valid_indices(indices: Any, heads: int, dim: int) -> bool:
    """Whether ``indices`` holds ``heads`` equally long, non-empty ascending lists of channel indices in ``[0, dim)``
    (their length is checked against the weights, through the widths, by :func:`load_pruned`)."""
    return isinstance(indices, list) and len(indices) == heads and all(
        isinstance(h, list) and h and len(h) == len(indices[0]) and all(type(j) is int for j in h)
        and 0 <= h[0] and h[-1] < dim and all(a < b for a, b in zip(h, h[1:])) for h in indices)


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
        model = build_model(config['architecture'], config['model_kwargs'])
    except Exception as e:  # noqa: BLE001 - reported as a one-line artifact error
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f'{where}: cannot build base model {config["architecture"]!r}: {reason}') from None
    seen: set[str] = set()
    for i, rec in enumerate(config['structure']):
        name = rec['module']
        if name in seen:
            raise CheckpointError(f'{where}: structure[{i}] lists module {name!r} a second time; {_CORRUPT}')
        seen.add(name)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f'{where}: module {name!r} does not exist in {config["architecture"]}; '
                                  'config.json does not belong to this architecture') from None
        cls = _adapter_class(rec['adapter'], where)
        if not name or not cls.matches(module):
            raise CheckpointError(f'{where}: structure[{i}]: module {name!r} is a {type(module).__name__}, which '
                                  f'{rec["adapter"]} does not handle; config.json does not belong to this architecture')
        adapter = cls(name, module)
        _check_record(rec, i, adapter, where)
        model.set_submodule(name, adapter.build(rec['widths']), strict=True)
    return model


def load_pruned(path: str | os.PathLike, *, device: str | torch.device = 'cpu') -> nn.Module:
    """Rebuild a pruned model saved by :func:`save_pruned` (no pickle), in eval mode.

    Raises:
        CheckpointError: the folder is incomplete or corrupt, config.json does not fit its base architecture (unknown
            modules or adapters, widths outside ``1..`` the unpruned width, inconsistent heads or kept indices), or it
            and the weights disagree.
    """
    path = Path(path)
    config = read_pruned_config(path)
    model = build_pruned(config, where=path / CONFIG_NAME)
    state, _ = read_safetensors(path / WEIGHTS_NAME)
    found = compare_state(model.state_dict(), state)
    if any(found):
        raise CheckpointError(f'{path}: config.json and {WEIGHTS_NAME} disagree: '
                              f'{mismatch_summary(*found, saved="weights")}; re-export the artifact with '
                              'amap.save_pruned')
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def pruned_folder(path: str | os.PathLike) -> Path | None:
    """The pruned-model folder of ``path``: the folder itself (written by :func:`save_pruned`), or ``path/model`` of
    an ``amap prune`` run folder; None for anything else."""
    path = Path(path)
    for folder in (path, path / 'model'):
        if folder.is_dir() and (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            return folder
    return None


def input_side(config: dict[str, Any]) -> int | None:
    """The input side a pruned model was pruned at, from its config: the data's, the base's ``img_size`` /
    ``image_size``, or the recorded input size (None when none is known)."""
    kwargs = config.get('model_kwargs') or {}
    for size in ((config.get('extra') or {}).get('data') or {}).get('img_size'), kwargs.get('img_size'), \
            kwargs.get('image_size'), (config.get('input_size') or [None])[-1]:
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        if isinstance(size, list) and size and isinstance(size[-1], int):
            return size[-1]
    return None
