"""Training and evaluation loops, checkpoints, exact resume and DDP.

:func:`train` runs a whole job from a :class:`TrainConfig`; the pieces it is made of are public so that the pruning
pipeline can reuse them with its own loss (distillation) and its own stages:

* :func:`create_model` -- a timm model by name (the FLatten zoo is registered by ``import amap``), with close-name
  suggestions for typos;
* :func:`build_optimizer` / :func:`build_scheduler` -- timm's factories; the schedule is stepped per update;
* :class:`TrainState` with :func:`train_one_epoch` -- the update loop (AMP on CUDA, gradient clipping, gradient
  accumulation, DDP ``no_sync``), :func:`evaluate` -- metrics reduced over ranks;
* :func:`save_train_state` / :func:`load_train_state` -- resumable checkpoints; :func:`save_trained` /
  :func:`load_trained` -- the trained model as ``model.safetensors`` + ``model.json``.

Files in ``out_dir`` (written by rank 0 only, atomically, no pickle):

* ``model.safetensors`` -- the weights after the last finished epoch (or the last step of a ``max_steps`` run); its
  header holds the same JSON as ``model.json`` (model name and arguments, classes, input size, normalisation, epoch,
  step, metrics), so the file alone rebuilds the model and the pair can never disagree in what
  :func:`load_trained` uses;
* ``checkpoints/step_<N>/state.safetensors`` (model weights, optimizer tensors) + ``state.json`` (step, epoch,
  scheduler, scaler, RNG states, config, history), written as a folder that appears complete or not at all, then
  published by atomically replacing ``checkpoints/latest.json``; the two newest folders are kept;
* ``log.jsonl`` -- one JSON record per logged step (``"event": "train"``) and per evaluation (``"event": "eval"``).

Exact resume: the data order and augmentations of epoch ``e`` are a function of ``(seed, e)`` (see
:mod:`amap.data`), the already-done batches of a partial epoch are skipped by the sampler without decoding, and the
trainer-side randomness (dropout, drop-path, mixup/cutmix) is re-seeded before every update from
``(seed, rank, step)``. A run resumed from the checkpoint at step ``k`` therefore ends with the same weights as an
uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import os
import random
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from .data import DataBundle, DataConfig, build_loaders, seed_rng
from .errors import AmapError, CheckpointError, ConfigError, Interrupted, ModelError
from .utils.config import from_mapping
from .utils.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    barrier,
    cleanup_distributed,
    init_distributed,
    unwrap_model,
)
from .utils.interrupt import graceful_stop, stop_reason, stop_requested
from .utils.io import (
    JsonlWriter,
    atomic_dir,
    atomic_write_json,
    atomic_write_safetensors,
    output_error,
    read_json,
    read_safetensors,
    remove_dir,
    remove_stale_temps,
    to_jsonable,
)
from .utils.runfolder import begin_run, check_resume, run_lock

__all__ = [
    'TrainConfig', 'TrainResult', 'TrainState', 'train', 'evaluate', 'train_one_epoch', 'create_model',
    'build_optimizer', 'build_scheduler', 'build_criterion', 'default_loss_fn', 'amp_enabled', 'make_scaler',
    'save_train_state',
    'load_train_state', 'latest_train_state', 'save_trained', 'load_trained', 'read_trained_meta',
    'unknown_model_message', 'MODEL_FILE', 'MODEL_META_FILE', 'LOG_FILE', 'CHECKPOINT_DIR',
]

_logger = logging.getLogger(__name__)

MODEL_FILE = 'model.safetensors'
MODEL_META_FILE = 'model.json'
LOG_FILE = 'log.jsonl'
CHECKPOINT_DIR = 'checkpoints'
OWNED_NAMES = (MODEL_FILE, MODEL_META_FILE, CHECKPOINT_DIR, LOG_FILE)
"""Every name ``amap train`` writes in its run folder (see :mod:`amap.utils.runfolder`)."""
_LATEST = 'latest.json'
_STATE_TENSORS = 'state.safetensors'
_STATE_JSON = 'state.json'
_MODEL_FORMAT = 'amap.trained/1'
_STATE_FORMAT = 'amap.train_state/1'
_META_KEY = 'amap'


# ------------------------------------------------------------------------------------------------------------ configs
@dataclass
class TrainConfig:
    """A training job.

    Attributes:
        model: timm model name (``import amap`` registers the FLatten zoo, e.g. ``'flatten_deit_nano'``).
        model_kwargs: Extra keyword arguments of the model factory (``num_classes`` and ``img_size`` come from the
            data unless given here).
        data: Data source, augmentation and batch size per process (see :class:`amap.data.DataConfig`).
        epochs: Number of epochs (the cosine schedule spans them).
        lr: Peak learning rate (after warm-up).
        weight_decay: Weight decay (timm excludes biases and norm weights).
        warmup_epochs: Linear warm-up length in epochs (may be fractional).
        warmup_lr: Learning rate at the start of the warm-up.
        min_lr: Learning rate at the end of the cosine schedule.
        opt: timm optimizer name.
        sched: timm scheduler name; stepped per update.
        clip_grad: Clip the gradient norm to this value (``None``: no clipping).
        label_smoothing: Label smoothing; ``None`` uses ``data.label_smoothing`` (this value overrides it).
        amp: ``'auto'`` (float16 autocast + GradScaler on CUDA, off on CPU), ``'on'`` (also on the CPU: bfloat16
            autocast, about 1.6x faster training on CPUs with AVX-512 BF16) or ``'off'``.
        seed: Seed of model initialisation, data order, augmentation and dropout.
        out_dir: Output folder (model, checkpoints, log).
        resume: ``True`` to continue the run in ``out_dir`` from its latest checkpoint (an error if there is none),
            or the path of a run folder / checkpoint folder to continue from.
        overwrite: Start afresh in an ``out_dir`` that holds a previous run (its checkpoints and log are deleted).
        checkpoint_every: Also checkpoint every this many updates (0: only at the end of each epoch).
        eval_every: Evaluate every this many epochs (the last epoch is always evaluated; 0: only the last).
        device: ``'auto'``, ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` (under torchrun each process uses its local GPU).
        log_every: Log (JSON-lines record, progress line) every this many updates.
        max_steps: Stop after this many updates in total (the schedule still spans ``epochs``); for quick runs.
        accum_steps: Gradient accumulation: batches per optimizer update.
        progress: Show a progress bar (rank 0, interactive terminals only).
        keep_checkpoints: Number of checkpoint folders to keep.
    """
    model: str = 'flatten_deit_nano'
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    opt: str = 'adamw'
    sched: str = 'cosine'
    clip_grad: float | None = None
    label_smoothing: float | None = None
    amp: str = 'auto'
    seed: int = 0
    out_dir: str = 'runs/train'
    resume: bool | str = False
    overwrite: bool = False
    checkpoint_every: int = 0
    eval_every: int = 1
    device: str = 'auto'
    log_every: int = 20
    max_steps: int | None = None
    accum_steps: int = 1
    progress: bool = True
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.data, Mapping):
            self.data = from_mapping(DataConfig, self.data, where='data')

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of the configuration."""
        return to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrainConfig:
        """Build from a (YAML/JSON) mapping; ``data`` may be a nested mapping of :class:`DataConfig` fields.

        Raises:
            ConfigError: an unknown key (with the closest valid name) or a value of the wrong type.
        """
        return from_mapping(cls, doc, where='train config')


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: The trained model (unwrapped, on the training device, in eval mode).
        out_dir: The output folder.
        model_path: ``out_dir/model.safetensors``.
        metrics: The last evaluation (``top1``, ``top5``, ``loss``, ``images``, ``seconds``, ``images_per_s``).
        best_top1: Best top-1 over the evaluations of the run.
        steps: Optimizer updates done in total (including those before a resume).
        epochs: Epochs finished (fractional when stopped by ``max_steps``).
        seconds: Wall time of this process's part of the run (excluding time before a resume).
        history: Every evaluation record of the run.
        resumed_from: Step of the checkpoint the run resumed from (``None`` for a fresh run).
    """
    model: nn.Module
    out_dir: Path
    model_path: Path
    metrics: dict[str, float]
    best_top1: float
    steps: int
    epochs: float
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None


@dataclass
class TrainState:
    """Everything that changes during training; what a checkpoint saves.

    Attributes:
        model: The model being trained (possibly wrapped in DistributedDataParallel).
        optimizer: The optimizer.
        scheduler: timm scheduler stepped per update (``None`` for a constant learning rate).
        scaler: AMP gradient scaler (disabled on CPU).
        step: Optimizer updates done.
        epoch: Epochs finished.
        batch_in_epoch: Batches of the current (unfinished) epoch already consumed.
        best_top1: Best top-1 so far.
        history: Evaluation records.
        stopped: A stop request (SIGINT/SIGTERM) ended the last :func:`train_one_epoch` (not saved).
    """
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: torch.amp.GradScaler | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_top1: float = float('nan')
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: bool = False

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper."""
        return unwrap_model(self.model)


# ------------------------------------------------------------------------------------------------------------ models
def unknown_model_message(name: str) -> str:
    """``unknown model 'x'; did you mean ...?`` with close names from timm's registry."""
    names = timm.list_models()
    close = [n for n in names if n.startswith(name)][:3]  # a prefix: 'vit_tiny' -> 'vit_tiny_patch16_224', ...
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    close = close[:4]
    hint = f'did you mean {", ".join(close)}?' if close else "list the names with timm.list_models('*pattern*')"
    return f'unknown model {name!r}; {hint}'


def create_model(
        name: str,
        *,
        num_classes: int,
        img_size: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create a randomly initialised timm model (never downloads weights).

    ``img_size`` is passed to the factory only when it differs from the model's default input size (so models that
    do not take it, e.g. CNNs, still work at their native size).

    Args:
        name: Model name in timm's registry.
        num_classes: Classifier outputs.
        img_size: Input side in pixels.
        model_kwargs: Extra factory arguments (override ``num_classes``/``img_size``).

    Returns:
        ``(model, create_kwargs)``; ``timm.create_model(name, **create_kwargs)`` rebuilds the same architecture.

    Raises:
        ModelError: unknown name (with close-name suggestions) or arguments the model does not accept.
    """
    if not timm.is_model(name):
        raise ModelError(unknown_model_message(name))
    kwargs: dict[str, Any] = {'num_classes': num_classes}
    if img_size is not None:
        cfg = timm.models.get_pretrained_cfg(name)
        default = getattr(cfg, 'input_size', None) if cfg is not None else None
        if default is None or tuple(default[-2:]) != (img_size, img_size):
            kwargs['img_size'] = img_size
    kwargs.update(model_kwargs or {})
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelError(f'model {name!r} does not accept the arguments {kwargs} ({e}); fix --model-kwargs or '
                         f'--img-size') from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ModelError(f'model {name!r} cannot be built with {kwargs}: {e}') from None
    return model, kwargs


# ------------------------------------------------------------------------------------------------------------ pieces
def amp_enabled(amp: str | bool, device: torch.device) -> bool:
    """Whether mixed precision is on for ``amp`` (``'auto'``/``'on'``/``'off'`` or a bool) on ``device``.

    Raises:
        ConfigError: AMP asked for on a device other than CUDA, or an unknown value.
    """
    if isinstance(amp, bool):
        amp = 'on' if amp else 'off'
    if amp not in ('auto', 'on', 'off'):
        raise ConfigError(f"amp={amp!r} is invalid; use 'auto', 'on' or 'off'")
    if amp == 'on' and device.type not in ('cuda', 'cpu'):
        raise ConfigError(f"amp='on' needs a CUDA device or the CPU (this run uses {device}); use amp='auto' or 'off'")
    return amp == 'on' or (device.type == 'cuda' and amp != 'off')


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype: float16 (with loss scaling) on CUDA, bfloat16 (no loss scaling needed) on the CPU."""
    return torch.float16 if device.type == 'cuda' else torch.bfloat16


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 autocast on CUDA."""
    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == 'cuda')


def _autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=enabled)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer factory (no weight decay on biases, norms and the model's ``no_weight_decay`` set)."""
    try:
        return create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f'opt={cfg.opt!r}: {e}') from None


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, updates_per_epoch: int) -> Any:
    """timm's scheduler factory, stepped per optimizer update (``scheduler.step_update(step)``)."""
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f'sched={cfg.sched!r}: {e}') from None
    return scheduler


def build_criterion(*, mixup: bool, label_smoothing: float) -> nn.Module:
    """Soft-target cross-entropy with mixup/cutmix (targets are already smoothed), else (smoothed) cross-entropy."""
    if mixup:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def _rng_states() -> dict[str, Any]:
    state: dict[str, Any] = {
        'python': random.getstate(),
        'numpy': list(np.random.get_state()),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = [s for s in torch.cuda.get_rng_state_all()]
    return to_jsonable(state)


def _set_rng_states(state: Mapping[str, Any]) -> None:
    v, internal, gauss = state['python']
    random.setstate((v, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(torch.tensor(state['torch'], dtype=torch.uint8))
    if 'cuda' in state and torch.cuda.is_available():
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state['cuda']]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------------------ evaluate
@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: Iterable,
        *,
        device: str | torch.device | None = None,
        amp: str | bool = 'auto',
        progress: bool = False,
        desc: str = 'eval',
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and throughput of ``model`` on ``loader``.

    Under DDP every rank evaluates its shard (the loaders of :mod:`amap.data` shard without padding) and the sums
    of correct predictions, losses and images are reduced over ranks, so every image counts exactly once.

    Args:
        model: The model (a DDP wrapper is unwrapped; the training mode is restored afterwards).
        loader: Batches of ``(images, labels)``.
        device: Where to run (default: the device of the model's parameters).
        amp: ``'auto'`` (float16 autocast on CUDA), ``'on'`` or ``'off'``.
        progress: Show a progress bar (interactive terminals only).
        desc: Progress-bar label.

    Returns:
        ``{'top1', 'top5', 'loss', 'images', 'seconds', 'images_per_s'}``; ``top5`` is top-k with
        ``k = min(5, num_classes)``.
    """
    model = unwrap_model(model)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device('cpu')
    device = torch.device(device)
    use_amp = amp_enabled(amp, device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, images
    start = time.perf_counter()
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    bar = tqdm(loader, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None if progress else True)
    try:
        for images, targets in bar:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with _autocast(device, use_amp):
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[-1])
            topk = logits.topk(k, dim=-1).indices
            hit = topk.eq(targets[:, None])
            sums += torch.stack([
                F.cross_entropy(logits, targets, reduction='sum').double(),
                hit[:, 0].sum().double(),
                hit.any(dim=-1).sum().double(),
                torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
            ])
    finally:
        bar.close()
        model.train(was_training)
    all_reduce_sum(sums)
    seconds = time.perf_counter() - start
    loss, c1, c5, n = sums.tolist()
    n_int = int(round(n))
    return {
        'top1': 100.0 * c1 / max(n, 1.0),
        'top5': 100.0 * c5 / max(n, 1.0),
        'loss': loss / max(n, 1.0),
        'images': n_int,
        'seconds': seconds,
        'images_per_s': n / seconds if seconds > 0 else float('nan'),
    }


# ----------------------------------------------------------------------------------------------------------- epoch loop
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``compute_loss(model, images, targets) -> (loss, logits)``; ``targets`` may be soft (mixup)."""


def default_loss_fn(criterion: nn.Module) -> LossFn:
    """The plain supervised loss: ``criterion(model(images), targets)``."""
    def compute_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
        logits = model(images)
        return criterion(logits, targets), logits
    return compute_loss


@dataclass
class _Window:
    """Training metrics accumulated between two log points (reduced over ranks when read)."""
    device: torch.device
    sums: torch.Tensor = None  # type: ignore[assignment]
    start: float = 0.0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, hard_targets: torch.Tensor) -> None:
        n = hard_targets.numel()
        correct = (logits.detach().argmax(-1) == hard_targets).sum()
        self.sums += torch.stack([loss.detach().double() * n, correct.double(),
                                  torch.tensor(float(n), dtype=torch.float64, device=self.device)])

    def read(self) -> dict[str, float]:
        sums = all_reduce_sum(self.sums.clone())
        loss, correct, n = sums.tolist()
        seconds = time.perf_counter() - self.start
        self.reset()
        return {'loss': loss / max(n, 1.0), 'top1': 100.0 * correct / max(n, 1.0),
                'images_per_s': n / seconds if seconds > 0 else float('nan')}


def train_one_epoch(
        state: TrainState,
        batches: Iterable,
        *,
        num_batches: int,
        compute_loss: LossFn,
        device: torch.device,
        amp: bool = False,
        mixup_fn: Callable | None = None,
        clip_grad: float | None = None,
        accum_steps: int = 1,
        seed: int = 0,
        rank: int = 0,
        max_steps: int | None = None,
        log_every: int = 0,
        on_log: Callable[[TrainState, dict[str, float]], None] | None = None,
        on_update: Callable[[TrainState], None] | None = None,
        progress: bool = False,
        desc: str = 'train',
) -> bool:
    """Run optimizer updates over ``batches`` (the rest of one epoch), advancing ``state``.

    Before every update the trainer-side RNGs are seeded from ``(seed, rank, step)`` (dropout, drop-path and
    mixup then depend on the step only, which makes resume exact). The scheduler is stepped after each update.

    Args:
        state: Training state (``step`` and ``batch_in_epoch`` are advanced).
        batches: The remaining ``(images, labels)`` batches of the epoch.
        num_batches: How many batches ``batches`` yields (for the progress bar; a trailing incomplete group of
            ``accum_steps`` batches is not used).
        compute_loss: ``(model, images, targets) -> (loss, logits)``.
        device: Compute device.
        amp: Use float16 autocast + the state's GradScaler (CUDA).
        mixup_fn: timm Mixup applied to each batch (makes the targets soft).
        clip_grad: Gradient-norm clipping value.
        accum_steps: Batches per optimizer update.
        seed: Run seed.
        rank: This process's rank (its RNG stream).
        max_steps: Stop when ``state.step`` reaches this.
        log_every: Call ``on_log`` every this many updates (0: never).
        on_log: ``(state, metrics)`` with metrics ``loss``, ``top1`` (on the hard labels), ``images_per_s``, ``lr``
            reduced over ranks (every rank calls it).
        on_update: Called after each update and its scheduler step (checkpointing, callbacks).
        progress: Show a progress bar.
        desc: Progress-bar label.

    Returns:
        True when the epoch ran to its end, False when ``max_steps`` or a stop request (SIGINT/SIGTERM, see
        :mod:`amap.utils.interrupt`; ``state.stopped`` is then set) ended it after a complete update.
    """
    model = state.model
    model.train()
    window = _Window(device)
    usable = (num_batches // accum_steps) * accum_steps
    bar = tqdm(total=usable, desc=desc, leave=False, dynamic_ncols=True, disable=None if progress else True)
    finished = True
    try:
        it = iter(batches)
        for i in range(usable):
            if max_steps is not None and state.step >= max_steps:
                finished = False
                break
            images, targets = next(it)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            micro = i % accum_steps
            if micro == 0:
                seed_rng(seed, rank, state.step)
            hard = targets
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            last = micro == accum_steps - 1
            sync = last or not isinstance(model, nn.parallel.DistributedDataParallel)
            with model.no_sync() if not sync else contextlib.nullcontext():
                with _autocast(device, amp):
                    loss, logits = compute_loss(model, images, targets)
                if not torch.isfinite(loss):
                    raise AmapError(f'non-finite loss {loss.item()} at step {state.step}; lower the learning rate '
                                    f'(--lr), clip gradients (--clip-grad) or turn AMP off (--amp off)')
                scaled = loss / accum_steps
                if state.scaler is not None and state.scaler.is_enabled():
                    state.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            window.add(loss, logits, hard)
            state.batch_in_epoch += 1
            bar.update(1)
            if not last:
                continue
            _optimizer_step(state, clip_grad)
            state.step += 1
            if state.scheduler is not None:
                state.scheduler.step_update(num_updates=state.step)
            if log_every and on_log is not None and state.step % log_every == 0:
                metrics = window.read()
                metrics['lr'] = state.optimizer.param_groups[0]['lr']
                bar.set_postfix(loss=f'{metrics["loss"]:.3f}', acc=f'{metrics["top1"]:.1f}',
                                img_s=f'{metrics["images_per_s"]:.0f}', refresh=False)
                on_log(state, metrics)
            if on_update is not None:
                on_update(state)
            if stop_requested():
                state.stopped = True
                finished = False
                break
    finally:
        bar.close()
    return finished


def _optimizer_step(state: TrainState, clip_grad: float | None) -> None:
    params = [p for g in state.optimizer.param_groups for p in g['params']]
    scaler = state.scaler if state.scaler is not None and state.scaler.is_enabled() else None
    if scaler is not None:
        if clip_grad:
            scaler.unscale_(state.optimizer)
            dispatch_clip_grad(params, clip_grad, mode='norm')
        scaler.step(state.optimizer)
        scaler.update()
    else:
        if clip_grad:
            dispatch_clip_grad(params, clip_grad, mode='norm')
        state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------- checkpoints
def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in sd['state'].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f'optim.{idx}.{key}'] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd['param_groups']]
    tuples = sorted({k for g in sd['param_groups'] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {'param_groups': groups, 'tuple_keys': tuples, 'scalars': scalars}


def _optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith('optim.'):
            _, idx, key = name.split('.', 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta['scalars'].items():
        state.setdefault(int(idx), {}).update(values)
    tuple_keys = set(meta.get('tuple_keys', ()))
    groups = [{k: (tuple(v) if k in tuple_keys and isinstance(v, list) else v) for k, v in g.items()}
              for g in meta['param_groups']]
    return {'state': state, 'param_groups': groups}


def save_train_state(
        ckpt_dir: str | os.PathLike,
        state: TrainState,
        *,
        extra: Mapping[str, Any] | None = None,
        keep: int = 2,
        info: DistInfo | None = None,
) -> Path | None:
    """Checkpoint ``state`` to ``ckpt_dir/step_<N>/`` and publish it in ``ckpt_dir/latest.json``.

    A collective under DDP (RNG states are gathered from every rank); rank 0 writes, all ranks leave together.

    Args:
        ckpt_dir: Checkpoint folder (usually ``out_dir/checkpoints``).
        state: The state to save.
        extra: More JSON-able entries for ``state.json`` (e.g. the config).
        keep: How many step folders to keep (older ones are deleted after the pointer moved).
        info: Distributed info (default: single process).

    Returns:
        The folder written (rank 0), else None.
    """
    info = info or DistInfo()
    rngs = all_gather_object(_rng_states())
    folder = None
    with _rank0_writes(f'checkpoint {ckpt_dir}'):
        if info.is_main:
            folder = _write_train_state(Path(ckpt_dir), state, rngs=rngs, extra=extra, keep=keep, info=info)
    return folder


@contextlib.contextmanager
def _rank0_writes(what: str) -> Any:
    """Run a block that only rank 0 executes (writing files); every rank learns whether it failed, so an error on
    rank 0 (disk full, permissions) raises on all ranks instead of leaving the others waiting in a collective."""
    failure: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  re-raised below on every rank
        if not _distributed_active():
            raise
        failure = e
    errors = all_gather_object(None if failure is None else f'{type(failure).__name__}: {failure}')
    if failure is not None:
        raise failure
    first = next((x for x in errors if x is not None), None)
    if first is not None:
        raise CheckpointError(f'writing the {what} failed on another rank ({first})')


def _distributed_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _write_train_state(ckpt_dir: Path, state: TrainState, *, rngs: list[Any], extra: Mapping[str, Any] | None,
                       keep: int, info: DistInfo) -> Path:
    name = f'step_{state.step:09d}'
    save_id = uuid.uuid4().hex
    model_sd = state.module.state_dict()
    tensors = {f'model.{k}': v for k, v in model_sd.items()}
    opt_tensors, opt_meta = _optimizer_to_files(state.optimizer)
    tensors.update(opt_tensors)
    doc = {
        'format': _STATE_FORMAT, 'id': save_id, 'step': state.step, 'epoch': state.epoch,
        'batch_in_epoch': state.batch_in_epoch, 'best_top1': state.best_top1, 'history': state.history,
        'optimizer': opt_meta,
        'scheduler': state.scheduler.state_dict() if state.scheduler is not None else None,
        'scaler': state.scaler.state_dict() if state.scaler is not None else None,
        'rng': rngs, 'world_size': info.world_size, 'time': time.time(), **(extra or {}),
    }
    with atomic_dir(ckpt_dir / name) as tmp:
        atomic_write_safetensors(tmp / _STATE_TENSORS, tensors,
                                 metadata={'format': _STATE_FORMAT, 'id': save_id, 'step': str(state.step)})
        atomic_write_json(tmp / _STATE_JSON, doc)
    atomic_write_json(ckpt_dir / _LATEST, {'step': state.step, 'dir': name, 'id': save_id,
                                           'epoch': state.epoch, 'batch_in_epoch': state.batch_in_epoch})
    old = sorted(p for p in ckpt_dir.glob('step_*') if p.is_dir() and p.name != name)
    for p in old[:max(len(old) - (keep - 1), 0)]:
        remove_dir(p)  # never a half-deleted step folder under a checkpoint name
    remove_stale_temps(ckpt_dir)  # left by a run killed while writing
    return ckpt_dir / name


def _read_state_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    doc = read_json(folder / _STATE_JSON)
    tensors, meta = read_safetensors(folder / _STATE_TENSORS)
    if doc.get('format') != _STATE_FORMAT or meta.get('id') != doc.get('id'):
        raise CheckpointError(f'{folder}: {_STATE_JSON} and {_STATE_TENSORS} do not belong together (ids '
                              f'{doc.get("id")} vs {meta.get("id")}); resume from another checkpoint folder')
    return tensors, doc


def latest_train_state(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder under a run folder, checkpoint folder, or a step folder itself.

    Follows ``latest.json``; if it is missing or broken, falls back to the newest complete ``step_*`` folder.
    Returns None when there is no checkpoint.
    """
    path = Path(path)
    if (path / _STATE_JSON).is_file():
        return path
    ckpt_dir = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    if not ckpt_dir.is_dir():
        return None
    try:
        pointer = read_json(ckpt_dir / _LATEST)
        folder = ckpt_dir / str(pointer['dir'])
        if (folder / _STATE_JSON).is_file() and (folder / _STATE_TENSORS).is_file():
            return folder
    except (CheckpointError, KeyError, TypeError):
        pass
    candidates = sorted((p for p in ckpt_dir.glob('step_*') if p.is_dir()), reverse=True)
    for folder in candidates:
        if (folder / _STATE_JSON).is_file() and (folder / _STATE_TENSORS).is_file():
            _logger.warning('%s: latest.json is missing or stale; using %s', ckpt_dir, folder.name)
            return folder
    return None


def load_train_state(folder: str | os.PathLike, state: TrainState, *, info: DistInfo | None = None) -> dict[str, Any]:
    """Restore ``state`` (model, optimizer, scheduler, scaler, counters, this rank's RNG states) from a checkpoint.

    Args:
        folder: A ``step_<N>`` folder written by :func:`save_train_state`.
        state: The state to fill (model and optimizer built the same way as in the saved run).
        info: Distributed info (selects this rank's RNG states).

    Returns:
        The ``state.json`` document (config, history, ...).

    Raises:
        CheckpointError: the folder is incomplete, corrupt, or does not match the model/optimizer.
    """
    info = info or DistInfo()
    folder = Path(folder)
    tensors, doc = _read_state_folder(folder)
    model_sd = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    try:
        state.module.load_state_dict(model_sd, strict=True)
        state.optimizer.load_state_dict(_optimizer_from_files(tensors, doc['optimizer']))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f'{folder}: the checkpoint does not match this model/optimizer ({first}); resume '
                              f'with the same --model, --model-kwargs and --opt') from None
    if state.scheduler is not None and doc.get('scheduler'):
        state.scheduler.load_state_dict(doc['scheduler'])
    if state.scaler is not None and doc.get('scaler'):
        state.scaler.load_state_dict(doc['scaler'])
    state.step = int(doc['step'])
    state.epoch = int(doc['epoch'])
    state.batch_in_epoch = int(doc['batch_in_epoch'])
    best = doc.get('best_top1')
    state.best_top1 = float(best) if isinstance(best, (int, float)) else float('nan')
    state.history = list(doc.get('history') or [])
    if state.scheduler is not None:
        state.scheduler.step_update(num_updates=state.step)
    rngs = doc.get('rng') or []
    if rngs:
        if len(rngs) != info.world_size:
            _logger.warning('checkpoint was written by %d processes, resuming with %d: RNG streams differ',
                            len(rngs), info.world_size)
        _set_rng_states(rngs[info.rank % len(rngs)])
    return doc


# ------------------------------------------------------------------------------------------------------------ artifacts
def save_trained(
        path: str | os.PathLike,
        model: nn.Module,
        meta: Mapping[str, Any],
) -> None:
    """Write ``model.safetensors`` (weights; ``meta`` as JSON in its header) and ``model.json`` (the same JSON).

    Args:
        path: The ``.safetensors`` file; ``model.json`` goes next to it (same stem).
        model: The model (DDP wrapper unwrapped).
        meta: JSON-able description: ``model``, ``model_kwargs`` (to ``timm.create_model``), ``num_classes``,
            ``img_size``, ``mean``, ``std``, ``interpolation``, ``class_names``, ``epoch``, ``step``, ``metrics``.
    """
    import json
    path = Path(path)
    doc = to_jsonable({'format': _MODEL_FORMAT, 'id': uuid.uuid4().hex, **meta})
    atomic_write_safetensors(path, unwrap_model(model).state_dict(),
                             metadata={_META_KEY: json.dumps(doc), 'format': 'pt'})
    atomic_write_json(path.with_suffix('.json'), doc)


def _resolve_model_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.exists():
        raise CheckpointError(f'{path}: file not found; pass a run folder or its {MODEL_FILE}')
    return path


def read_trained_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The description saved with a model by :func:`save_trained`, or None for a foreign safetensors file."""
    import json
    path = _resolve_model_file(path)
    if path.suffix != '.safetensors':
        return None
    from .utils.io import read_safetensors_metadata
    header = read_safetensors_metadata(path)
    if _META_KEY in header:
        try:
            return json.loads(header[_META_KEY])
        except json.JSONDecodeError:
            raise CheckpointError(f'{path}: its metadata is not valid JSON; the file is corrupt') from None
    side = path.with_suffix('.json')
    if side.is_file():
        doc = read_json(side)
        if isinstance(doc, dict) and doc.get('format') == _MODEL_FORMAT:
            return doc
    return None


def load_trained(
        path: str | os.PathLike,
        *,
        device: str | torch.device = 'cpu',
) -> nn.Module:
    """Rebuild a model trained by :func:`train` from its run folder or ``model.safetensors`` (eval mode).

    The saved description is available as ``model.amap_meta`` (a dict).

    Raises:
        CheckpointError: missing, corrupt, or foreign file (use :func:`amap.load_checkpoint` for those).
    """
    file = _resolve_model_file(path)
    meta = read_trained_meta(file)
    if meta is None:
        raise CheckpointError(f'{file}: not a model saved by amap train (no model description); build the model '
                              f'and use amap.load_checkpoint(model, path) instead')
    name = meta.get('model')
    if not isinstance(name, str) or not timm.is_model(name):
        raise CheckpointError(f'{file}: saved model name {name!r} is not registered; '
                              f'{unknown_model_message(str(name))}')
    try:
        model = timm.create_model(name, pretrained=False, **dict(meta.get('model_kwargs') or {}))
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise CheckpointError(f'{file}: cannot rebuild {name!r} from its saved arguments ({e})') from None
    tensors, _ = read_safetensors(file)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise CheckpointError(f'{file}: weights do not match the saved architecture {name!r} ({first})') from None
    model.amap_meta = meta  # type: ignore[assignment]
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------------------ train
def _validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.epochs >= 1, 'epochs', 'must be >= 1'),
        (cfg.lr > 0, 'lr', 'must be > 0'),
        (cfg.weight_decay >= 0, 'weight_decay', 'must be >= 0'),
        (cfg.warmup_epochs >= 0, 'warmup_epochs', 'must be >= 0'),
        (cfg.min_lr >= 0, 'min_lr', 'must be >= 0'),
        (cfg.clip_grad is None or cfg.clip_grad > 0, 'clip_grad', 'must be > 0 (or None for no clipping)'),
        (cfg.label_smoothing is None or 0 <= cfg.label_smoothing < 1, 'label_smoothing', 'must be in [0, 1)'),
        (cfg.checkpoint_every >= 0, 'checkpoint_every', 'must be >= 0'),
        (cfg.eval_every >= 0, 'eval_every', 'must be >= 0'),
        (cfg.log_every >= 0, 'log_every', 'must be >= 0'),
        (cfg.max_steps is None or cfg.max_steps >= 1, 'max_steps', 'must be >= 1'),
        (cfg.accum_steps >= 1, 'accum_steps', 'must be >= 1'),
        (cfg.keep_checkpoints >= 1, 'keep_checkpoints', 'must be >= 1'),
        (isinstance(cfg.model_kwargs, dict), 'model_kwargs', 'must be a dict'),
    ]
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f'train config {name}={getattr(cfg, name)!r} is invalid: {fix}')
    if not math.isfinite(cfg.lr):
        raise ConfigError(f'train config lr={cfg.lr!r} is invalid: must be finite')


def _prepare_out_dir(cfg: TrainConfig, out: Path, info: DistInfo) -> Path | None:
    """Find the checkpoint to resume from, or check that ``out`` holds no previous run (``overwrite`` clears it)."""
    resume_from = None
    if cfg.resume:
        source = out if cfg.resume is True else Path(str(cfg.resume))
        if cfg.resume is not True and not source.exists():
            raise ConfigError(f'--resume {source}: no such run or checkpoint folder')
        resume_from = latest_train_state(source)
        if resume_from is None and cfg.resume is not True:
            raise ConfigError(f'--resume {source}: no checkpoint found there')
    else:
        previous = [p for p in (out / CHECKPOINT_DIR / _LATEST, out / MODEL_FILE) if p.exists()]
        if previous and not cfg.overwrite:
            raise ConfigError(f'{out} already holds a training run ({previous[0].name}); pass --resume to continue '
                              f'it, --overwrite to start again, or another --out')
        barrier()  # every rank has checked before rank 0 deletes
        if previous and info.is_main:
            remove_dir(out / CHECKPOINT_DIR)
            for name in (MODEL_FILE, MODEL_META_FILE, LOG_FILE):
                try:
                    (out / name).unlink(missing_ok=True)
                except OSError as e:
                    raise output_error(out / name, e, atomic=False) from None
    barrier()
    return resume_from


_RESUME_FREE = frozenset({
    'out_dir', 'resume', 'overwrite', 'max_steps', 'progress', 'log_every', 'device', 'eval_every', 'checkpoint_every',
    'keep_checkpoints', 'data.num_workers', 'data.eval_batch_size', 'data.val_subset',
})
"""Settings that may change when resuming; every other one shapes the trajectory and must stay the same."""


def _check_resume_config(saved: Mapping[str, Any], now: Mapping[str, Any], folder: Path) -> None:
    """Refuse to resume with settings that would change the run (batch size, schedule, data, model, ...)."""
    check_resume(saved, now, free=_RESUME_FREE, where=str(folder.parent.parent))


def _model_meta(cfg: TrainConfig, data: DataBundle, create_kwargs: Mapping[str, Any], state: TrainState,
                metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        'model': cfg.model, 'model_kwargs': dict(create_kwargs), 'num_classes': data.num_classes,
        'img_size': cfg.data.img_size, 'mean': list(data.mean), 'std': list(data.std),
        'interpolation': cfg.data.interpolation, 'class_names': list(data.class_names), 'data': str(cfg.data.data),
        'epoch': state.epoch, 'step': state.step, 'metrics': dict(metrics or {}), 'best_top1': state.best_top1,
    }


def train(
        cfg: TrainConfig,
        *,
        on_update: Callable[[TrainState], None] | None = None,
) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``, evaluating, logging and checkpointing as configured.

    Launched with ``torchrun --nproc_per_node N``, it trains with DistributedDataParallel (NCCL on CUDA, gloo on CPU);
    ``cfg.data.batch_size`` is per process. Only rank 0 writes files, logs and progress bars.

    Args:
        cfg: The job.
        on_update: Called on every rank after each optimizer update and any checkpoint at that step (e.g. to stop a
            run by raising).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError / ModelError / DataError / CheckpointError: invalid configuration, model, data or checkpoint.
        Interrupted: SIGINT/SIGTERM arrived; the run stopped after a complete update and saved its checkpoint.
    """
    _validate(cfg)
    info = init_distributed(cfg.device)
    try:
        with warnings.catch_warnings():
            # DDP compares gradient strides strictly; a depthwise conv's [C, 1, k, k] weight gets a gradient whose
            # stride differs only along the size-1 dimension (same memory layout), which is harmless.
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
            with run_lock(cfg.out_dir, info=info), graceful_stop():  # run folder: one writer
                return _train(cfg, info, on_update)
    finally:
        cleanup_distributed(info)


def _train(cfg: TrainConfig, info: DistInfo, on_update: Callable[[TrainState], None] | None) -> TrainResult:
    t0 = time.perf_counter()
    device = info.device
    use_amp = amp_enabled(cfg.amp, device)
    out = Path(cfg.out_dir)
    begin_run(out, command='train', names=OWNED_NAMES, resume=cfg.resume is True, overwrite=cfg.overwrite,  # run folder
              resumable=cfg.resume is not True or latest_train_state(out) is not None, info=info)
    resume_from = _prepare_out_dir(cfg, out, info)
    smoothing = cfg.data.label_smoothing if cfg.label_smoothing is None else cfg.label_smoothing
    data_cfg = dataclasses.replace(cfg.data, label_smoothing=smoothing)
    data = build_loaders(data_cfg, distributed=info.distributed, seed=cfg.seed)
    if data.steps_per_epoch < cfg.accum_steps:
        raise ConfigError(f'accum_steps={cfg.accum_steps} exceeds the {data.steps_per_epoch} batches of an epoch; '
                          f'lower it or the batch size')
    updates_per_epoch = data.steps_per_epoch // cfg.accum_steps

    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's weights)
    model, create_kwargs = create_model(cfg.model, num_classes=data.num_classes, img_size=cfg.data.img_size,
                                        model_kwargs=cfg.model_kwargs)
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch=updates_per_epoch)
    scaler = make_scaler(device, use_amp)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    config_doc = cfg.to_dict()

    if resume_from is not None:
        doc = load_train_state(resume_from, state, info=info)
        _check_resume_config(doc.get('config') or {}, config_doc, resume_from)
    resumed_from = state.step if resume_from is not None else None

    log = JsonlWriter(out / LOG_FILE, enabled=info.is_main)
    show = cfg.progress and info.is_main and sys.stderr.isatty()
    if info.is_main:
        n_params = sum(p.numel() for p in state.module.parameters())
        _logger.info('%s: %.2fM parameters, %d classes, %d training / %d validation images, %d updates per epoch, '
                     'device %s%s%s', cfg.model, n_params / 1e6, data.num_classes, data.train_size, data.val_size,
                     updates_per_epoch, device, f' x{info.world_size}' if info.distributed else '',
                     ', AMP' if use_amp else '')
        log.write({'event': 'start' if resumed_from is None else 'resume', 'step': state.step, 'epoch': state.epoch,
                   'time': time.time(), 'world_size': info.world_size, 'params': n_params, 'config': config_doc})

    ckpt_dir = out / CHECKPOINT_DIR
    last_saved = [resumed_from]

    def checkpoint() -> None:
        if last_saved[0] == state.step:
            return
        save_train_state(ckpt_dir, state, extra={'config': config_doc}, keep=cfg.keep_checkpoints, info=info)
        last_saved[0] = state.step

    def on_log(st: TrainState, metrics: dict[str, float]) -> None:
        record = {'event': 'train', 'step': st.step, 'epoch': st.epoch + st.batch_in_epoch / data.steps_per_epoch,
                  **metrics, 'time': time.time()}
        log.write(record)
        if info.is_main and not show:
            _logger.info('epoch %d step %d: loss %.4f, train acc %.1f%%, lr %.2e, %.0f img/s', st.epoch + 1, st.step,
                         metrics['loss'], metrics['top1'], metrics['lr'], metrics['images_per_s'])

    def after_update(st: TrainState) -> None:
        mid_epoch = st.batch_in_epoch < updates_per_epoch * cfg.accum_steps
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and mid_epoch:
            checkpoint()
        if on_update is not None:
            on_update(st)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(state.model, data.val_loader, device=device, amp=cfg.amp, progress=show,
                           desc=f'eval {state.epoch}')
        if not (state.best_top1 >= metrics['top1']):  # also replaces NaN
            state.best_top1 = metrics['top1']
        epoch = state.epoch + state.batch_in_epoch / data.steps_per_epoch
        record = {'event': 'eval', 'step': state.step, 'epoch': epoch, **metrics}
        state.history.append(record)
        log.write({**record, 'time': time.time()})
        if info.is_main:
            _logger.info('epoch %g step %d: val top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d images, %.0f img/s)',
                         round(epoch, 2), state.step, metrics['top1'], metrics['top5'], metrics['loss'],
                         metrics['images'], metrics['images_per_s'])
        return metrics

    def write_model(metrics: Mapping[str, Any] | None) -> None:
        with _rank0_writes(f'model {out / MODEL_FILE}'):
            if info.is_main:
                save_trained(out / MODEL_FILE, state.module, _model_meta(cfg, data, create_kwargs, state, metrics))
                remove_stale_temps(out)

    metrics: dict[str, float] | None = None
    max_steps = cfg.max_steps
    compute_loss = default_loss_fn(build_criterion(mixup=data.mixup_fn is not None, label_smoothing=smoothing))
    try:
        while state.epoch < cfg.epochs and (max_steps is None or state.step < max_steps):
            metrics = None
            skip = state.batch_in_epoch
            data.train_sampler.set_epoch(state.epoch, skip=skip * data.train_loader.batch_size)
            finished = train_one_epoch(
                state, data.train_loader, num_batches=data.steps_per_epoch - skip,
                compute_loss=compute_loss,
                device=device, amp=use_amp, mixup_fn=data.mixup_fn, clip_grad=cfg.clip_grad,
                accum_steps=cfg.accum_steps, seed=cfg.seed, rank=info.rank, max_steps=max_steps,
                log_every=cfg.log_every, on_log=on_log, on_update=after_update, progress=show,
                desc=f'epoch {state.epoch + 1}/{cfg.epochs}')
            if not finished:
                checkpoint()  # stopped by max_steps or a signal in the middle of an epoch
                if state.stopped:
                    log.write({'event': 'interrupted', 'step': state.step, 'signal': stop_reason(),
                               'time': time.time()})
                    raise Interrupted(f'{stop_reason() or "stopped"} at step {state.step}: checkpoint saved in '
                                      f'{ckpt_dir}; continue with --resume (same --out)',
                                      checkpoint=str(ckpt_dir), step=state.step)
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            if (cfg.eval_every and state.epoch % cfg.eval_every == 0) or state.epoch == cfg.epochs:
                metrics = run_eval()
            write_model(metrics if metrics is not None else (state.history[-1] if state.history else None))
            checkpoint()
        if metrics is None:  # stopped mid-epoch, or resumed a finished run: evaluate the final weights
            metrics = run_eval()
            write_model(metrics)
    finally:
        log.close()

    model_out = state.module.eval()
    seconds = time.perf_counter() - t0
    epochs_done = state.epoch + state.batch_in_epoch / max(data.steps_per_epoch, 1)
    return TrainResult(model=model_out, out_dir=out, model_path=out / MODEL_FILE, metrics=metrics,
                       best_top1=state.best_top1, steps=state.step, epochs=epochs_done, seconds=seconds,
                       history=list(state.history), resumed_from=resumed_from)
