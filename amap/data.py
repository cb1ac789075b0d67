"""Datasets, transforms and loaders (DDP-aware, deterministic).

Data sources (``data`` argument):

* ``'digits'`` -- the embedded default: scikit-learn's digits (1797 8x8 grayscale images, 10 classes; installs with
  pip, no download), split 80/20 stratified with a fixed seed into 1437 training and 360 validation images, upscaled
  to ``img_size`` and expanded to 3 channels. The literal string always means the embedded set; a folder that happens
  to be called ``digits`` is passed as ``./digits``.
* a folder in ImageNet layout: ``root/train/<class>/*`` for training, ``root/val/<class>/*`` for evaluation, or
  ``root/test/<class>/*`` when there is no ``val/`` (the fallback is logged). Class indices are the alphabetical order
  of the ``train/`` class folders, also when evaluating, so a ``val/`` folder lacking a class keeps the indices right.

Transforms come from timm (:func:`timm.data.create_transform`). Images of at most 64 px (``img_size``) are trained
with a pad-crop (resize to ``img_size``, ``RandomCrop(img_size, padding=img_size // 8)``) instead of a random resized
crop, and evaluated by resizing to ``img_size`` without the centre-crop shrinkage. Normalisation is ImageNet's
mean/std (what pretrained timm models expect) unless ``DataConfig.mean``/``std`` say otherwise.

Bad data:

* a missing folder, a missing ``train/`` (or ``val/``/``test/`` for evaluation), a split without class folders, or a
  class folder without images raise :class:`amap.errors.DataError` with one line naming the path and the fix;
* files whose extension is not an image extension (``IMG_EXTENSIONS``) are skipped with ONE :class:`DataWarning`
  per split that counts them (hidden files such as ``.DS_Store`` are ignored silently);
* an image that cannot be decoded at load time (corrupt, truncated) does NOT stop a long run: a
  :class:`DataWarning` names the file (once per file, whichever epoch or loader worker reads it again), the sample
  is replaced by the next readable sample of the dataset (deterministically: index + 1, + 2, ...) and
  ``dataset.num_corrupt`` counts the replacements made in that process.
  If :data:`MAX_CONSECUTIVE_CORRUPT` images in a row are unreadable the dataset is considered broken and a
  ``DataError`` is raised naming the first file.

Determinism (what exact resume relies on):

* The training sampler is always an :class:`EpochSampler` (a ``DistributedSampler``, also with one process), so the
  order of epoch ``e`` is a function of ``(seed, e, rank, world_size)`` only.
* The sampler yields ``(epoch, index)`` keys and the training dataset is wrapped in :class:`EpochSeededDataset`, which
  seeds ``random``, ``numpy`` and torch's CPU generator from ``(seed, epoch, index)`` before each sample.
  Augmentations are therefore a function of ``(seed, epoch, sample)`` only: independent of ``num_workers``, of worker
  scheduling, of persistent workers, and of the caller's global RNG. With ``num_workers=0`` (loading in the trainer's
  process) the previous RNG states are restored after each sample, so the trainer's own streams are left untouched and
  the trainer needs no extra seeding for the data.
* To reproduce epoch ``e``: call ``bundle.train_sampler.set_epoch(e)`` and iterate ``bundle.train_loader``. To resume
  in the middle of epoch ``e`` after ``k`` finished batches: ``bundle.train_sampler.set_epoch(e, skip=k *
  bundle.train_loader.batch_size)``; the loader then yields exactly batches ``k, k+1, ...`` of the uninterrupted epoch
  (bit-identical images and labels) without decoding the skipped ones. The skip applies to that epoch only.
* Mixup/CutMix (:class:`timm.data.Mixup`) run in the trainer's process and draw from the global ``numpy`` and torch
  RNGs; for exact resume the trainer seeds them per step, e.g. ``seed_rng(seed, epoch, step)`` before
  ``mixup_fn(x, y)``.

Distributed: with ``distributed=True`` rank and world size come from :mod:`torch.distributed` (initialised by the
trainer). Training shards through the ``DistributedSampler`` (which pads by repeating a few samples); evaluation
shards with ``indices[rank::world_size]`` (:func:`shard_indices`) without padding, so sums of correct predictions and
counts reduced across ranks are exact.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import ConfigError, DataError

__all__ = [
    'DIGITS', 'AUGMENTS', 'DEFAULT_RANDAUGMENT', 'MAX_CONSECUTIVE_CORRUPT', 'DataConfig', 'DataBundle', 'DataWarning',
    'ImageFolderDataset', 'DigitsDataset', 'EpochSeededDataset', 'EpochSampler', 'ShardSampler', 'build_loaders',
    'build_eval_loader', 'build_dataset', 'build_transform', 'balanced_subset', 'shard_indices', 'seed_rng',
    'sample_seed',
]

_logger = logging.getLogger(__name__)

DIGITS = 'digits'
"""Name of the embedded default dataset (scikit-learn's digits)."""
AUGMENTS = ('none', 'basic', 'strong')
DEFAULT_RANDAUGMENT = 'rand-m9-mstd0.5-inc1'
SMALL_IMAGE = 64
"""Images of at most this many pixels (``img_size``) use pad-crop training and plain-resize evaluation."""
MAX_CONSECUTIVE_CORRUPT = 16
"""This many unreadable images in a row mean the dataset is broken: raise instead of substituting."""
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming')
_DATA_HINT = ("pass a folder in ImageNet layout (root/train/<class>/*, root/val/<class>/* or root/test/<class>/*) "
              f"or '{DIGITS}' for the embedded default")


class DataWarning(UserWarning):
    """Skipped non-image files or replaced unreadable images."""


@dataclass
class DataConfig:
    """Where the data comes from and how it is augmented and batched.

    Attributes:
        data: ``'digits'`` (embedded default) or a folder in ImageNet layout.
        img_size: Side of the square model input in pixels.
        batch_size: Training batch size per process.
        eval_batch_size: Evaluation batch size per process (default: ``2 * batch_size``).
        num_workers: DataLoader worker processes (0 = load in the main process).
        augment: ``'none'``, ``'basic'`` (pad-crop for images <= 64 px, else random-resized-crop; plus h-flip) or
            ``'strong'`` (basic + RandAugment + random erasing).
        randaugment: timm RandAugment spec, e.g. ``'rand-m9-mstd0.5-inc1'``; overrides the spec of ``'strong'``
            and adds RandAugment to ``'basic'``.
        mixup: Mixup alpha (0 = off).
        cutmix: CutMix alpha (0 = off).
        label_smoothing: Label smoothing of the soft targets built by the mixup function.
        train_subset: Use a deterministic class-balanced subset of this many training images.
        val_subset: Use a deterministic class-balanced subset of this many evaluation images.
        interpolation: Resize interpolation (``'bicubic'``, ``'bilinear'``, ...).
        mean: Normalisation mean (default: ImageNet's).
        std: Normalisation std (default: ImageNet's).
        re_prob: Random-erasing probability of ``'strong'``.
    """
    data: str = DIGITS
    img_size: int = 32
    batch_size: int = 128
    eval_batch_size: int | None = None
    num_workers: int = 2
    augment: str = 'basic'
    randaugment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    train_subset: int | None = None
    val_subset: int | None = None
    interpolation: str = 'bicubic'
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    re_prob: float = 0.25


@dataclass
class DataBundle:
    """Everything the trainer needs from the data side.

    Attributes:
        train_loader: Shuffled, augmented training batches ``(images, labels)``; full batches only.
        val_loader: Evaluation batches of this rank's shard (no padding, no duplicates).
        num_classes: Number of classes (from ``train/``).
        class_names: Class names in index order (alphabetical folder names; ``'0'..'9'`` for digits).
        mixup_fn: :class:`timm.data.Mixup` when mixup or cutmix is on, else ``None``.
        train_sampler: The :class:`EpochSampler`; call ``set_epoch(epoch)`` before every epoch.
        mean: Normalisation mean used by the transforms.
        std: Normalisation std used by the transforms.
        steps_per_epoch: Batches in a full epoch (fixed; ``len(train_loader)`` shrinks after a ``skip``).
        eval_split: Which split evaluation reads (``'val'`` or ``'test'``).
        train_size: Training images (after ``train_subset``), over all ranks.
        val_size: Evaluation images (after ``val_subset``), over all ranks.
    """
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    class_names: list[str]
    mixup_fn: Callable | None
    train_sampler: Sampler
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD
    steps_per_epoch: int = 0
    eval_split: str = 'val'
    train_size: int = 0
    val_size: int = 0


# ----------------------------------------------------------------------------------------------------------- seeding
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed derived from integer keys (e.g. ``(seed, epoch, index)``); fast (pure integer ops)."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def seed_rng(*keys: int) -> None:
    """Seed ``random``, ``numpy`` and torch's CPU generator from integer keys, e.g. ``seed_rng(seed, epoch, step)``.

    Use it before drawing the randomness that lives in the trainer's process (mixup/cutmix, dropout) to make a resumed
    run bit-identical to an uninterrupted one.
    """
    s = sample_seed(*keys)
    random.seed(s)
    np.random.seed(s % 2 ** 32)
    torch.manual_seed(s)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.random.default_generator.manual_seed(seed)  # CPU generator only: no CUDA call in worker processes


@contextmanager
def _rng_scope(seed: int) -> Iterator[None]:
    """Seed the three CPU RNGs for the block. In the main process (``num_workers=0``) restore their states afterwards
    so the caller's streams are untouched; worker processes own their RNGs, so they skip the (slow) save/restore."""
    if torch.utils.data.get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    py_state, np_state = random.getstate(), np.random.get_state()
    gen = torch.random.default_generator
    t_state = gen.get_state()
    _seed_all(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        gen.set_state(t_state)


def _worker_init(worker_id: int, *, seed: int) -> None:
    # Per-sample seeding makes augmentations independent of this; it only fixes any other worker-side randomness.
    _seed_all(sample_seed(seed, 0x5EED, worker_id))


# ----------------------------------------------------------------------------------------------------------- datasets
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


class EpochSeededDataset(Dataset):
    """Wraps a dataset so that the randomness of its transform is a function of ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` tuples (as yielded by :class:`EpochSampler`) or plain indices (epoch 0). In the main
    process the global ``random``/``numpy``/torch CPU RNG states are restored after each sample.

    Args:
        dataset: The dataset whose ``__getitem__`` applies the random transform.
        seed: Base seed of the run.
    """

    def __init__(self, dataset: Dataset, *, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        with _rng_scope(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


# ----------------------------------------------------------------------------------------------------------- samplers
class EpochSampler(DistributedSampler):
    """``DistributedSampler`` that yields ``(epoch, index)`` keys and can skip the start of an epoch (for resume).

    The order of epoch ``e`` depends only on ``(seed, e, num_replicas, rank)``. Use it with one process too
    (``num_replicas=1, rank=0``).
    """

    def __init__(
            self,
            dataset: Dataset,
            *,
            num_replicas: int = 1,
            rank: int = 0,
            seed: int = 0,
            shuffle: bool = True,
            drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; ``skip`` drops the first ``skip`` samples of this rank's order (this epoch only).

        Args:
            epoch: Epoch number (0-based).
            skip: Number of samples already consumed, i.e. ``batches_done * train_loader.batch_size``.
        """
        if skip < 0:
            raise ConfigError(f'skip={skip} must be >= 0')
        super().set_epoch(epoch)
        self.skip = int(skip)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self.epoch, self.skip
        self.skip = 0  # the skip applies to one pass only
        indices = list(super().__iter__())[skip:]
        return iter([(epoch, i) for i in indices])

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


def shard_indices(num_samples: int, *, rank: int, world_size: int) -> list[int]:
    """Indices of evaluation samples for ``rank``: ``range(rank, num_samples, world_size)`` (no padding)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f'rank={rank} and world_size={world_size} are inconsistent; need 0 <= rank < world_size')
    return list(range(rank, num_samples, world_size))


class ShardSampler(Sampler[int]):
    """Deterministic evaluation sampler: this rank's ``indices[rank::world_size]``, in order, without duplicates.

    Args:
        num_samples: Size of the dataset.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(self, num_samples: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.indices = shard_indices(num_samples, rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """No-op (evaluation order never changes); present so every sampler accepts ``set_epoch``."""


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


# ----------------------------------------------------------------------------------------------------------- transforms
def _pil_interp(name: str) -> int:
    from timm.data.transforms import str_to_pil_interp
    return str_to_pil_interp(name)


def build_transform(
        *,
        img_size: int,
        is_training: bool,
        augment: str = 'basic',
        randaugment: str | None = None,
        interpolation: str = 'bicubic',
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        re_prob: float = 0.25,
) -> transforms.Compose:
    """timm transforms for training or evaluation (see the module docstring for the small-image rules).

    Args:
        img_size: Output side in pixels.
        is_training: Training (random) or evaluation (deterministic) transform.
        augment: ``'none'``, ``'basic'`` or ``'strong'``.
        randaugment: RandAugment spec overriding the default of ``'strong'`` (adds RandAugment to ``'basic'``).
        interpolation: Resize interpolation.
        mean: Normalisation mean.
        std: Normalisation std.
        re_prob: Random-erasing probability of ``'strong'``.

    Returns:
        A ``Compose`` mapping a PIL image to a normalised ``(3, img_size, img_size)`` float tensor.
    """
    mean, std = tuple(mean), tuple(std)
    small = img_size <= SMALL_IMAGE
    if not is_training or augment == 'none':  # 'none' trains on exactly what evaluation sees
        if small:  # plain resize: no centre-crop shrinkage of tiny images
            return create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                                    crop_pct=1.0, crop_mode='squash')
        return create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std)
    spec = randaugment or (DEFAULT_RANDAUGMENT if augment == 'strong' else None)
    primary, secondary, final = create_transform(
        img_size, is_training=True, hflip=0.5, color_jitter=None, auto_augment=spec, interpolation=interpolation,
        mean=mean, std=std, re_prob=re_prob if augment == 'strong' else 0.0, re_mode='pixel', separate=True)
    if small:  # pad-crop instead of random-resized-crop
        primary = transforms.Compose([
            transforms.Resize((img_size, img_size), interpolation=_torch_interp(interpolation)),
            transforms.RandomCrop(img_size, padding=img_size // 8),
            transforms.RandomHorizontalFlip(p=0.5),
        ])
    _patch_augment_ops(secondary.transforms)
    return transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms])


def _posterize_safe(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, keeping its meaning for 0 bits (a black image) which Pillow >= 11 rejects."""
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _patch_augment_ops(tfs: Sequence[Any]) -> None:
    """Make timm's AutoAugment/RandAugment posterize ops safe at magnitude 10 (0 bits crashes a run otherwise)."""
    from timm.data import auto_augment
    for t in tfs:
        for op in getattr(t, 'ops', ()):
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize_safe


def _torch_interp(name: str) -> Any:
    from timm.data.transforms import str_to_interp_mode
    return str_to_interp_mode(name)


# ----------------------------------------------------------------------------------------------------------- builders
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


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError('distributed=True but torch.distributed is not initialised; launch with torchrun and '
                          'call init_process_group first')
    return dist.get_rank(), dist.get_world_size()


def _validate(cfg: DataConfig) -> None:
    checks = [
        (cfg.img_size >= 8, 'img_size', 'must be >= 8'),
        (cfg.batch_size >= 1, 'batch_size', 'must be >= 1'),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, 'eval_batch_size', 'must be >= 1'),
        (cfg.num_workers >= 0, 'num_workers', 'must be >= 0'),
        (cfg.augment in AUGMENTS, 'augment', f'must be one of {AUGMENTS}'),
        (cfg.mixup >= 0, 'mixup', 'must be >= 0'),
        (cfg.cutmix >= 0, 'cutmix', 'must be >= 0'),
        (0 <= cfg.label_smoothing < 1, 'label_smoothing', 'must be in [0, 1)'),
        (cfg.interpolation in _INTERPOLATIONS, 'interpolation', f'must be one of {_INTERPOLATIONS}'),
        (cfg.randaugment is None or cfg.randaugment.startswith('rand'), 'randaugment',
         "must be a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1'"),
        (cfg.randaugment is None or cfg.augment != 'none', 'randaugment', "needs augment='basic' or 'strong'"),
        (0 <= cfg.re_prob <= 1, 're_prob', 'must be in [0, 1]'),
    ]
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f'data config {name}={getattr(cfg, name)!r} is invalid: {fix}')


def _loader(
        dataset: Dataset,
        *,
        sampler: Sampler,
        batch_size: int,
        num_workers: int,
        drop_last: bool,
        seed: int,
) -> DataLoader:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_worker_init, seed=seed) if num_workers > 0 else None,
        generator=generator)


