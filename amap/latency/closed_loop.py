"""The closed loop of a latency target: measure the structure the target guarantee chose, cut, against the unpruned
model at the target batch; when its ratio is off the target by more than :data:`CLOSE` (or the measurement's noise),
correct the target by the model's error -- the predicted / measured ratio after one check, then the secant through the
checks around the goal -- and select again (no retraining): tighter when the model was optimistic, looser when it was
pessimistic (a faster model than asked costs accuracy), at most
:data:`MAX_RESELECT` times, and only while that selects a structure not measured yet. The structure kept is the
least pruned one measured within the target (within its noise), else the fastest one measured.

Ratios are compared, not milliseconds: the unpruned model is timed again beside the cut one, so a machine that got
slower or faster since the calibration does not count as a miss.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..prune.pruner import Pruner
from ..prune.surgery import apply_surgery
from .calibrate import TOLERANCE
from .measure import Backend, LatencyWarning, interleaved, low_percentile, make_backend, split_half, torch_threads
from .model import LatencyModel

__all__ = ['MAX_RESELECT', 'CLOSE', 'cut_copy', 'measure_cut', 'close_loop']

MAX_RESELECT = 2
CLOSE = 0.02  # a measured ratio that meets the target and is within 2% below it (or the noise) is not re-selected
RETIME = 2  # a check noisier than TOLERANCE is timed again (twice the rounds) at most this often; the quietest counts


def cut_copy(pruner: Pruner) -> nn.Module:
    """The model the pruner's current (fixed) structure cuts to, as a copy: the pruner and its model are unchanged."""
    model = pruner.model[0]
    pruner.detach()
    try:
        return apply_surgery(pruner, into=copy.deepcopy(model))
    finally:
        pruner.attach()


def measure_cut(pruner: Pruner, *, batch: int, backend: Backend, threads: int, rounds: int,
                seed: int = 0, cache: dict[str, Any] | None = None) -> tuple[float, float, float]:
    """``(unpruned ms, cut ms, split-half noise)`` of the pruner's model and its current structure, interleaved.

    ``cache``: a dict kept between calls of one closed loop; the unpruned model's runner (for onnxruntime, its
    export, the slow part of a check) and input are built once into it and reused, and so is the cut model's runner
    while the structure is the same (a noisy check timed again).
    """
    model = pruner.model[0]
    cache = {} if cache is None else cache
    structure = tuple((k, tuple(v.flatten().tolist())) for k, v in sorted(pruner.hard_counts().items()))
    if cache.get('cut_structure') != structure:
        cache.pop('cut', None)
    small = None if 'cut' in cache else cut_copy(pruner).eval()
    p = next(model.parameters())
    x = cache.setdefault('input', torch.randn(batch, *pruner.input_size, device=p.device, dtype=p.dtype))
    was_training = model.training
    pruner.detach()
    model.eval()
    try:
        with torch_threads(threads):
            if 'full' not in cache:
                cache['full'] = backend.runner(model, (x,), {})
            if small is not None:
                cache['cut'], cache['cut_structure'] = backend.runner(small, (x,), {}), structure
            runners = [cache['full'], cache['cut']]
            times = interleaved(runners, backend, rounds=rounds, seed=seed)
    finally:
        model.train(was_training)
        pruner.attach()
    return 1e3 * low_percentile(times[0]), 1e3 * low_percentile(times[1]), split_half(times)


def _quietest_check(pruner: Pruner, *, rounds: int, seed: int, **kwargs: Any) -> tuple[float, float, float]:
    """:func:`measure_cut`, timed again with twice the rounds while its split-half noise is above ``TOLERANCE`` (at
    most :data:`RETIME` more times): the quietest measurement counts, so one disturbed check neither passes a miss as
    "met within the noise" nor re-selects a structure that met the target."""
    best = measure_cut(pruner, rounds=rounds, seed=seed, **kwargs)
    for extra in range(1, RETIME + 1):
        if best[2] <= TOLERANCE:
            break
        again = measure_cut(pruner, rounds=2 * rounds, seed=seed + 1000 * extra, **kwargs)
        best = min(best, again, key=lambda m: m[2])
    return best


def _next_target(attempts: list[dict[str, Any]], goal: float) -> float:
    """The predicted ratio to select next so that the measured ratio lands on ``goal``.

    Not bracketed yet (every attempt measured on one side of the goal): the predicted ratio of the attempt measured
    closest to the goal, scaled by the model's error there (``goal * predicted / measured``). Bracketed: the secant
    through the two attempts closest to the goal on either side of it, on the curve measured ratio against predicted
    ratio -- the model's error changes with the structure (FLatten-Swin-T at batch 32 measured 17% faster than
    predicted at 0.62, so scaling by that error overshot the other way). The secant is never extrapolated: two
    noisy checks on one side of the goal gave a slope that jumped from a predicted 0.67 to 0.45 for a goal of 0.77.
    """
    closest = min(reversed(attempts), key=lambda a: abs(a['measured_ratio'] - goal))  # a tie: the latest
    scaled = goal * closest['predicted_ratio'] / closest['measured_ratio']
    below = [a for a in attempts if a['measured_ratio'] <= goal]
    above = [a for a in attempts if a['measured_ratio'] > goal]
    if not (below and above):
        return scaled
    a, b = max(below, key=lambda a: a['measured_ratio']), min(above, key=lambda a: a['measured_ratio'])
    dm, dp = b['measured_ratio'] - a['measured_ratio'], b['predicted_ratio'] - a['predicted_ratio']
    if abs(dm) < 1e-9 or dm * dp <= 0:  # no usable slope (the same latency, or timings out of order)
        return scaled
    return a['predicted_ratio'] + (goal - a['measured_ratio']) * dp / dm


