"""A whole training job (:func:`train`): output folder, data, model, epochs, evaluation, log and model file.

Files in ``out_dir`` (written by rank 0 only, atomically, no pickle):

* ``model.safetensors`` + ``model.json`` -- the weights after the last finished epoch (or the last step of a
  ``max_steps`` run) with their description (:mod:`amap.train.artifact`);
* ``checkpoints/step_<N>/`` + ``checkpoints/latest.json`` -- resumable checkpoints (:mod:`amap.train.state`); the
  newest ``keep_checkpoints`` folders are kept;
* ``log.jsonl`` -- one JSON record per logged step (``"event": "train"``) and per evaluation (``"event": "eval"``).

Exact resume: the data order and augmentations of epoch ``e`` are a function of ``(seed, e)`` (see
:mod:`amap.data`), the already-done batches of a partial epoch are skipped by the sampler without decoding, and the
trainer-side randomness is re-seeded before every update from ``(seed, rank, step)``. A run resumed from the
checkpoint at step ``k`` therefore ends with the same weights as an uninterrupted one (bitwise on CPU).
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..data import DataBundle, build_loaders
from ..errors import ConfigError, Interrupted
from ..utils.distributed import DistInfo, barrier, cleanup_distributed, init_distributed
from ..utils.interrupt import graceful_stop, stop_reason
from ..utils.io import JsonlWriter, output_error, remove_dir, remove_stale_temps
from ..utils.runfolder import begin_run, run_lock
from .artifact import MODEL_FILE, MODEL_META_FILE, save_trained
from .config import TrainConfig
from .epochs import EpochLoop
from .factory import create_model
from .loop import TrainState, amp_dtype, amp_enabled, build_criterion, build_train_state, default_loss_fn, evaluate
from .state import CHECKPOINT_DIR, LATEST, latest_train_state, rank0_writes

__all__ = ['LOG_FILE', 'TrainResult', 'train']

_logger = logging.getLogger(__name__)

LOG_FILE = 'log.jsonl'
OWNED_NAMES = (MODEL_FILE, MODEL_META_FILE, CHECKPOINT_DIR, LOG_FILE)
"""Every name ``amap train`` writes in its run folder (see :mod:`amap.utils.runfolder`)."""


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
    cfg.check()
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
        previous = [p for p in (out / CHECKPOINT_DIR / LATEST, out / MODEL_FILE) if p.exists()]
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


def _train(cfg: TrainConfig, info: DistInfo, on_update: Callable[[TrainState], None] | None) -> TrainResult:
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    begin_run(out, command='train', names=OWNED_NAMES, resume=cfg.resume is True, overwrite=cfg.overwrite,  # run folder
              resumable=cfg.resume is not True or latest_train_state(out) is not None, info=info)
    resume_from = _prepare_out_dir(cfg, out, info)
    data = build_loaders(dataclasses.replace(cfg.data, label_smoothing=cfg.smoothing), distributed=info.distributed,
                         seed=cfg.seed)
    if data.steps_per_epoch < cfg.accum_steps:
        raise ConfigError(f'accum_steps={cfg.accum_steps} exceeds the {data.steps_per_epoch} batches of an epoch; '
                          f'lower it or the batch size')
    torch.manual_seed(cfg.seed)  # identical initialisation on every rank (DDP also broadcasts rank 0's weights)
    model, create_kwargs = create_model(cfg.model, num_classes=data.num_classes, img_size=cfg.data.img_size,
                                        model_kwargs=cfg.model_kwargs)
    state = build_train_state(model, cfg, updates_per_epoch=data.steps_per_epoch // cfg.accum_steps, info=info)
    job = _Job(cfg, info, data, state, out, create_kwargs)
    loop = EpochLoop(
        state, data, epochs=cfg.epochs, ckpt_dir=out / CHECKPOINT_DIR, info=info, amp=amp_enabled(cfg.amp, info.device),
        compute_loss=default_loss_fn(build_criterion(mixup=data.mixup_fn is not None, label_smoothing=cfg.smoothing)),
        clip_grad=cfg.clip_grad, accum_steps=cfg.accum_steps, seed=cfg.seed, max_steps=cfg.max_steps,
        checkpoint_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints, extra={'config': cfg.to_dict()},
        log_every=cfg.log_every, on_log=job.on_log, on_update=on_update, progress=job.show)
    if resume_from is not None:
        doc = loop.resume(resume_from)
        cfg.check_resume(doc.get('config') or {}, resume_from)
    resumed_from = state.step if resume_from is not None else None
    try:
        job.start(resumed=resumed_from is not None)
        metrics = loop.run(job.end_of_epoch)
        if metrics is None:  # stopped mid-epoch, or resumed a finished run: evaluate the final weights
            metrics = job.evaluate()
            job.write_model(metrics)
    except Interrupted:
        job.log.write({'event': 'interrupted', 'step': state.step, 'signal': stop_reason(), 'time': time.time()})
        raise
    finally:
        job.log.close()
    epochs_done = state.epoch + state.batch_in_epoch / max(data.steps_per_epoch, 1)
    return TrainResult(model=state.module.eval(), out_dir=out, model_path=out / MODEL_FILE, metrics=metrics,
                       best_top1=state.best_top1, steps=state.step, epochs=epochs_done,
                       seconds=time.perf_counter() - t0, history=list(state.history), resumed_from=resumed_from)


class _Job:
    """The job's own work around the epochs: its log, evaluations and model file."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, data: DataBundle, state: TrainState, out: Path,
                 create_kwargs: Mapping[str, Any]) -> None:
        self.cfg, self.info, self.data, self.state, self.out = cfg, info, data, state, out
        self.create_kwargs = dict(create_kwargs)
        self.log = JsonlWriter(out / LOG_FILE, enabled=False)  # opened by start()
        self.show = cfg.progress and info.is_main and sys.stderr.isatty()

    def _epoch(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / self.data.steps_per_epoch

    def start(self, *, resumed: bool) -> None:
        """Open the log and record the start (or resume) of the run."""
        if not self.info.is_main:
            return
        self.log = JsonlWriter(self.out / LOG_FILE)
        cfg, info, data, state = self.cfg, self.info, self.data, self.state
        n_params = sum(p.numel() for p in state.module.parameters())
        use_amp = amp_enabled(cfg.amp, info.device)
        _logger.info('%s: %.2fM parameters, %d classes, %d training / %d validation images, %d updates per epoch, '
                     'device %s%s%s', cfg.model, n_params / 1e6, data.num_classes, data.train_size, data.val_size,
                     data.steps_per_epoch // cfg.accum_steps, info.device,
                     f' x{info.world_size}' if info.distributed else '',
                     ', AMP' if use_amp else '')
        # where this segment of the run ran (the config's 'auto' resolved): a run resumed elsewhere says so
        self.log.write({'event': 'resume' if resumed else 'start', 'step': state.step, 'epoch': state.epoch,
                        'time': time.time(), 'world_size': info.world_size, 'params': n_params,
                        'device': str(info.device), 'amp_dtype': str(amp_dtype(info.device)).removeprefix('torch.')
                        if use_amp else None, 'config': cfg.to_dict()})

    def on_log(self, st: TrainState, metrics: dict[str, float]) -> None:
        self.log.write({'event': 'train', 'step': st.step, 'epoch': self._epoch(), **metrics, 'time': time.time()})
        if self.info.is_main and not self.show:
            _logger.info('epoch %d step %d: loss %.4f, train acc %.1f%%, lr %.2e, %.0f img/s', st.epoch + 1, st.step,
                         metrics['loss'], metrics['top1'], metrics['lr'], metrics['images_per_s'])

    def evaluate(self) -> dict[str, float]:
        state = self.state
        metrics = evaluate(state.model, self.data.val_loader, device=self.info.device, amp=self.cfg.amp,
                           progress=self.show, desc=f'eval {state.epoch}')
        if not (state.best_top1 >= metrics['top1']):  # also replaces NaN
            state.best_top1 = metrics['top1']
        record = {'event': 'eval', 'step': state.step, 'epoch': self._epoch(), **metrics}
        state.history.append(record)
        self.log.write({**record, 'time': time.time()})
        if self.info.is_main:
            _logger.info('epoch %g step %d: val top-1 %.2f%%, top-5 %.2f%%, loss %.4f (%d images, %.0f img/s)',
                         round(record['epoch'], 2), state.step, metrics['top1'], metrics['top5'], metrics['loss'],
                         metrics['images'], metrics['images_per_s'])
        return metrics

    def write_model(self, metrics: Mapping[str, Any] | None) -> None:
        cfg, data, state = self.cfg, self.data, self.state
        meta = {
            'model': cfg.model, 'model_kwargs': self.create_kwargs, 'num_classes': data.num_classes,
            'img_size': cfg.data.img_size, 'mean': list(data.mean), 'std': list(data.std),
            'interpolation': cfg.data.interpolation, 'class_names': list(data.class_names), 'data': str(cfg.data.data),
            'epoch': state.epoch, 'step': state.step, 'metrics': dict(metrics or {}), 'best_top1': state.best_top1,
        }
        with rank0_writes(f'model {self.out / MODEL_FILE}'):
            if self.info.is_main:
                save_trained(self.out / MODEL_FILE, state.module, meta)
                remove_stale_temps(self.out)

    def end_of_epoch(self) -> dict[str, float] | None:
        """Evaluate when due (every ``eval_every`` epochs and after the last), then write the model file."""
        cfg, state = self.cfg, self.state
        metrics = None
        if (cfg.eval_every and state.epoch % cfg.eval_every == 0) or state.epoch == cfg.epochs:
            metrics = self.evaluate()
        self.write_model(metrics if metrics is not None else (state.history[-1] if state.history else None))
        return metrics