def build_loaders(cfg: DataConfig, *, distributed: bool = False, seed: int = 0) -> DataBundle:
    """Training and evaluation loaders of ``cfg.data`` (see the module docstring for the determinism contract).

    Args:
        cfg: The data configuration.
        distributed: Shard across the ranks of the initialised :mod:`torch.distributed` process group.
        seed: Seed of the shuffling and augmentation streams.

    Returns:
        A :class:`DataBundle`. Call ``bundle.train_sampler.set_epoch(epoch)`` before each epoch.

    Raises:
        DataError: the data folder or one of its splits is missing, empty, or broken.
        ConfigError: an invalid configuration value.
    """
    _validate(cfg)
    rank, world = _dist_info(distributed)
    mean = tuple(cfg.mean) if cfg.mean is not None else tuple(IMAGENET_DEFAULT_MEAN)
    std = tuple(cfg.std) if cfg.std is not None else tuple(IMAGENET_DEFAULT_STD)
    common = dict(img_size=cfg.img_size, interpolation=cfg.interpolation, mean=mean, std=std)
    train_tf = build_transform(is_training=True, augment=cfg.augment, randaugment=cfg.randaugment,
                               re_prob=cfg.re_prob, **common)
    eval_tf = build_transform(is_training=False, **common)
    train_ds, class_names, _ = build_dataset(cfg.data, split='train', transform=train_tf, img_size=cfg.img_size,
                                             interpolation=cfg.interpolation)
    val_ds, _, eval_split = build_dataset(cfg.data, split='val', transform=eval_tf, img_size=cfg.img_size,
                                          interpolation=cfg.interpolation)
    if cfg.train_subset is not None:
        train_ds = Subset(train_ds, balanced_subset(train_ds.targets, cfg.train_subset))
    if cfg.val_subset is not None:
        val_ds = Subset(val_ds, balanced_subset(val_ds.targets, cfg.val_subset))
    num_classes = len(class_names)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                         num_classes=num_classes)

    seeded = EpochSeededDataset(train_ds, seed=seed)
    sampler = EpochSampler(seeded, num_replicas=world, rank=rank, seed=seed, shuffle=True)
    per_rank = sampler.num_samples
    batch_size = min(cfg.batch_size, per_rank)
    if mixup_fn is not None and batch_size % 2:
        batch_size -= 1  # timm's Mixup needs an even batch
    if batch_size < (2 if mixup_fn is not None else 1):
        raise DataError(f'{cfg.data}: only {per_rank} training image(s) per process; add images or lower the '
                        f'number of processes')
    if batch_size != cfg.batch_size:
        _logger.info('batch size %d lowered to %d (%d training images per process)', cfg.batch_size, batch_size,
                     per_rank)
    train_loader = _loader(seeded, sampler=sampler, batch_size=batch_size, num_workers=cfg.num_workers,
                           drop_last=True, seed=seed)
    val_loader = _loader(val_ds, sampler=ShardSampler(len(val_ds), rank=rank, world_size=world),
                         batch_size=cfg.eval_batch_size or 2 * cfg.batch_size, num_workers=cfg.num_workers,
                         drop_last=False, seed=seed)
    return DataBundle(
        train_loader=train_loader, val_loader=val_loader, num_classes=num_classes, class_names=class_names,
        mixup_fn=mixup_fn, train_sampler=sampler, mean=mean, std=std, steps_per_epoch=len(train_loader),
        eval_split=eval_split, train_size=len(train_ds), val_size=len(val_ds))


