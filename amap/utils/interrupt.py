"""Graceful stop on SIGINT/SIGTERM: finish the current step, write a checkpoint, exit cleanly.

Long loops (training, search, fine-tuning) run inside :func:`graceful_stop`. The first Ctrl-C (or SIGTERM, which
schedulers send before killing a job) only sets a flag; the loop notices it at the next step boundary through
:func:`stop_requested`, writes its checkpoint and raises :class:`~amap.errors.Interrupted`, which the CLI prints as
one line (exit code 130) naming the checkpoint and the ``--resume`` command. A second signal interrupts at once
(``KeyboardInterrupt``), for a user who does not want to wait for the step to end.

Under DDP every rank receives the signal, but not necessarily between the same two steps, so
:func:`stop_requested` takes the ranks' maximum: all ranks stop after the same step and checkpoint together.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ['graceful_stop', 'request_stop', 'stop_requested']

_reason = {'why': ''}  # what asked for the stop ('SIGINT', ...); empty while none did


def request_stop(reason: str = 'stop requested') -> None:
    """Ask the running loop to checkpoint and stop at its next step boundary (what the first SIGINT does)."""
    _reason['why'] = reason or 'stop requested'


def stop_requested(*, synchronize: bool = True) -> bool:
    """Whether a stop was requested; under an initialised process group, whether any rank was asked to stop.

    Args:
        synchronize: Agree across DDP ranks (a collective: every rank must call it at the same step).
    """
    stop = bool(_reason['why'])
    if synchronize and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        backend = dist.get_backend()
        device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
    return stop


def stop_reason() -> str:
    """What asked for the stop (e.g. ``'SIGINT'``); empty when none did."""
    return _reason['why']


@contextlib.contextmanager
def graceful_stop(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Install the step-boundary stop handlers for the duration of the block, then restore the previous ones.

    Outside the main thread (where Python cannot install signal handlers) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if _reason['why']:
            raise KeyboardInterrupt
        request_stop(signal.Signals(signum).name)

    _reason['why'] = ''
    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _reason['why'] = ''
