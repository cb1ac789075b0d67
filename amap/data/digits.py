"""The embedded default data set: scikit-learn's digits, split 80/20 stratified with a fixed seed."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from .config import DIGITS
from .transforms import _pil_interp

__all__ = ['DigitsDataset']

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``split -> (uint8 images (N, 8, 8), labels, indices into load_digits())``; stratified, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    train_idx, val_idx = train_test_split(
        np.arange(len(images)), test_size=DIGITS_VAL_FRACTION, stratify=d.target, random_state=DIGITS_SPLIT_SEED)
    return {name: (images[idx], d.target[idx].astype(np.int64), idx)
            for name, idx in (('train', np.sort(train_idx)), ('val', np.sort(val_idx)))}


class DigitsDataset(Dataset):
    """The embedded default: scikit-learn's digits as RGB PIL images upscaled to ``img_size``.

    Args:
        split: ``'train'`` (1437 images) or ``'val'`` (360 images; ``'test'`` is an alias).
        img_size: Side of the upscaled square image.
        transform: Transform applied to the PIL image.
        interpolation: Upscaling interpolation.
    """

    classes = [str(i) for i in range(10)]

    def __init__(
            self,
            split: str = 'train',
            *,
            img_size: int = 32,
            transform: Callable | None = None,
            interpolation: str = 'bicubic',
    ) -> None:
        if split == 'test':
            split = 'val'
        if split not in ('train', 'val'):
            raise ConfigError(f"split={split!r} is not a split of '{DIGITS}'; use 'train' or 'val'")
        self.split = split
        self.img_size = img_size
        self.transform = transform
        self.interpolation = interpolation
        self.images, targets, self.source_indices = _digits_split()[split]  # source: indices into load_digits()
        self.targets = targets.tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.num_corrupt = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index])
        img = img.resize((self.img_size, self.img_size), resample=_pil_interp(self.interpolation)).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]
