"""Training and evaluation loops, checkpoints, exact resume and DDP.

:func:`train` runs a whole job from a :class:`TrainConfig`; the pieces it is made of are public so that the pruning
pipeline reuses them with its own loss (distillation) and its own stages:

* :mod:`~amap.train.factory` -- :func:`create_model`, a timm model by name (the FLatten zoo is registered by
  ``import amap``), with close-name suggestions for typos;
* :mod:`~amap.train.loop` -- :func:`build_optimizer` / :func:`build_scheduler` (timm's factories; the schedule is
  stepped per update), :class:`TrainState` with :func:`train_one_epoch` (AMP, gradient clipping, gradient
  accumulation, DDP ``no_sync``) and :func:`evaluate` (metrics reduced over ranks);
* :mod:`~amap.train.state` -- the checkpoint codec (:func:`write_state` / :func:`read_state`, one folder format for
  training, the pruning search and the fine-tune) and :func:`save_train_state` / :func:`load_train_state`;
* :mod:`~amap.train.epochs` -- :class:`EpochLoop`, the epochs with checkpoints and stop requests;
* :mod:`~amap.train.artifact` -- :func:`save_trained` / :func:`load_trained`, the trained model as
  ``model.safetensors`` + ``model.json``;
* :mod:`~amap.train.job` -- :func:`train`, the job (output folder, log, evaluations, model file).
"""
from __future__ import annotations

from .artifact import MODEL_FILE, MODEL_META_FILE, load_trained, read_trained_meta, save_trained
from .config import TrainConfig
from .epochs import EpochLoop
from .factory import create_model, unknown_model_message
from .job import LOG_FILE, TrainResult, train
from .loop import (
    LossFn,
    TrainState,
    amp_dtype,
    amp_enabled,
    autocast,
    build_criterion,
    build_optimizer,
    build_scheduler,
    build_train_state,
    default_loss_fn,
    evaluate,
    make_scaler,
    train_one_epoch,
)
from .state import (
    CHECKPOINT_DIR,
    STATE_FORMAT,
    latest_train_state,
    load_train_state,
    optimizer_from_files,
    optimizer_to_files,
    read_state,
    restore_rng_states,
    rng_states,
    save_train_state,
    set_rng_states,
    tensors_under,
    write_state,
)

__all__ = [
    'TrainConfig', 'TrainResult', 'TrainState', 'EpochLoop', 'LossFn', 'train', 'evaluate', 'train_one_epoch',
    'create_model', 'unknown_model_message', 'build_optimizer', 'build_scheduler', 'build_criterion',
    'build_train_state', 'default_loss_fn', 'amp_enabled', 'amp_dtype', 'autocast', 'make_scaler',
    'save_train_state', 'load_train_state', 'latest_train_state', 'write_state', 'read_state', 'rng_states',
    'set_rng_states', 'restore_rng_states', 'optimizer_to_files', 'optimizer_from_files', 'tensors_under',
    'save_trained', 'load_trained', 'read_trained_meta', 'MODEL_FILE', 'MODEL_META_FILE', 'LOG_FILE',
    'CHECKPOINT_DIR', 'STATE_FORMAT',
]
