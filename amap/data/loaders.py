"""Training and evaluation loaders (:func:`build_loaders`, :func:`build_eval_loader`) and the :class:`DataBundle`."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..errors import ConfigError, DataError
from .config import DataConfig, validate_config
from .datasets import balanced_subset, build_dataset
from .samplers import EpochSampler, ShardSampler
from .seeding import EpochSeededDataset, _worker_init
from .transforms import build_transform

__all__ = ['DataBundle', 'build_loaders', 'build_eval_loader']

_logger = logging.getLogger(__name__)


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


def _dist_info(distributed: bool) -> tuple[int, int]:
    if not distributed:
        return 0, 1
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError('distributed=True but torch.distributed is not initialised; launch with torchrun and '
                          'call init_process_group first')
    return dist.get_rank(), dist.get_world_size()


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
    validate_config(cfg)
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
