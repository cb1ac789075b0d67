"""The epochs of a training state with checkpoints and stop requests: what :func:`amap.train.train` and the pruning
pipeline's fine-tune both run (each adds its own end-of-epoch work: evaluation, logging, the model file)."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..data import DataBundle
from ..errors import Interrupted
from ..utils.distributed import DistInfo
from ..utils.interrupt import stop_reason
from .loop import LossFn, TrainState, train_one_epoch
from .state import load_train_state, save_train_state

__all__ = ['EpochLoop']

T = TypeVar('T')


@dataclass
class EpochLoop:
    """Runs the remaining epochs of ``state`` on ``data``'s training loader, checkpointing into ``ckpt_dir``.

    Every epoch starts where the state stands (the sampler skips the batches a resumed state already consumed), and
    a checkpoint is written at the end of every epoch, every ``checkpoint_every`` updates inside an epoch, and when
    ``max_steps`` or a stop request (SIGINT/SIGTERM) ends an epoch early; never twice for the same step.

    Attributes:
        state: The training state.
        data: The loaders (``train_loader``, ``train_sampler``, ``steps_per_epoch``, ``mixup_fn``).
        epochs: Epochs in total.
        compute_loss: ``(model, images, targets) -> (loss, logits)``.
        ckpt_dir: Checkpoint folder.
        info: Distributed info.
        amp: Autocast (and the state's scaler) on.
        clip_grad: Gradient-norm clipping value.
        accum_steps: Batches per optimizer update.
        seed: Run seed (trainer-side RNGs are seeded from it, the rank and the step).
        max_steps: Stop when ``state.step`` reaches this.
        checkpoint_every: Also checkpoint every this many updates inside an epoch (0: never).
        keep: Checkpoint folders to keep.
        extra: More JSON-able entries of every checkpoint (e.g. the config).
        log_every: Call ``on_log`` every this many updates (0: never).
        on_log: ``(state, metrics)`` (see :func:`~amap.train.loop.train_one_epoch`).
        on_update: Called on every rank after each update and any checkpoint at that step.
        progress: Show progress bars.
        desc: Progress-bar label (``'<desc> <epoch>/<epochs>'``).
        step_name: What the stop message calls a step (``'... at <step_name> <N>: checkpoint saved ...'``).
    """
    state: TrainState
    data: DataBundle
    epochs: int
    compute_loss: LossFn
    ckpt_dir: Path
    info: DistInfo
    amp: bool = False
    clip_grad: float | None = None
    accum_steps: int = 1
    seed: int = 0
    max_steps: int | None = None
    checkpoint_every: int = 0
    keep: int = 2
    extra: Mapping[str, Any] | None = None
    log_every: int = 0
    on_log: Callable[[TrainState, dict[str, float]], None] | None = None
    on_update: Callable[[TrainState], None] | None = None
    progress: bool = False
    desc: str = 'epoch'
    step_name: str = 'step'
    _saved_step: int | None = field(default=None, init=False, repr=False)

    def resume(self, folder: str | os.PathLike) -> dict[str, Any]:
        """Restore the state from a checkpoint folder (see :func:`~amap.train.state.load_train_state`); returns its
        document."""
        doc = load_train_state(folder, self.state, info=self.info)
        self._saved_step = self.state.step
        return doc

    def checkpoint(self) -> None:
        """Checkpoint the state unless this step is saved already (a collective under DDP)."""
        if self._saved_step == self.state.step:
            return
        save_train_state(self.ckpt_dir, self.state, extra=self.extra, keep=self.keep, info=self.info)
        self._saved_step = self.state.step

    def run(self, end_of_epoch: Callable[[], T]) -> T | None:
        """Train until ``epochs`` or ``max_steps``; after each finished epoch call ``end_of_epoch``, then checkpoint.

        Returns:
            What ``end_of_epoch`` returned for the last epoch, or None when the run ended inside an epoch
            (``max_steps``) or had nothing left to do.

        Raises:
            Interrupted: a stop request ended the epoch after a complete update; the checkpoint is saved.
        """
        state, data = self.state, self.data
        result = None
        while state.epoch < self.epochs and (self.max_steps is None or state.step < self.max_steps):
            result = None
            skip = state.batch_in_epoch
            data.train_sampler.set_epoch(state.epoch, skip=skip * data.train_loader.batch_size)
            finished = train_one_epoch(
                state, data.train_loader, num_batches=data.steps_per_epoch - skip, compute_loss=self.compute_loss,
                device=self.info.device, amp=self.amp, mixup_fn=data.mixup_fn, clip_grad=self.clip_grad,
                accum_steps=self.accum_steps, seed=self.seed, rank=self.info.rank, max_steps=self.max_steps,
                log_every=self.log_every, on_log=self.on_log, on_update=self._after_update, progress=self.progress,
                desc=f'{self.desc} {state.epoch + 1}/{self.epochs}')
            if not finished:
                self.checkpoint()  # stopped by max_steps or a signal in the middle of an epoch
                if state.stopped:
                    raise Interrupted(f'{stop_reason() or "stopped"} at {self.step_name} {state.step}: checkpoint '
                                      f'saved in {self.ckpt_dir}; continue with --resume (same --out)',
                                      checkpoint=str(self.ckpt_dir), step=state.step)
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            result = end_of_epoch()
            self.checkpoint()
        return result

    def _after_update(self, state: TrainState) -> None:
        usable = (self.data.steps_per_epoch // self.accum_steps) * self.accum_steps
        if self.checkpoint_every and state.step % self.checkpoint_every == 0 and state.batch_in_epoch < usable:
            self.checkpoint()
        if self.on_update is not None:
            self.on_update(state)

