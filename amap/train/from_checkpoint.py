"""A model shaped like a foreign checkpoint: its input size (from the position embedding), patch size and class
count read off its tensors (:func:`~amap.checkpoint.checkpoint_shapes`); an option that contradicts it is a one-line
error; a head whose class count differs from the data's is kept or, on purpose, replaced (each said in one line).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import checkpoint_shapes, load_checkpoint, read_state_dict
from ..errors import CheckpointError, ConfigError, ModelError
from .factory import HF_PREFIX, create_model

__all__ = ['fit_image_size', 'create_for_checkpoint', 'replace_head']

_logger = logging.getLogger(__name__)


def fit_image_size(checkpoint: str | Path, img_size: int, *, given: bool) -> int:
    """The input side for ``checkpoint``: the one its position embedding was made for, where it says one.

    Args:
        checkpoint: A foreign checkpoint file.
        img_size: The size asked for.
        given: Whether the user chose ``img_size`` (else it is a default, which the checkpoint's size replaces).

    Raises:
        ConfigError: ``img_size`` was given and contradicts the checkpoint (both sizes and the option are named).
    """
    shapes = checkpoint_shapes(read_state_dict(checkpoint))
    if shapes.img_size is None or shapes.img_size == img_size:
        return img_size
    if given:
        raise ConfigError(f'--img-size {img_size} contradicts --checkpoint {checkpoint}, whose position embedding '
                          f'({shapes.tokens} tokens, patch {shapes.patch_size}) is for {shapes.img_size} px; pass '
                          f'--img-size {shapes.img_size} or drop --img-size')
    _logger.warning('input size %d px, read from --checkpoint %s (its position embedding has %d tokens of patch %d)',
                    shapes.img_size, checkpoint, shapes.tokens, shapes.patch_size)
    return shapes.img_size


def create_for_checkpoint(
        name: str,
        checkpoint: str | Path,
        *,
        data_classes: int,
        img_size: int | None = None,
        num_classes: int | None = None,
        reset_head: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Model ``name`` shaped like ``checkpoint`` (class count, patch size) and loaded with it.

    A head whose class count differs from the data's is kept (said in one line: the model is evaluated against the
    checkpoint's classes) unless ``num_classes`` and ``reset_head`` replace it by a new head (said in one line).

    Returns:
        ``(model, create_kwargs)``, the kwargs describing the model as returned (after a head reset too).

    Raises:
        ConfigError: ``num_classes`` contradicts the checkpoint's head without ``reset_head``, or ``reset_head``
            without ``num_classes``; CheckpointError / ModelError as :func:`~amap.checkpoint.load_checkpoint` and
            :func:`create_model`.
    """
    sd = read_state_dict(checkpoint)
    shapes = checkpoint_shapes(sd)
    head = shapes.num_classes
    if reset_head and num_classes is None:
        raise ConfigError('--reset-head needs --num-classes N, the class count of the new head')
    if num_classes is not None and head is not None and num_classes != head and not reset_head:
        raise ConfigError(f'--num-classes {num_classes} contradicts --checkpoint {checkpoint}, whose head predicts '
                          f'{head} classes; add --reset-head to replace the head by a new {num_classes}-class one, or '
                          f'drop --num-classes')
    kwargs = dict(model_kwargs or {})
    classes = head or num_classes or data_classes
    model, create_kwargs = create_model(name, num_classes=classes, img_size=img_size, model_kwargs=kwargs)
    own = checkpoint_shapes(model.state_dict())
    if shapes.patch_size and own.patch_size and own.patch_size != shapes.patch_size and 'patch_size' not in kwargs:
        try:
            other = create_model(name, num_classes=classes, img_size=img_size,
                                 model_kwargs={**kwargs, 'patch_size': shapes.patch_size})
        except ModelError:
            other = None
        if other is not None and _fits(other[0], sd):  # else the checkpoint is of another model: load says so
            _logger.warning('patch size %d, read from --checkpoint %s (%s builds %d by default)', shapes.patch_size,
                            checkpoint, name, own.patch_size)
            model, create_kwargs = other
    if not _hf_load(model, Path(checkpoint)):
        load_checkpoint(model, checkpoint)
    if reset_head and num_classes is not None and num_classes != classes:
        replace_head(model, num_classes)
        create_kwargs['num_labels' if name.startswith(HF_PREFIX) else 'num_classes'] = num_classes
        _logger.warning('replaced the %d-class head of --checkpoint %s by a new, untrained %d-class head '
                        '(--reset-head)', classes, checkpoint, num_classes)
    elif classes != data_classes:
        _logger.warning('the head of --checkpoint %s predicts %d classes and the data has %d: the model is evaluated '
                        'against the checkpoint\'s classes (--num-classes %d --reset-head replaces the head)',
                        checkpoint, classes, data_classes, data_classes)
    return model, create_kwargs


def _fits(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether every tensor of ``sd`` has a place of its shape in ``model`` and every weight of it is in ``sd``."""
    own = model.state_dict()
    params = {n for n, _ in model.named_parameters()}
    return all(k in own and own[k].shape == v.shape for k, v in sd.items()) and params <= set(sd)


def _hf_load(model: nn.Module, checkpoint: Path) -> bool:
    """Load a transformers model from the folder ``save_pretrained`` wrote (its ``from_pretrained`` maps the key
    layouts of earlier transformers versions, which ``save_pretrained`` still writes); False when ``checkpoint`` is
    not such a folder or its weights file."""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if not type(model).__module__.startswith('transformers.') or not (folder / 'config.json').is_file() or \
            checkpoint.is_file() and checkpoint.name not in ('model.safetensors', 'pytorch_model.bin'):
        return False
    try:
        loaded = type(model).from_pretrained(folder, config=model.config, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f'checkpoint {checkpoint} does not fit {type(model).__name__}: {reason}') from None
    model.load_state_dict(loaded.state_dict(), strict=True)
    return True


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Replace a classifier's head by a new ``num_classes``-way Linear (timm ``reset_classifier``, Hugging Face
    ``classifier`` + config, torchvision ``heads.head`` / ``head``)."""
    if hasattr(model, 'reset_classifier'):
        model.reset_classifier(num_classes)
        return
    for name in ('classifier', 'heads.head', 'head', 'fc'):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(old, nn.Linear):
            p = old.weight
            model.set_submodule(name, nn.Linear(old.in_features, num_classes, device=p.device, dtype=p.dtype))
            if hasattr(model, 'config'):
                model.config.num_labels = num_classes
                model.num_labels = num_classes
            if isinstance(getattr(model, 'num_classes', None), int):
                model.num_classes = num_classes
            return
    raise ModelError(f'{type(model).__name__}: no classifier head found to replace; drop --reset-head')
