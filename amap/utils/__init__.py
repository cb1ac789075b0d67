"""Plumbing shared by the training loop and the pruning pipeline: atomic file I/O and DDP set-up."""
from .distributed import DistInfo, barrier, cleanup_distributed, init_distributed, is_main_process, resolve_device
from .io import (
    JsonlWriter,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_safetensors,
    read_json,
    read_safetensors,
)

__all__ = [
    'DistInfo', 'barrier', 'cleanup_distributed', 'init_distributed', 'is_main_process', 'resolve_device',
    'JsonlWriter', 'atomic_write_bytes', 'atomic_write_json', 'atomic_write_safetensors', 'read_json',
    'read_safetensors',
]
