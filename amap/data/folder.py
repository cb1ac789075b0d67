"""ImageNet-layout split folders: clear errors, counted non-image skips and corrupt-image substitution."""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError
from .config import _DATA_HINT

__all__ = ['MAX_CONSECUTIVE_CORRUPT', 'DataWarning', 'ImageFolderDataset']

_logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_CORRUPT = 16
"""This many unreadable images in a row mean the dataset is broken: raise instead of substituting."""


class DataWarning(UserWarning):
    """Skipped non-image files or replaced unreadable images."""


def _corrupt_guard(dataset: Any, index: int, load: Callable[[int], Any], describe: Callable[[int], str]) -> Any:
    """Load sample ``index``; replace unreadable ones by the next readable sample (see the module docstring)."""
    n = len(dataset)
    first = index
    for attempt in range(MAX_CONSECUTIVE_CORRUPT):
        i = (first + attempt) % n
        try:
            return load(i)
        except DataError:
            raise
        except Exception as e:  # only the decoding of one file is guarded, never the transform
            dataset.num_corrupt += 1
            warned = getattr(dataset, 'warned', None)
            if warned is not None and bool(warned[i]):
                continue  # told once per file: again in a later epoch or by another loader worker is noise
            if warned is not None:
                warned[i] = True
            warnings.warn(f'unreadable image {describe(i)} ({type(e).__name__}: {e}); replaced by the next sample. '
                          f'Fix or delete the file', DataWarning, stacklevel=3)
    raise DataError(f'{MAX_CONSECUTIVE_CORRUPT} unreadable images in a row starting at {describe(first)}; '
                    f'the dataset looks broken: re-extract or re-copy it')


class ImageFolderDataset(ImageFolder):
    """``torchvision.datasets.ImageFolder`` with clear errors, counted non-image skips and corrupt-image substitution.

    Args:
        root: A split folder holding one sub-folder per class (e.g. ``data/train``).
        transform: Transform applied to the PIL image.
        class_to_idx: Class-name-to-index mapping to use (e.g. the one of ``train/`` when reading ``val/``). Every
            class folder of ``root`` must be in it; classes absent from ``root`` are allowed.
    """

    def __init__(
            self,
            root: str | os.PathLike,
            *,
            transform: Callable | None = None,
            class_to_idx: dict[str, int] | None = None,
    ) -> None:
        self._given_class_to_idx = dict(class_to_idx) if class_to_idx is not None else None
        self.num_skipped = 0
        self.num_corrupt = 0
        super().__init__(str(root), transform=transform)
        # which unreadable files were reported; in shared memory so that loader workers (forked) share it too
        self.warned = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """Class folders of ``directory`` (sorted), or the given mapping after checking the folders against it."""
        try:
            found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))
        except OSError as e:
            raise DataError(f'cannot read data folder {directory} ({e.strerror}); {_DATA_HINT}') from None
        if not found:
            raise DataError(f'{directory} has no class folders; put the images of each class in {directory}/<class>/')
        if self._given_class_to_idx is None:
            return found, {c: i for i, c in enumerate(found)}
        unknown = [c for c in found if c not in self._given_class_to_idx]
        if unknown:
            raise DataError(f'{directory} has class folders that the training split lacks: {unknown[:5]}; '
                            f'use the same class folder names in every split')
        missing = [c for c in self._given_class_to_idx if c not in found]
        if missing:
            _logger.warning('%s lacks %d of the training classes (e.g. %s)', directory, len(missing), missing[0])
        mapping = self._given_class_to_idx
        return sorted(mapping, key=mapping.__getitem__), mapping

    def make_dataset(
            self,
            directory: str | os.PathLike,
            class_to_idx: dict[str, int],
            extensions: tuple[str, ...] | None = None,
            is_valid_file: Callable[[str], bool] | None = None,
            allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """Scan the class folders (recursively, sorted); skip and count non-image files; refuse empty classes."""
        samples: list[tuple[str, int]] = []
        skipped: list[str] = []
        for cls, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
            cdir = os.path.join(directory, cls)
            if not os.path.isdir(cdir):
                continue  # a class of the training split that this split lacks (logged by find_classes)
            count = 0
            files: list[str] = []
            for dirpath, dirnames, fnames in os.walk(cdir, followlinks=True):
                dirnames[:] = [d for d in dirnames if not d.startswith('.')]  # prune hidden folders
                files += [os.path.join(dirpath, f) for f in fnames if not f.startswith('.')]
            for path in sorted(files):
                if path.lower().endswith(IMG_EXTENSIONS):
                    samples.append((path, idx))
                    count += 1
                else:
                    skipped.append(path)
            if count == 0:
                raise DataError(f'class folder {cdir} has no images ({", ".join(IMG_EXTENSIONS)}); '
                                f'add images to it or remove the folder')
        self.num_skipped = len(skipped)
        if skipped:
            warnings.warn(f'{directory}: skipped {len(skipped)} non-image file(s) (e.g. {skipped[0]}); only '
                          f'{", ".join(IMG_EXTENSIONS)} files are read', DataWarning, stacklevel=2)
        return samples

    def _load(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return self.loader(path), target

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, target = _corrupt_guard(self, index, self._load, lambda i: self.samples[i][0])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target