def build_eval_loader(
        data: str,
        *,
        img_size: int,
        batch_size: int,
        num_workers: int = 2,
        split: str = 'val',
        distributed: bool = False,
        subset: int | None = None,
        interpolation: str = 'bicubic',
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
) -> tuple[DataLoader, int]:
    """An evaluation loader (deterministic, sharded without padding across ranks).

    Args:
        data: ``'digits'`` or an ImageNet-layout folder.
        img_size: Model input size.
        batch_size: Batch size per process.
        num_workers: DataLoader worker processes.
        split: ``'val'`` (falls back to ``test/``), ``'test'`` or ``'train'``.
        distributed: Shard across the ranks of the initialised :mod:`torch.distributed` process group.
        subset: Evaluate on a deterministic class-balanced subset of this many images.
        interpolation: Resize interpolation.
        mean: Normalisation mean (default: ImageNet's).
        std: Normalisation std (default: ImageNet's).
        rank: Explicit rank (overrides ``distributed``; with ``world_size``, e.g. for tests).
        world_size: Explicit number of processes.

    Returns:
        ``(loader, num_classes)``; classes are those of ``train/`` when it exists, else of the evaluated split.
    """
    if batch_size < 1:
        raise ConfigError(f'batch_size={batch_size} is invalid: must be >= 1')
    if rank is None or world_size is None:
        rank, world_size = _dist_info(distributed)
    tf = build_transform(img_size=img_size, is_training=False, interpolation=interpolation,
                         mean=mean if mean is not None else IMAGENET_DEFAULT_MEAN,
                         std=std if std is not None else IMAGENET_DEFAULT_STD)
    ds, class_names, _ = build_dataset(data, split=split, transform=tf, img_size=img_size,
                                       interpolation=interpolation)
    if subset is not None:
        ds = Subset(ds, balanced_subset(ds.targets, subset))
    loader = _loader(ds, sampler=ShardSampler(len(ds), rank=rank, world_size=world_size), batch_size=batch_size,
                     num_workers=num_workers, drop_last=False, seed=0)
    return loader, len(class_names)
