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
