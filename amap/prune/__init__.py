"""The AMAP pruning engine (docs/amap-method.md): indicators, similarity weights, head balance, reweighting,
linear-attention initialisation, the MAC-targeted search, baseline criteria, surgery and the artifact."""
from .api import PruneConfig, PruneResult, prune, resolve_target
from .artifact import load_pruned, save_pruned
from .plot import plot_structure
from .pruner import Pruner

__all__ = ['prune', 'PruneConfig', 'PruneResult', 'Pruner', 'resolve_target', 'save_pruned', 'load_pruned',
           'plot_structure']
