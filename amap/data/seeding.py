"""Seeds derived from integer keys, and the per-sample RNG scope that makes augmentations reproducible."""
from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ['sample_seed', 'seed_rng', 'EpochSeededDataset']

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