def _verdict(attempts: list[dict[str, Any]], goal: float) -> tuple[int, str]:
    """The attempt to keep (the slowest that meets ``goal`` within its noise, else the fastest) and what it says."""
    meeting = [i for i, a in enumerate(attempts) if a['measured_ratio'] <= goal * (1 + a['noise'])]
    best = max(meeting, key=lambda i: attempts[i]['measured_ratio']) if meeting else \
        min(range(len(attempts)), key=lambda i: attempts[i]['measured_ratio'])
    kept = attempts[best]
    if kept['measured_ratio'] <= goal:
        return best, 'met'
    if best in meeting:
        return best, f'met within the measurement noise ({kept["noise"]:.1%})'
    return best, f'missed after {len(attempts) - 1} re-selection(s)'


def close_loop(
        pruner: Pruner,
        target: float,
        select: Callable[[float | None, dict[str, Tensor] | None], None],
        *,
        batch: int,
        threads: int,
        backend: str | Backend = 'eager',
        rounds: int = 10,
        seed: int = 0,
) -> dict[str, Any]:
    """Check the selected structure on the device and re-select while it is off the target; returns the numbers.

    Args:
        pruner: The pruner, its structure fixed by the target guarantee; ``pruner.resource`` a :class:`LatencyModel`.
        target: The latency target (ms per batch, in the calibration's time).
        select: ``select(target_ms, None)`` fixes the structure the target guarantee selects for another target;
            ``select(None, counts)`` fixes given kept counts again (an earlier attempt's).
        batch, threads, backend: As calibrated.
        rounds: Timed rounds of each check.
        seed: Seed of the random orders.

    Returns:
        ``{'target_ms', 'target_ratio', 'predicted_before_ms', 'predicted_after_ms', 'measured_before_ms',
        'measured_after_ms', 'predicted_ratio', 'measured_ratio', 'speedup_target', 'speedup_measured', 'noise',
        'attempts', 'verdict', ...}`` (the ``_ms`` figures are per batch of ``batch``; ratios are pruned / unpruned,
        both timed in the same check).
    """
    lat = pruner.resource
    if not isinstance(lat, LatencyModel):
        raise TypeError('close_loop needs a pruner whose resource is a LatencyModel')
    p = next(pruner.model[0].parameters())
    timer = backend if isinstance(backend, Backend) else make_backend(backend, p.device, threads)
    goal = target / lat.full
    attempts: list[dict[str, Any]] = []
    structures: list[dict[str, Tensor]] = []
    current = target
    cache: dict[str, Any] = {}  # the unpruned model's runner (its ONNX export), built once
    for attempt in range(MAX_RESELECT + 1):
        counts = pruner.hard_counts()
        predicted = float(pruner.cost(counts, exact=True))
        full_ms, cut_ms, noise = _quietest_check(pruner, batch=batch, backend=timer, threads=threads, rounds=rounds,
                                                 seed=seed + attempt, cache=cache)
        ratio = cut_ms / full_ms
        attempts.append({'target_ms': current, 'predicted_ms': predicted, 'predicted_ratio': predicted / lat.full,
                         'measured_before_ms': full_ms, 'measured_after_ms': cut_ms, 'measured_ratio': ratio,
                         'noise': noise, 'macs': pruner.hard_macs()})
        structures.append(counts)
        meets = ratio <= goal * (1 + noise)  # as the verdict judges it: over the goal only within the noise
        if (meets and ratio >= goal * (1 - max(CLOSE, noise))) or attempt == MAX_RESELECT:
            break
        current = _next_target(attempts, goal) * lat.full
        try:
            select(current, None)
        except ConfigError:  # tighter than the smallest structure the constraints allow
            break
        if any(all(torch.equal(c, s[k]) for k, c in pruner.hard_counts().items()) for s in structures):
            break  # the corrected target selects a structure already measured
    best, verdict = _verdict(attempts, goal)
    if best != len(attempts) - 1:
        select(None, structures[best])
    kept = attempts[best]
    noise = max(lat.noise, kept['noise'])
    if noise > TOLERANCE:
        verdict += f'; the device is too noisy to promise a number (timings disagree by {noise:.1%})'
    if not verdict.startswith('met') or noise > TOLERANCE:
        warnings.warn(f'latency target {goal:.3f} of the unpruned model at batch {batch}: measured '
                      f'{kept["measured_ratio"]:.3f}, {verdict}', LatencyWarning, stacklevel=2)
    return {'batch': batch, 'threads': threads, 'backend': timer.name, 'device_type': timer.device.type,
            'target_ms': target, 'target_ratio': goal,
            'speedup_target': 1 / goal, 'predicted_before_ms': lat.full, 'predicted_after_ms': kept['predicted_ms'],
            'predicted_ratio': kept['predicted_ratio'], 'measured_before_ms': kept['measured_before_ms'],
            'measured_after_ms': kept['measured_after_ms'], 'measured_ratio': kept['measured_ratio'],
            'speedup_measured': 1 / kept['measured_ratio'], 'noise': kept['noise'], 'step': lat.step,
            'calibration': lat.meta, 'attempts': attempts, 'kept_attempt': best, 'verdict': verdict}
