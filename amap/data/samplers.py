"""Samplers: the epoch-keyed, resumable training sampler and the padding-free evaluation shards."""
from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..errors import ConfigError

__all__ = ['EpochSampler', 'ShardSampler', 'shard_indices']


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
