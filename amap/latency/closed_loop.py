"""The closed loop of a latency target: measure the structure the target guarantee chose, cut, against the unpruned
model at the target batch; when it misses the target by more than the measurement's noise, tighten the target by
the miss and select again (no retraining), at most :data:`MAX_RESELECT` times.

Ratios are compared, not milliseconds: the unpruned model is timed again beside the cut one, so a machine that got
slower or faster since the calibration does not count as a miss.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..prune.pruner import Pruner
from ..prune.surgery import apply_surgery
from .calibrate import TOLERANCE
from .measure import Backend, interleaved, low_percentile, make_backend, split_half, torch_threads
from .model import LatencyModel

__all__ = ['MAX_RESELECT', 'cut_copy', 'measure_cut', 'close_loop']

MAX_RESELECT = 2


def cut_copy(pruner: Pruner) -> nn.Module:
    """The model the pruner's current (fixed) structure cuts to, as a copy: the pruner and its model are unchanged."""
    model = pruner.model[0]
    pruner.detach()
    try:
        return apply_surgery(pruner, into=copy.deepcopy(model))
    finally:
        pruner.attach()


def measure_cut(pruner: Pruner, *, batch: int, backend: Backend, threads: int, rounds: int,
                seed: int = 0) -> tuple[float, float, float]:
    """``(unpruned ms, cut ms, split-half noise)`` of the pruner's model and its current structure, interleaved."""
    model = pruner.model[0]
    small = cut_copy(pruner).eval()
    p = next(model.parameters())
    x = torch.randn(batch, *pruner.input_size, device=p.device, dtype=p.dtype)
    was_training = model.training
    pruner.detach()
    model.eval()
    try:
        with torch_threads(threads):
            runners = [backend.runner(model, (x,), {}), backend.runner(small, (x,), {})]
            times = interleaved(runners, backend, rounds=rounds, seed=seed)
    finally:
        model.train(was_training)
        pruner.attach()
    return 1e3 * low_percentile(times[0]), 1e3 * low_percentile(times[1]), split_half(times)


def close_loop(
        pruner: Pruner,
        target: float,
        reselect: Callable[[float], None],
        *,
        batch: int,
        threads: int,
        backend: str | Backend = 'eager',
        rounds: int = 10,
        seed: int = 0,
) -> dict[str, Any]:
    """Check the selected structure on the device and tighten it while it misses; returns the report's numbers.

    Args:
        pruner: The pruner, its structure fixed by the target guarantee; ``pruner.resource`` a :class:`LatencyModel`.
        target: The latency target (ms per batch, in the calibration's time).
        reselect: Selects a structure again for a tighter target (ms), fixing it in the pruner.
        batch, threads, backend: As calibrated.
        rounds: Timed rounds of each check.
        seed: Seed of the random orders.

    Returns:
        ``{'target_ms', 'target_ratio', 'predicted_before_ms', 'predicted_after_ms', 'measured_before_ms',
        'measured_after_ms', 'predicted_ratio', 'measured_ratio', 'speedup_target', 'speedup_measured', 'noise',
        'attempts', 'verdict', ...}`` (the ``_ms`` figures are per batch of ``batch``).
    """
    lat = pruner.resource
    if not isinstance(lat, LatencyModel):
        raise TypeError('close_loop needs a pruner whose resource is a LatencyModel')
    p = next(pruner.model[0].parameters())
    timer = backend if isinstance(backend, Backend) else make_backend(backend, p.device, threads)
    goal = target / lat.full
    attempts: list[dict[str, Any]] = []
    current = target
    verdict = ''
    for attempt in range(MAX_RESELECT + 1):
        predicted = float(pruner.cost(pruner.hard_counts(), exact=True))
        full_ms, cut_ms, noise = measure_cut(pruner, batch=batch, backend=timer, threads=threads, rounds=rounds,
                                             seed=seed + attempt)
        ratio = cut_ms / full_ms
        attempts.append({'target_ms': current, 'predicted_ms': predicted, 'predicted_ratio': predicted / lat.full,
                         'measured_before_ms': full_ms, 'measured_after_ms': cut_ms, 'measured_ratio': ratio,
                         'noise': noise, 'macs': pruner.hard_macs()})
        if ratio <= goal:
            verdict = 'met'
            break
        if ratio <= goal * (1 + noise):
            verdict = f'met within the measurement noise ({noise:.1%})'
            break
        if attempt == MAX_RESELECT:
            verdict = f'missed after {MAX_RESELECT} re-selections'
            break
        current = current * goal / ratio
        try:
            reselect(current)
        except ConfigError:
            verdict = 'missed: the smallest structure the constraints allow is not fast enough'
            break
    last = attempts[-1]
    noisy = max(lat.noise, last['noise']) > TOLERANCE
    if noisy:
        verdict += (f'; the device is too noisy to promise a number (timings disagree by '
                    f'{max(lat.noise, last["noise"]):.1%})')
    if not verdict.startswith('met') or noisy:
        warnings.warn(f'latency target {goal:.3f} of the unpruned model at batch {batch}: measured '
                      f'{last["measured_ratio"]:.3f}, {verdict}', stacklevel=2)
    return {'batch': batch, 'threads': threads, 'backend': timer.name, 'target_ms': target, 'target_ratio': goal,
            'speedup_target': 1 / goal, 'predicted_before_ms': lat.full, 'predicted_after_ms': last['predicted_ms'],
            'predicted_ratio': last['predicted_ratio'], 'measured_before_ms': last['measured_before_ms'],
            'measured_after_ms': last['measured_after_ms'], 'measured_ratio': last['measured_ratio'],
            'speedup_measured': 1 / last['measured_ratio'], 'noise': last['noise'], 'step': lat.step,
            'calibration': lat.meta, 'attempts': attempts, 'verdict': verdict}
