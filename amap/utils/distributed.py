"""DDP plumbing for runs started by ``torchrun``: process group from the environment, device choice, reductions.

One process per device. ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them everything here
degrades to a single process (no process group, reductions are identities), so the same code runs in both cases.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = [
    'DistInfo', 'init_distributed', 'cleanup_distributed', 'resolve_device', 'is_main_process', 'barrier',
    'all_reduce_sum', 'all_gather_object', 'broadcast_object', 'unwrap_model',
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run.

    Attributes:
        rank: Global rank (0 in a single-process run).
        local_rank: Rank on this machine (selects the CUDA device).
        world_size: Number of processes.
        device: The device this process computes on.
        distributed: Whether a process group is active (``world_size > 1``).
        owns_group: Whether :func:`init_distributed` created the group (then :func:`cleanup_distributed` destroys it).
    """
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device('cpu')
    distributed: bool = False
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes files, logs and progress bars."""
        return self.rank == 0


def resolve_device(device: str | torch.device = 'auto', *, local_rank: int = 0) -> torch.device:
    """Turn ``'auto'`` / ``'cpu'`` / ``'cuda'`` / ``'cuda:N'`` into a device; ``'auto'`` picks CUDA when present.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the name is not a device.
    """
    if isinstance(device, torch.device):
        return device
    name = (device or 'auto').lower()
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: CUDA is not available on this machine; use 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device('cuda', local_rank)
    return dev


def init_distributed(device: str | torch.device = 'auto', *, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group described by torchrun's environment (or stay single-process).

    Uses NCCL on CUDA and gloo on CPU. If a process group already exists (e.g. the caller set it up), it is reused
    and left alone by :func:`cleanup_distributed`.

    Args:
        device: ``'auto'``, ``'cpu'``, ``'cuda'``; under DDP on CUDA each process uses ``cuda:LOCAL_RANK``.
        timeout_s: Collective timeout.

    Returns:
        The :class:`DistInfo` of this process.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev = resolve_device(device, local_rank=local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev,
                        distributed=dist.get_world_size() > 1, owns_group=False)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    from datetime import timedelta
    backend = 'nccl' if dev.type == 'cuda' else 'gloo'
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=dev,
                    distributed=True, owns_group=True)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if info.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0 or in a single-process run."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single-process run)."""
    if _active():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (float64 is fine on gloo and NCCL) and return it."""
    if _active():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank (in memory only; nothing is written with pickle)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, *, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel / torch.compile wrapper."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model
