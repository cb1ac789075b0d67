"""Surgery: freeze the masks, fold the reweights, slice the tensors -- a physically smaller ``nn.Module``.

Every adapter replaces its module by :meth:`~amap.prune.adapters.base.Adapter.shrink`; the gates are removed, so the
result is an ordinary model with no pruning code left in its forward pass. In eval mode it computes what the masked
model computes (tested to atol 1e-5).
"""
from __future__ import annotations

from torch import nn

from .pruner import Pruner

__all__ = ['apply_surgery', 'describe_structure']


def apply_surgery(pruner: Pruner, into: nn.Module | None = None) -> nn.Module:
    """Replace every gated module of the pruner's model by its sliced form (in place) and return the model.

    The pruner's structure must be head-balanced (every head of a group keeps the same number of channels).
    ``into``: a copy of the model (made with the gates detached) to receive the sliced modules instead.
    """
    model = pruner.model[0] if into is None else into
    keep = pruner.keep()
    pruner.detach()
    for adapter in pruner.adapters:
        if adapter.name not in keep:
            continue
        new = adapter.shrink(keep[adapter.name])
        new.train(adapter.module.training)
        model.set_submodule(adapter.name, new, strict=True)
    return model


def describe_structure(pruner: Pruner) -> list[dict]:
    """The artifact's structure records: per pruned module, its adapter, per-head widths and kept indices."""
    keep = pruner.keep()
    records = []
    for adapter in pruner.adapters:
        if adapter.name not in keep:
            continue
        k = keep[adapter.name]
        records.append({
            'module': adapter.name,
            'adapter': type(adapter).__name__,
            'widths': adapter.widths_of(k),
            'heads': {kind: int(idx.shape[0]) for kind, idx in k.items()},
            'indices': {kind: idx.tolist() for kind, idx in k.items()},
        })
    return records
