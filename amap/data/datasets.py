"""One split of a data source (embedded digits or an ImageNet-layout folder) and class-balanced subsets."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .config import _DATA_HINT, DIGITS
from .digits import DigitsDataset
from .folder import ImageFolderDataset

__all__ = ['build_dataset', 'balanced_subset']

_logger = logging.getLogger(__name__)


def _resolve_root(data: str | os.PathLike) -> Path | None:
    """``None`` for the embedded default, else the existing folder."""
    if isinstance(data, str) and data == DIGITS:
        return None
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f'data folder {root} does not exist; {_DATA_HINT}')
    if not root.is_dir():
        raise DataError(f'data path {root} is not a folder; {_DATA_HINT}')
    return root


def _split_dir(root: Path, split: str) -> tuple[Path, str]:
    """The folder of ``split``; ``'val'`` falls back to ``test/`` (logged)."""
    candidates = ('val', 'test') if split == 'val' else (split,)
    for name in candidates:
        if (root / name).is_dir():
            if name != split:
                _logger.info('%s has no val/ folder; evaluating on %s', root, root / name)
            return root / name, name
    wanted = ' or '.join(f'{root / c}/' for c in candidates)
    raise DataError(f'{wanted} not found; {_DATA_HINT}')


def _train_classes(root: Path) -> dict[str, int] | None:
    train = root / 'train'
    if not train.is_dir():
        return None
    classes = sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith('.'))
    return {c: i for i, c in enumerate(classes)} or None


def build_dataset(
        data: str | os.PathLike,
        *,
        split: str,
        transform: Callable | None,
        img_size: int = 32,
        interpolation: str = 'bicubic',
) -> tuple[Dataset, list[str], str]:
    """One split of a data source, without subsets or seeding.

    Args:
        data: ``'digits'`` or an ImageNet-layout folder.
        split: ``'train'``, ``'val'`` (falls back to ``test/``) or ``'test'``.
        transform: Transform applied to each PIL image.
        img_size: Upscaling size of the embedded digits (folders are resized by the transform).
        interpolation: Upscaling interpolation of the embedded digits.

    Returns:
        ``(dataset, class_names, split_used)``; ``dataset.targets`` holds every label.
    """
    if split not in ('train', 'val', 'test'):
        raise ConfigError(f"split={split!r} is unknown; use 'train', 'val' or 'test'")
    root = _resolve_root(data)
    if root is None:
        ds = DigitsDataset(split, img_size=img_size, transform=transform, interpolation=interpolation)
        return ds, list(ds.classes), ds.split
    folder, used = _split_dir(root, split)
    class_to_idx = _train_classes(root) if used != 'train' else None
    ds = ImageFolderDataset(folder, transform=transform, class_to_idx=class_to_idx)
    return ds, list(ds.classes), used


def balanced_subset(targets: Sequence[int], num: int, *, seed: int = 0) -> list[int]:
    """A deterministic class-balanced subset of ``num`` indices (sorted).

    Each class's indices are shuffled with a fixed generator, then classes are taken round-robin until ``num``
    indices are chosen, so class counts differ by at most one (unless a class runs out).

    Args:
        targets: The label of every sample.
        num: Subset size (the whole set when ``num >= len(targets)``).
        seed: Seed of the per-class shuffles (independent of the training seed by default).
    """
    targets = np.asarray(targets)
    if num <= 0:
        raise ConfigError(f'subset size {num} must be a positive number of images')
    if num >= len(targets):
        return list(range(len(targets)))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(targets == c)).tolist() for c in np.unique(targets)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < num:
        for idx in per_class:
            if depth < len(idx):
                chosen.append(idx[depth])
                if len(chosen) == num:
                    break
        depth += 1
    return sorted(chosen)
