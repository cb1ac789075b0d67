"""Adapter registry: the only place that maps module types to adapters.

A user with a new attention type writes one :class:`~amap.prune.adapters.base.Adapter` subclass and calls
:func:`register_adapter`; nothing else in the pruner changes.
"""
from __future__ import annotations

from torch import nn

from .base import Adapter
from .mlp import MlpAdapter
from .timm_attention import SoftmaxAttentionAdapter, WindowAttentionAdapter

__all__ = ['Adapter', 'register_adapter', 'find_adapters', 'unadapted_attention', 'ADAPTERS']

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


def unadapted_attention(model: nn.Module, adapters: list[Adapter]) -> dict[str, list[str]]:
    """Attention modules no adapter prunes: ``{type name: [module names]}``, outermost ones only.

    An attention module is one whose class name contains ``Attention`` / ``Attn`` (or an ``nn.MultiheadAttention``)
    and that holds parameters; those inside or around an adapted module are not counted.
    """
    adapted = [a.name for a in adapters]
    found: dict[str, list[str]] = {}
    taken: list[str] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not name or not ('attention' in kind.lower() or 'attn' in kind.lower()) or \
                not any(True for _ in module.parameters()):
            continue
        inside = [p for p in adapted + taken if name == p or name.startswith(p + '.') or p.startswith(name + '.')]
        if not inside:
            found.setdefault(kind, []).append(name)
            taken.append(name)
    return found


# FLatten adapters register themselves on import (kept last so that a missing optional family cannot break timm).
from . import flatten  # noqa: E402,F401
from .hf import HFAttentionAdapter  # noqa: E402
from .torchvision import MultiheadAttentionAdapter, ShiftedWindowAttentionAdapter  # noqa: E402

ADAPTERS[:0] = [HFAttentionAdapter, MultiheadAttentionAdapter, ShiftedWindowAttentionAdapter]
