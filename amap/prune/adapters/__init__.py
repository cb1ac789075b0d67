"""Adapter registry: the only place that maps module types to adapters.

A user with a new attention type writes one :class:`~amap.prune.adapters.base.Adapter` subclass and calls
:func:`register_adapter`; nothing else in the pruner changes.
"""
from __future__ import annotations

from torch import nn

from .base import Adapter
from .mlp import MlpAdapter
from .timm_attention import SoftmaxAttentionAdapter, WindowAttentionAdapter

__all__ = ['Adapter', 'register_adapter', 'find_adapters', 'ADAPTERS']

#: Adapters tried in order; the first whose ``matches`` accepts a module wins.
ADAPTERS: list[type[Adapter]] = [WindowAttentionAdapter, SoftmaxAttentionAdapter, MlpAdapter]


def register_adapter(cls: type[Adapter], *, first: bool = True) -> type[Adapter]:
    """Register an adapter class (usable as a decorator). ``first`` gives it priority over the built-in ones."""
    if cls not in ADAPTERS:
        ADAPTERS.insert(0, cls) if first else ADAPTERS.append(cls)
    return cls


def find_adapters(model: nn.Module) -> list[Adapter]:
    """One adapter per prunable module of ``model``, in module order. Modules inside a matched module are skipped."""
    found: list[Adapter] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + '.') for prefix in claimed):
            continue
        for cls in ADAPTERS:
            if cls.matches(module):
                adapter = cls(name, module)
                if adapter.groups():
                    found.append(adapter)
                    if cls.claims_subtree:
                        claimed.append(name)
                break
    return found


# FLatten adapters register themselves on import (kept last so that a missing optional family cannot break timm).
from . import flatten  # noqa: E402,F401
from .hf import HFAttentionAdapter  # noqa: E402
from .torchvision import MultiheadAttentionAdapter, ShiftedWindowAttentionAdapter  # noqa: E402

ADAPTERS[:0] = [HFAttentionAdapter, MultiheadAttentionAdapter, ShiftedWindowAttentionAdapter]
