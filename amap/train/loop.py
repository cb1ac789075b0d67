"""The update loop and its pieces: AMP, timm's optimizer/scheduler/loss factories, the training state, one epoch of
updates (:func:`train_one_epoch`) and evaluation (:func:`evaluate`), used by :func:`amap.train.train` and by the
pruning pipeline's fine-tune alike.

Exact resume: before every update the trainer-side RNGs (dropout, drop-path, mixup/cutmix) are seeded from
``(seed, rank, step)``, so the update at step ``k`` does not depend on how the run got there.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad
from tqdm.auto import tqdm

from ..data import seed_rng
from ..errors import AmapError, ConfigError
from ..utils.distributed import DistInfo, all_reduce_sum, unwrap_model
from ..utils.interrupt import stop_requested
from ..utils.outputs import logits_of
from .config import TrainConfig

__all__ = [
    'TrainState', 'LossFn', 'amp_enabled', 'amp_dtype', 'autocast', 'make_scaler', 'build_optimizer',
    'build_scheduler', 'build_criterion', 'build_train_state', 'default_loss_fn', 'evaluate', 'train_one_epoch',
]


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


def autocast(device: torch.device, enabled: bool) -> Any:
    """``torch.autocast`` in the AMP dtype of ``device`` (see :func:`amp_dtype`), or a no-op when not ``enabled``."""
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


def build_train_state(model: nn.Module, cfg: TrainConfig, *, updates_per_epoch: int, info: DistInfo) -> TrainState:
    """A fresh :class:`TrainState` for ``model``: moved to ``info.device``, with the optimizer, the per-update
    scheduler and the AMP scaler of ``cfg``, wrapped in DistributedDataParallel under DDP.

    Raises:
        ConfigError: an invalid optimizer, scheduler or AMP setting.
    """
    device = info.device
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch=updates_per_epoch)
    scaler = make_scaler(device, amp_enabled(cfg.amp, device))
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    return TrainState(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)


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
            with autocast(device, use_amp):
                logits = logits_of(model(images))
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
        logits = logits_of(model(images))
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
        num_batches: How many batches ``batches`` yields (a trailing incomplete group of ``accum_steps`` is unused).
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
    state.model.train()
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
            batch = next(it)  # loaded before seeding: in-process data loading must not see the trainer's seed
            micro = i % accum_steps
            if micro == 0:
                seed_rng(seed, rank, state.step)
            images, targets, hard = _to_device(batch, device, mixup_fn)
            last = micro == accum_steps - 1
            loss, logits = _backward(state, images, targets, compute_loss=compute_loss, device=device, amp=amp,
                                     accum_steps=accum_steps, sync=last)
            window.add(loss, logits, hard)
            state.batch_in_epoch += 1
            bar.update(1)
            if not last:
                continue
            _optimizer_step(state, clip_grad)
            if _finish_update(state, window, bar, log_every=log_every, on_log=on_log, on_update=on_update):
                finished = False
                break
    finally:
        bar.close()
    return finished


def _to_device(batch: Any, device: torch.device, mixup_fn: Callable | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """``(images, targets, hard labels)`` of a batch on ``device``; ``targets`` are mixed when ``mixup_fn`` is set."""
    images, targets = batch
    images = images.to(device, non_blocking=True)
    hard = targets = targets.to(device, non_blocking=True)
    if mixup_fn is not None:
        images, targets = mixup_fn(images, targets)
    return images, targets, hard


def _finish_update(state: TrainState, window: _Window, bar: Any, *, log_every: int,
                   on_log: Callable[[TrainState, dict[str, float]], None] | None,
                   on_update: Callable[[TrainState], None] | None) -> bool:
    """Count the update, step the schedule, log, call back; True when a stop request ends the epoch here."""
    state.step += 1
    if state.scheduler is not None:
        state.scheduler.step_update(num_updates=state.step)
    if log_every and on_log is not None and state.step % log_every == 0:
        on_log(state, _log_metrics(state, window, bar))
    if on_update is not None:
        on_update(state)
    if stop_requested():
        state.stopped = True
    return state.stopped


def _backward(state: TrainState, images: torch.Tensor, targets: torch.Tensor, *, compute_loss: LossFn,
              device: torch.device, amp: bool, accum_steps: int, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch (gradients synchronised under DDP only when ``sync``)."""
    model = state.model
    no_sync = not sync and isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with autocast(device, amp):
            loss, logits = compute_loss(model, images, targets)
        if not torch.isfinite(loss):
            raise AmapError(f'non-finite loss {loss.item()} at step {state.step}; lower the learning rate '
                            f'(--lr), clip gradients (--clip-grad) or turn AMP off (--amp off)')
        scaled = loss / accum_steps
        if state.scaler is not None and state.scaler.is_enabled():
            state.scaler.scale(scaled).backward()
        else:
            scaled.backward()
    return loss, logits


def _log_metrics(state: TrainState, window: _Window, bar: Any) -> dict[str, float]:
    """The window's metrics (reduced over ranks) with the learning rate, also shown on the progress bar."""
    metrics = window.read()
    metrics['lr'] = state.optimizer.param_groups[0]['lr']
    bar.set_postfix(loss=f'{metrics["loss"]:.3f}', acc=f'{metrics["top1"]:.1f}',
                    img_s=f'{metrics["images_per_s"]:.0f}', refresh=False)
    return metrics


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
