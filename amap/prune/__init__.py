"""The AMAP pruning engine (docs/amap-method.md): indicators, similarity weights, head balance, reweighting,
linear-attention initialisation, the MAC-targeted search, baseline criteria, surgery and the artifact.

The package is callable: ``amap.prune(model, loader, target)`` is :func:`amap.prune.api.prune`, while
``amap.prune.Pruner`` etc. remain reachable as attributes.
"""
import sys
import types

from .api import PruneConfig, PruneResult, prune, resolve_target
from .artifact import load_pruned, save_pruned
from .plot import plot_structure
from .pruner import Pruner

__all__ = ['prune', 'PruneConfig', 'PruneResult', 'Pruner', 'resolve_target', 'save_pruned', 'load_pruned',
           'plot_structure']


class _CallablePackage(types.ModuleType):
    """``amap.prune`` is both this package and the :func:`prune` function."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
