"""AMAP: automatic multi-head attention pruning for vision transformers.

Public API (imported lazily so that ``import amap`` stays cheap):

* models: importing ``amap`` registers the FLatten zoo in timm (``timm.create_model('flatten_swin_tiny')``);
  :func:`amap.models.from_official` builds a model from an official FLatten constructor name and arguments;
* :func:`load_checkpoint` -- official FLatten / timm checkpoints, safely;
* :func:`count_macs` -- the MAC counter;
* :func:`train`, :func:`evaluate` -- the training and evaluation loops;
* :func:`prune` -> :class:`PruneResult`, :func:`save_pruned`, :func:`load_pruned`, :func:`plot_structure` -- the
  pruning engine.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import models  # noqa: F401  (registers the zoo in timm)
from .errors import AmapError, CheckpointError, ConfigError, DataError, Interrupted, ModelError, OutputError

__version__ = '0.1.0'

_LAZY = {
    'load_checkpoint': 'amap.checkpoint',
    'count_macs': 'amap.macs',
    'count_params': 'amap.macs',
    'load_trained': 'amap.train',
    'TrainConfig': 'amap.train',
    'TrainResult': 'amap.train',
    'train': 'amap.train',
    'evaluate': 'amap.train',
    'PruneConfig': 'amap.prune',
    'SearchSettings': 'amap.prune',
    'PruneResult': 'amap.prune',
    'save_pruned': 'amap.prune',
    'load_pruned': 'amap.prune',
    'plot_structure': 'amap.prune',
}

__all__ = ['AmapError', 'CheckpointError', 'ConfigError', 'DataError', 'Interrupted', 'ModelError', 'OutputError',
           'models', 'prune', *_LAZY]


def __getattr__(name: str) -> Any:
    if name == 'prune':  # the subpackage, which is callable as the prune() function
        return importlib.import_module('amap.prune')
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amap' has no attribute {name!r}")
