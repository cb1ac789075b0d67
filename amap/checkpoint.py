"""Reading foreign checkpoints safely and matching their keys to a model.

Accepted files:

* official FLatten checkpoints: a dict with a ``'model'`` entry (training checkpoints also hold the optimizer, the
  scheduler and the yacs config; only the weights are used), or with ``'model_ema'``;
* timm / DeiT style checkpoints (``'state_dict'``, ``'state_dict_ema'``, ``'args'``), bare state dicts, and keys
  prefixed by ``module.`` (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``);
* ``.pth`` / ``.pt`` / ``.bin`` files, read with ``torch.load(weights_only=True)`` only, and ``.safetensors``.

Nothing here executes code from a file: a pickle that needs more than tensors and plain containers is refused. The
two inert configuration containers that real training checkpoints carry (``yacs.config.CfgNode``, read back as an
``OrderedDict``, and ``argparse.Namespace``) are allow-listed as data; no other class is.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ['CheckpointShapes', 'LoadResult', 'checkpoint_shapes', 'load_checkpoint', 'read_state_dict']

# Entries of a checkpoint dict that may hold the weights, in order of preference.
_STATE_DICT_ENTRIES = ('model', 'state_dict', 'model_ema', 'state_dict_ema', 'module', 'net', 'params')
# Key prefixes added by wrappers (DDP / DataParallel, torch.compile); stripped when every key has them.
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')
_SHOW = 3  # how many keys an error message lists per kind


class _CfgNodeAsDict:
    """Stand-in for ``yacs.config.CfgNode`` during unpickling: builds a plain ``OrderedDict`` and runs no code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:  # type: ignore[misc]
        return OrderedDict()


