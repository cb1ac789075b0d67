"""Smaller models for the width tests, built the one way AMAP builds a pruned model: each named module replaced by its
adapter's ``build`` (what :func:`amap.prune.artifact.load_pruned` does), i.e. the module's own constructor at other
widths (:meth:`~amap.models.helpers.Rebuildable.rebuild`)."""
from __future__ import annotations

from torch import nn

from amap.prune.adapters import find_adapters


def rebuild_modules(model: nn.Module, widths: dict[str, dict]) -> nn.Module:
    """``model`` with every module named in ``widths`` rebuilt at ``widths[name]`` (adapter keys: ``qk`` and ``v`` per
    head, ``mlp``, ``dwc_shared``); the rebuilt modules have fresh weights."""
    adapters = {a.name: a for a in find_adapters(model)}
    for name, w in widths.items():
        model.set_submodule(name, adapters[name].build(w), strict=True)
    return model


def rebuild_blocks(model: nn.Module, widths: dict[str, dict], attn: str = 'attn') -> nn.Module:
    """:func:`rebuild_modules` by block: a block's ``mlp`` width goes to its ``mlp``, the other keys to its attention
    (the submodule ``attn`` of the block; ``''``: the block itself, as in CSwin)."""
    per_module: dict[str, dict] = {}
    for block, w in widths.items():
        if set(w) - {'mlp'}:
            per_module[f'{block}.{attn}' if attn else block] = {k: v for k, v in w.items() if k != 'mlp'}
        if 'mlp' in w:
            per_module[f'{block}.mlp'] = {'mlp': w['mlp']}
    return rebuild_modules(model, per_module)
