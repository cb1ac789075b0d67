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

from .config import AUGMENTS, DEFAULT_RANDAUGMENT, DIGITS, DataConfig
from .datasets import balanced_subset, build_dataset
from .digits import DigitsDataset
from .folder import MAX_CONSECUTIVE_CORRUPT, DataWarning, ImageFolderDataset
from .loaders import DataBundle, build_eval_loader, build_loaders
from .samplers import EpochSampler, ShardSampler, shard_indices
from .seeding import EpochSeededDataset, sample_seed, seed_rng
from .transforms import build_transform

__all__ = [
    'DIGITS', 'AUGMENTS', 'DEFAULT_RANDAUGMENT', 'MAX_CONSECUTIVE_CORRUPT', 'DataConfig', 'DataBundle', 'DataWarning',
    'ImageFolderDataset', 'DigitsDataset', 'EpochSeededDataset', 'EpochSampler', 'ShardSampler', 'build_loaders',
    'build_eval_loader', 'build_dataset', 'build_transform', 'balanced_subset', 'shard_indices', 'seed_rng',
    'sample_seed',
]