# Inert data containers found in real training checkpoints (official FLatten / Swin: 'config' is a yacs CfgNode;
# DeiT / timm train scripts: 'args' is an argparse.Namespace). Their unpickling only fills a dict / __dict__.
_SAFE_CONTAINERS: list[Any] = [(_CfgNodeAsDict, 'yacs.config.CfgNode'), argparse.Namespace]


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did.

    Attributes:
        missing_keys: Keys of the model's state dict that the checkpoint does not have (left as they were).
        unexpected_keys: Keys of the checkpoint that the model does not have (not loaded).
        shape_mismatches: ``(key, checkpoint_shape, model_shape)`` for keys present in both with different shapes
            (not loaded). Only possible with ``strict=False``.
        ignored_keys: Checkpoint keys of buffers the model regenerates itself (non-persistent buffers), skipped.
        entry: The entry of the checkpoint dict that held the weights (``'model'``, ``'state_dict'``, ...), or None
            for a bare state dict.
    """

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    entry: str | None = None


def _unpickler_detail(err: Exception) -> str:
    """The useful sentence of a weights-only unpickler error (torch wraps it in boilerplate paragraphs)."""
    msg = re.sub(r'\x1b\[[0-9;]*m', '', str(err))
    found = re.search(r'WeightsUnpickler error:\s*(.+)', msg)
    if found:
        return found.group(1).strip()[:200]
    boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation')
    paragraphs = [' '.join(p.split()) for p in re.split(r'\n\s*\n', msg)]
    useful = [p for p in paragraphs if p and not p.startswith(boilerplate)]
    return (useful[0] if useful else paragraphs[0] if paragraphs else type(err).__name__)[:200]


def _refuse_unsafe(path: Path, err: Exception) -> CheckpointError:
    detail = _unpickler_detail(err)
    found = re.search(r'GLOBAL\s+([\w.]+)', detail) or re.search(r'function\s+([\w.<> ]+)', detail)
    what = f'it asks for {found.group(1)}' if found else detail
    return CheckpointError(
        f'checkpoint {path} is a pickle that needs code execution or pickle features beyond plain tensors '
        f'({what}): refused for safety (weights_only=True); if you trust its source, load it there and re-save the '
        f'state dict as .safetensors (safetensors.torch.save_file(state_dict, "model.safetensors")), then load that')


def _corrupt(path: Path, err: Exception | str) -> CheckpointError:
    detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return CheckpointError(
        f'checkpoint {path} is truncated or corrupt ({detail}); copy or download it again and check its size')


def _looks_like_safetensors(path: Path) -> bool:
    """True for ``.safetensors`` files and for files whose header is a safetensors header whatever their name."""
    if path.suffix == '.safetensors':
        return True
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < 100_000_000


def _load_file(path: Path, map_location: Any) -> Any:
    """Read a checkpoint file without executing anything from it."""
    if not path.exists():
        raise CheckpointError(f'checkpoint {path} does not exist; check the path (current folder: {Path.cwd()})')
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} is not a file; pass the .pth/.pt/.bin/.safetensors file itself')
    if not os.access(path, os.R_OK):
        raise CheckpointError(f'checkpoint {path} is not readable by this user; fix its permissions (chmod u+r)')
    if path.stat().st_size == 0:
        raise CheckpointError(f'checkpoint {path} is empty (0 bytes); copy or download it again')
    if _looks_like_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else 'cpu'
        try:
            return load_file(path, device=device)
        except SafetensorError as e:
            raise _corrupt(path, e) from None
    with open(path, 'rb') as f:
        head = f.read(8)
    if not (head.startswith(b'PK') or head.startswith(b'\x80')):  # torch zip archive / pickle protocol >= 2
        raise _corrupt(path, f'neither a PyTorch file nor safetensors, it starts with {head!r}')
    try:
        with torch.serialization.safe_globals(_SAFE_CONTAINERS), warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if re.search(r'truncated|EOF|ran out of input', _unpickler_detail(e), re.I):
            raise _corrupt(path, _unpickler_detail(e)) from None
        raise _refuse_unsafe(path, e) from None
    except Exception as e:  # RuntimeError (zip), EOFError, struct.error, KeyError ...: the bytes are not a checkpoint
        raise _corrupt(path, e) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def _find_state_dict(path: Path, obj: Any, entry: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    if not isinstance(obj, dict):
        raise CheckpointError(
            f'checkpoint {path} holds a {type(obj).__name__}, not a state dict; save model.state_dict() '
            f'(or {{"model": model.state_dict()}}) instead of the whole object')
    if entry is not None:
        if entry not in obj:
            names = ', '.join(repr(k) for k in list(obj)[:10])
            raise CheckpointError(f'checkpoint {path} has no entry {entry!r}; its entries are {names}')
        chosen, name = obj[entry], entry
    elif _is_state_dict(obj):
        chosen, name = obj, None
    else:
        name = next((k for k in _STATE_DICT_ENTRIES if isinstance(obj.get(k), dict) and obj[k]), None)
        if name is None:
            names = ', '.join(repr(k) for k in list(obj)[:10])
            raise CheckpointError(
                f'checkpoint {path} has no weights entry (looked for {", ".join(_STATE_DICT_ENTRIES)}; it has '
                f'{names}); pass entry=<name> to choose one')
        chosen = obj[name]
    if not isinstance(chosen, dict):
        raise CheckpointError(f'checkpoint {path}: entry {name!r} is a {type(chosen).__name__}, not a state dict')
    sd = {k: v for k, v in chosen.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f'checkpoint {path}: entry {name!r} holds no tensors; is it a weights checkpoint?')
    return _strip_prefixes(sd), name


def read_state_dict(
        path: str | os.PathLike,
        *,
        entry: str | None = None,
        map_location: str | torch.device = 'cpu',
) -> dict[str, torch.Tensor]:
    """Read the weights of a checkpoint file as a flat state dict, safely.

    Args:
        path: A ``.pth`` / ``.pt`` / ``.bin`` file (read with ``torch.load(weights_only=True)``) or ``.safetensors``.
        entry: The entry of a checkpoint dict that holds the weights; by default the first of ``'model'``,
            ``'state_dict'``, ``'model_ema'``, ``'state_dict_ema'`` (or the dict itself if it is a state dict).
        map_location: Where to put the tensors.

    Returns:
        ``{key: tensor}`` with wrapper prefixes (``module.``, ``_orig_mod.``) removed.

    Raises:
        CheckpointError: The file is missing, empty, truncated or corrupt, needs code execution to unpickle
            (refused), or holds no state dict.
    """
    return _read(Path(path), entry, map_location)[0]


def _read(path: Path, entry: str | None, map_location: Any) -> tuple[dict[str, torch.Tensor], str | None]:
    return _find_state_dict(path, _load_file(path, map_location), entry)


def compare_state(model_sd: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]):
    """The keys of ``model_sd`` missing from ``sd``, those of ``sd`` the model lacks, and ``(key, shape in sd, shape
    in the model)`` where both hold a key with other shapes."""
    missing = [k for k in model_sd if k not in sd]
    unexpected = [k for k in sd if k not in model_sd]
    mismatched = [(k, tuple(sd[k].shape), tuple(model_sd[k].shape))
                  for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    return missing, unexpected, mismatched


def _timm_filtered(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Apply the ``checkpoint_filter_fn`` of a timm model's module (original-repo key layouts), if there is one."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is None:
        return None
    try:
        out = filter_fn(dict(sd), model)
    except Exception:  # a filter that does not apply to these keys: keep the plain mismatch report
        return None
    return out if _is_state_dict(out) else None


def _fmt_keys(keys: list[str]) -> str:
    shown = ', '.join(keys[:_SHOW])
    return shown + (', ...' if len(keys) > _SHOW else '')


def mismatch_summary(missing: list[str], unexpected: list[str], mismatched: list[tuple], *,
                     saved: str = 'checkpoint') -> str:
    """One line for what :func:`compare_state` found, e.g. ``1 missing keys (a), 1 shape mismatches (b: checkpoint
    [7] vs model [10])``; ``saved`` names the file side."""
    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys ({_fmt_keys(missing)})')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected ({_fmt_keys(unexpected)})')
    if mismatched:
        shown = ', '.join(f'{k}: {saved} {list(a)} vs model {list(b)}' for k, a, b in mismatched[:_SHOW])
        parts.append(f'{len(mismatched)} shape mismatches ({shown}{", ..." if len(mismatched) > _SHOW else ""})')
    return ', '.join(parts)


def _mismatch_message(path: Path, model: nn.Module, missing, unexpected, mismatched) -> str:
    return (f'checkpoint {path} does not fit {type(model).__name__}: '
            f'{mismatch_summary(missing, unexpected, mismatched)}; is it a checkpoint of another architecture or '
            f'size? (strict=False loads only the keys that fit)')


def load_checkpoint(
        model: nn.Module,
        path: str | os.PathLike,
        *,
        strict: bool = True,
        map_location: str | torch.device = 'cpu',
        entry: str | None = None,
) -> LoadResult:
    """Load an official FLatten, timm or bare checkpoint into ``model``, safely.

    Keys of buffers the model regenerates (non-persistent buffers) are skipped when the checkpoint has them. If the
    keys do not match as they are and the model is a timm model whose module has a ``checkpoint_filter_fn`` (e.g. the
    original Swin or DeiT layouts), that filter is applied before giving up.

    Args:
        model: The model to fill (a DistributedDataParallel / DataParallel wrapper is unwrapped).
        path: The checkpoint file (``.pth`` / ``.pt`` / ``.bin`` or ``.safetensors``).
        strict: Require that the keys and shapes match exactly; otherwise load the keys that fit and report the rest.
        map_location: Where to read the tensors to before copying them into the model.
        entry: The entry of a checkpoint dict that holds the weights (e.g. ``'model_ema'``); see
            :func:`read_state_dict`.

    Returns:
        A :class:`LoadResult` with the missing, unexpected, mismatching and ignored keys.

    Raises:
        CheckpointError: The file cannot be read safely (see :func:`read_state_dict`); with ``strict=True``, the keys
            or shapes do not match (the message lists the counts and the first keys of each kind); with
            ``strict=False``, no key at all fits.
    """
    path = Path(path)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    sd, used_entry = _read(path, entry, map_location)

    model_sd = model.state_dict()
    regenerated = {n for n, _ in model.named_buffers()} - set(model_sd)
    ignored = [k for k in sd if k in regenerated]
    sd = {k: v for k, v in sd.items() if k not in regenerated}
    missing, unexpected, mismatched = compare_state(model_sd, sd)
    if missing or unexpected or mismatched:
        filtered = _timm_filtered(model, sd)
        if filtered is not None:
            cand = compare_state(model_sd, filtered)
            if sum(map(len, cand)) < len(missing) + len(unexpected) + len(mismatched):
                sd, (missing, unexpected, mismatched) = filtered, cand

    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message(path, model, missing, unexpected, mismatched))
    bad = {k for k, _, _ in mismatched}
    fitting = {k: v for k, v in sd.items() if k in model_sd and k not in bad}
    if not fitting:
        raise CheckpointError(_mismatch_message(path, model, missing, unexpected, mismatched).replace(
            '(strict=False loads only the keys that fit)', '(no key fits at all)'))
    model.load_state_dict(fitting, strict=False)
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected, shape_mismatches=mismatched,
                      ignored_keys=ignored, entry=used_entry)


# ------------------------------------------------------------------------------------------- shapes of a checkpoint
_POS_EMBED = ('pos_embed', 'position_embeddings', 'pos_embedding')  # timm/FLatten, Hugging Face, torchvision
_PATCH_CONV = ('patch_embed.proj.weight', 'patch_embeddings.projection.weight', 'conv_proj.weight')
_PREFIX_TOKENS = ('cls_token', 'dist_token', 'class_token', 'distillation_token', 'reg_token')
_HEADS = ('head.weight', 'head.fc.weight', 'classifier.weight', 'heads.head.weight', 'fc.weight', 'head.l.weight')


@dataclass
class CheckpointShapes:
    """What a checkpoint's tensors say about the model they belong to (None where they do not say it).

    Attributes:
        img_size: Input side the position embedding was made for (square grids only).
        patch_size: Side of the patch-embedding kernel.
        in_chans: Input channels of the patch embedding.
        num_classes: Rows of the classifier head.
        tokens: Tokens of the position embedding (prefix tokens included).
    """

    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    num_classes: int | None = None
    tokens: int | None = None


def _find(sd: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> torch.Tensor | None:
    for suffix in suffixes:
        for key in sorted(sd, key=len):  # the shortest key: the model's own, not a block's
            if key == suffix or key.endswith('.' + suffix):
                return sd[key]
    return None


def checkpoint_shapes(sd: dict[str, torch.Tensor]) -> CheckpointShapes:
    """Read image size, patch size, input channels and class count off a state dict (timm / FLatten, Hugging Face
    and torchvision key names).

    The image size is the side of the position embedding's square grid (tokens less the class / distillation
    tokens the checkpoint has) times the patch size; models without a learned position embedding (Swin) do not say it.
    """
    out = CheckpointShapes()
    conv = _find(sd, _PATCH_CONV)
    if conv is not None and conv.dim() == 4 and conv.shape[-1] == conv.shape[-2]:
        out.patch_size, out.in_chans = int(conv.shape[-1]), int(conv.shape[1])
    pos = _find(sd, _POS_EMBED)
    if pos is not None and pos.dim() == 3:
        out.tokens = int(pos.shape[1])
        prefix = sum(1 for name in _PREFIX_TOKENS if _find(sd, (name,)) is not None)
        side = round((out.tokens - prefix) ** 0.5)
        if out.patch_size and side * side == out.tokens - prefix:
            out.img_size = side * out.patch_size
    head = _find(sd, _HEADS)
    if head is not None and head.dim() == 2:
        out.num_classes = int(head.shape[0])
    return out
