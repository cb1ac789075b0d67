"""The AMAP pruning engine (docs/amap-method.md): indicators, similarity weights, head balance, reweighting,
linear-attention initialisation, the MAC-targeted search, baseline criteria, surgery and the artifact.

``amap.prune`` names two things on purpose: this package, and -- called -- the public entry point
:func:`amap.prune.api.prune` (``amap.prune(model, loader, target)``; also ``from amap.prune import prune``). The
package's attributes (``amap.prune.Pruner``, ``amap.prune.PruneConfig``, ...) and modules stay reachable as usual.
The stages behind the call are :class:`~amap.prune.staged.StagedPruning`.
"""
import sys
import types

from .api import PruneConfig, PruneResult, prune, resolve_target
from .artifact import load_pruned, save_pruned
from .plot import plot_structure
from .pruner import Pruner
from .search import SearchSettings
from .staged import StagedPruning

__all__ = ['prune', 'PruneConfig', 'SearchSettings', 'PruneResult', 'StagedPruning', 'Pruner', 'resolve_target',
           'save_pruned', 'load_pruned', 'plot_structure']


class _CallablePackage(types.ModuleType):
    """``amap.prune`` is both this package and the :func:`prune` function."""

    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
