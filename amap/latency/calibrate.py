"""Calibrate a :class:`~amap.latency.model.LatencyModel` on the device the model will run on.

1. One forward pass at the target batch records each pruned module's inputs; modules of the same block shape
   (adapter and module type, parameter shapes, input shapes, pruned kinds) share one table.
2. The width step the device rewards is detected on an MLP: widths ``W0 - 2^j`` (``j = 0..5``, ``W0`` a multiple of
   64) are timed against the line through ``W0 - 64`` and ``W0``; the step is the power of two that best separates
   the penalised probes (above the line by the tolerance) from the others (:func:`detect_step`). Without an MLP
   wide enough to probe, the step is 8.
3. Each distinct shape's module is rebuilt (``Adapter.build``) at a grid of aligned per-head counts (up to 5 per axis
   for two axes, 9 for one, first and full count included) and timed with the whole model, in random-order
   interleaved rounds; each figure is a low percentile (p20) of its rounds. On a CPU the tables are timed at a
   batch of at most 8 (:data:`TABLE_BATCH`), and each shape's smallest and full widths at the target batch too: an
   affine map per shape carries its table to the target batch (memory-bound modules slow down by more than the
   batch ratio once their activations leave the caches, others by less). When the two halves of the rounds
   disagree by more than the tolerance, rounds are added (up to three times as many), then a warning says the
   device is too noisy.
4. The whole model is timed too, at the target batch, at full width and with every pruned module at its smallest
   and at its middle grid point: the tables are scaled so that the model is exact at the full and the smallest
   (modules timed alone find other caches than inside the model), the constant is the whole model minus its scaled
   modules at full width, and when the middle model departs from that straight line by more than the noise, the
   model's warp bends the prediction through it (a monotone piecewise linear map of the additive sum). On a GPU
   the tables are timed at the target batch. The whole model, seconds a call at a
   large batch, is timed in fewer rounds than the tables and without a warm-up round
   (:func:`~amap.latency.measure.interleaved`): a DeiT-S at batch 32 on one thread in 4 calls instead of 7, about
   28 s of CPU time for the whole calibration instead of 38.

The result is cached as JSON (``$AMAP_CACHE`` or ``~/.cache/amap``, ``latency/<key>.json``) under a key of the device,
backend, dtype, threads, batch and every shape (tokens and widths included): a second run on the same machine reuses
it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from itertools import product
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..prune.adapters import Adapter
from ..prune.pruner import Pruner
from ..prune.target import channel_step
from ..utils.io import atomic_write_json
from .measure import Backend, LatencyWarning, interleaved, low_percentile, make_backend, split_half, torch_threads
from .model import LatencyModel, OpTable

__all__ = ['calibrate_latency', 'detect_step', 'cache_dir', 'DEFAULT_STEP', 'TOLERANCE']

_logger = logging.getLogger(__name__)

DEFAULT_STEP = 8  # the width step assumed when no MLP is wide enough to probe
TABLE_BATCH = 8  # on a CPU the module tables are timed at most at this batch (latency is close to linear in batch)
TOLERANCE = 0.03  # split-half disagreement (and step penalty) above which a measurement is noisy (penalised)
PROBES = 6  # probe widths W0 - 2^j, j < PROBES
CACHE_VERSION = 3  # 2: the middle whole-model measurement and the warp; 3: per-shape batch maps


def cache_dir() -> Path:
    """Where calibrations are cached: ``$AMAP_CACHE/latency`` (default ``~/.cache/amap/latency``)."""
    return Path(os.environ.get('AMAP_CACHE') or Path.home() / '.cache' / 'amap') / 'latency'


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _shapes(value: Any) -> Any:
    if isinstance(value, Tensor):
        return list(value.shape)
    if isinstance(value, (tuple, list)):
        return [_shapes(v) for v in value]
    if isinstance(value, dict):
        return {k: _shapes(v) for k, v in sorted(value.items())}
    return repr(value)


class _Shape:
    """One distinct block shape: an adapter of it, its recorded inputs and its pruned axes."""

    def __init__(self, adapter: Adapter, args: tuple, kwargs: dict, kinds: list[str]) -> None:
        self.adapter, self.args, self.kwargs, self.kinds = adapter, args, kwargs, kinds
        groups = {g.kind: g for g in adapter.groups()}
        self.heads = [groups[k].num_heads for k in kinds]
        self.full = [groups[k].dim for k in kinds]

    def build(self, counts: tuple[int, ...]) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            m = self.adapter.build(dict(zip(self.kinds, counts)))
        p = next(self.adapter.module.parameters())
        return m.to(device=p.device, dtype=p.dtype).eval()


def _signature(adapter: Adapter, args: tuple, kwargs: dict, kinds: list[str]) -> dict[str, Any]:
    m = adapter.module
    return {'adapter': type(adapter).__name__, 'module': type(m).__name__,
            'params': [[n, list(p.shape)] for n, p in m.named_parameters()],
            'inputs': _shapes(list(args)), 'kwargs': _shapes(kwargs), 'kinds': kinds,
            'groups': [[g.kind, g.num_heads, g.dim] for g in adapter.groups()]}


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


@torch.no_grad()
def _record_shapes(pruner: Pruner, x: Tensor) -> tuple[dict[str, _Shape], dict[str, str], dict[str, Any]]:
    """Run the (ungated) model once; returns ``{key: shape}``, ``{module name: key}`` and the signatures."""
    model = pruner.model[0]
    pruned = {}
    for g in pruner.groups().values():
        pruned.setdefault(g.module, []).append(g.kind)
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for adapter in pruner.adapters:
        if adapter.name not in pruned:
            continue

        def hook(module: nn.Module, args: tuple, kwargs: dict, name: str = adapter.name) -> None:
            seen.setdefault(name, (_clone(args), _clone(kwargs)))
        handles.append(adapter.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    shapes: dict[str, _Shape] = {}
    modules: dict[str, str] = {}
    signatures: dict[str, Any] = {}
    for adapter in pruner.adapters:
        if adapter.name not in seen:
            continue
        kinds = [g.kind for g in adapter.groups() if g.kind in pruned[adapter.name]]
        args, kwargs = seen[adapter.name]
        sig = _signature(adapter, args, kwargs, kinds)
        key = _digest(sig, 12)
        if key not in shapes:
            shapes[key] = _Shape(adapter, args, kwargs, kinds)
            signatures[key] = sig
        modules[adapter.name] = key
    return shapes, modules, signatures


def _grid(full: int, step: int, points: int) -> list[int]:
    """Up to ``points`` per-head counts on the lattice of ``step`` (and the full count), evenly spread, ascending."""
    lattice = list(range(step, full, step)) + [full]
    if len(lattice) <= points:
        return lattice
    idx = sorted({round(i * (len(lattice) - 1) / (points - 1)) for i in range(points)})
    return [lattice[i] for i in idx]


def detect_step(widths: list[int], seconds: list[float], tolerance: float = TOLERANCE) -> int:
    """The width step the device rewards from timed probes.

    Args:
        widths: ``[W0 - 64, W0, W0 - 1, W0 - 2, ..., W0 - 2^(P-1)]`` with ``W0`` a multiple of 64.
        seconds: Their times.
        tolerance: Relative excess over the line through the first two that counts as a penalty.

    Returns:
        The power of two ``g`` (1 to 64) that best separates the probes: widths not a multiple of ``g`` penalised,
        multiples of ``g`` not (fewest probes on the wrong side; the smaller step on a tie).
    """
    (w_lo, w_hi), (t_lo, t_hi) = widths[:2], seconds[:2]
    penalised = []
    for w, t in zip(widths[2:], seconds[2:]):
        line = t_lo + (t_hi - t_lo) * (w - w_lo) / (w_hi - w_lo)
        penalised.append(t > line * (1 + tolerance))
    # probe j has width W0 - 2^j: a multiple of 2^j, not of 2^(j+1); a step g = 2^k should penalise exactly j < k
    errors = [sum(bad != (j < k) for j, bad in enumerate(penalised)) for k in range(len(penalised) + 1)]
    return 2 ** errors.index(min(errors))


def _probe_widths(shapes: dict[str, _Shape]) -> tuple[_Shape | None, list[int]]:
    """The MLP shape to probe and its widths (None when no MLP is wide enough)."""
    for shape in shapes.values():
        if shape.kinds == ['mlp'] and shape.full[0] >= 128:
            w0 = max(128, int(0.75 * shape.full[0]) // 64 * 64)
            return shape, [w0 - 64, w0] + [w0 - 2 ** j for j in range(PROBES)]
    return None, []


def _timed(runners: list[Callable], backend: Backend, rounds: int, seed: int, bar: Any) -> tuple[list[float], float]:
    """Low percentiles (s) of interleaved rounds, rounds added while the split halves disagree; and the noise."""
    times = interleaved(runners, backend, rounds=rounds, seed=seed, progress=bar.update)
    noise = split_half(times)
    extra = 0
    while noise > TOLERANCE and extra < 2 * rounds:
        bar.total += rounds * len(runners)
        times = interleaved(runners, backend, rounds=rounds, warmup=0, seed=seed, progress=bar.update, times=times)
        extra += rounds
        noise = split_half(times)
    return [low_percentile(t) for t in times], noise


def calibrate_latency(
        pruner: Pruner,
        *,
        batch: int = 1,
        threads: int = 1,
        backend: str | Backend = 'eager',
        rounds: int = 5,
        cache: bool = True,
        refresh: bool = False,
        progress: bool = True,
        seed: int = 0,
) -> LatencyModel:
    """Time the pruner's model on this device and build its :class:`LatencyModel` (or read it from the cache).

    Args:
        pruner: The pruner (its gates are lifted while timing and put back).
        batch: Batch size the latency is for.
        threads: Intra-op threads (torch, or the ONNX Runtime session).
        backend: ``'eager'`` (PyTorch; CUDA events on a GPU) or ``'onnxruntime'``, or a :class:`Backend`.
        rounds: Timed rounds (more are added when the split halves disagree).
        cache: Read and write the cache (:func:`cache_dir`).
        refresh: Time the model even when the cache has it, and replace the cached calibration (with ``cache``).
        progress: A progress bar (tqdm) on stderr.
        seed: Seed of the random orders.
    """
    from tqdm.auto import tqdm

    model = pruner.model[0]
    p = next(model.parameters())
    timer = backend if isinstance(backend, Backend) else make_backend(backend, p.device, threads)
    x = torch.randn(batch, *pruner.input_size, device=p.device, dtype=p.dtype)
    table_batch = batch if p.device.type == 'cuda' else min(batch, TABLE_BATCH)
    was_training = model.training
    pruner.detach()
    model.eval()
    try:
        shapes, modules, signatures = _record_shapes(pruner, x[:table_batch])
        key = {'version': CACHE_VERSION, 'device': _device_label(timer), 'backend': timer.name,
               'dtype': str(p.dtype), 'threads': threads, 'batch': batch, 'input': list(pruner.input_size),
               'model': type(model).__name__, 'params': _digest([list(q.shape) for q in model.parameters()]),
               'shapes': signatures, 'modules': modules}
        path = cache_dir() / f'{_digest(key, 24)}.json'
        if cache and not refresh and path.exists():
            try:
                data = json.loads(path.read_text())
                if data.get('key') == json.loads(json.dumps(key)):
                    lat = LatencyModel.from_dict(data['model'])
                    lat.meta['cached'] = str(path)
                    return lat
            except (OSError, ValueError, KeyError, TypeError):
                pass  # a broken cache file is recalibrated and replaced
        t0 = time.perf_counter()
        with torch_threads(threads), tqdm(total=0, desc='latency calibration', unit='run',
                                          disable=None if progress else True, leave=False) as bar:
            step, probe = _measure_step(shapes, timer, rounds, seed, bar)
            at_batch = _inputs_at_batch(pruner, x, modules) if table_batch < batch else {}
            lat = _measure_tables(model, x, shapes, modules, timer, rounds, seed, bar, step, table_batch, at_batch)
        lat.meta.update({'device': key['device'], 'backend': timer.name, 'threads': threads, 'batch': batch,
                         'table_batch': table_batch,
                         'dtype': str(p.dtype), 'rounds': rounds, 'seconds': time.perf_counter() - t0,
                         'step_probe': probe})
        if lat.noise > TOLERANCE:
            warnings.warn(f'latency calibration: the device is too noisy (the two halves of the rounds disagree by '
                          f'{lat.noise:.1%}); latency predictions may be off by as much', LatencyWarning, stacklevel=2)
        if cache:
            atomic_write_json(path, {'key': key, 'model': lat.to_dict()})
        return lat
    finally:
        model.train(was_training)
        pruner.attach()


def _device_label(timer: Backend) -> str:
    from .measure import device_name
    return device_name(timer.device)


def _measure_step(shapes: dict[str, _Shape], timer: Backend, rounds: int, seed: int,
                  bar: Any) -> tuple[int, dict[str, Any]]:
    shape, widths = _probe_widths(shapes)
    if shape is None:
        return DEFAULT_STEP, {'detected': False, 'reason': 'no MLP of 128 or more hidden units to probe'}
    runners = [timer.runner(shape.build((w,)), shape.args, shape.kwargs) for w in widths]
    bar.total += (rounds + 1) * len(runners)
    seconds, noise = _timed(runners, timer, rounds, seed, bar)
    step = detect_step(widths, seconds, max(TOLERANCE, 2 * noise))
    return step, {'detected': True, 'widths': widths, 'ms': [1e3 * s for s in seconds], 'noise': noise}


def _grid_index(grid: list[int], where: str) -> int:
    return 0 if where == 'smallest' else len(grid) // 2


def _cut_model(model: nn.Module, shapes: dict[str, _Shape], modules: dict[str, str], plans: dict[str, tuple],
               where: str) -> nn.Module:
    """A copy of ``model`` with every pruned module rebuilt at the ``'smallest'`` or ``'middle'`` counts of its
    table's grid."""
    cut = copy.deepcopy(model)
    for name, key in modules.items():
        grid = plans[key][0]
        cut.set_submodule(name, shapes[key].build(tuple(g[_grid_index(g, where)] for g in grid)), strict=True)
    return cut.eval()


def _warp(points: list[tuple[float, float]], noise: float) -> list[list[float]]:
    """Knots through ``(additive prediction, measured)`` whole-model points, ascending: the middle one is dropped
    when it breaks monotonicity or agrees with the straight line within the noise (no bend to learn)."""
    (p0, m0), (p1, m1), (p2, m2) = sorted(points)
    if not (p0 < p1 < p2 and m0 < m1 < m2):
        return []
    line = m0 + (m2 - m0) * (p1 - p0) / (p2 - p0)
    if abs(m1 - line) <= max(noise, 1e-9) * m1 and abs(m0 - p0) <= 1e-6 * m0 and abs(m2 - p2) <= 1e-6 * m2:
        return []
    return [[p0, m0], [p1, m1], [p2, m2]]


def _inputs_at_batch(pruner: Pruner, x: Tensor, modules: dict[str, str]) -> dict[str, tuple[tuple, dict]]:
    """``{shape key: (args, kwargs)}``: each distinct shape's recorded inputs at the whole batch of ``x``."""
    big, big_modules, _ = _record_shapes(pruner, x)
    return {key: (big[big_modules[name]].args, big[big_modules[name]].kwargs) for name, key in modules.items()}


def _batch_maps(tables: dict[str, Tensor], ends: dict[str, tuple[float, float]],
                expected: float) -> dict[str, tuple[float, float]]:
    """Per shape, ``(a, b)`` of the affine map ``a + b t`` from its table (timed at the table batch) to the target
    batch, through its smallest and full widths timed at both (``ends``: the target batch's times). Memory-bound
    modules whose activations leave the caches at the target batch scale by more than the batch ratio, others by
    less: one factor for every module mispredicts a cut model by up to 8% (FLatten-Swin-T at batch 32). A map that
    is not increasing, or far from the batch ratio, falls back to ``(0, expected)``."""
    maps = {}
    for key, (big_small, big_full) in ends.items():
        small, full = float(tables[key].flatten()[0]), float(tables[key].flatten()[-1])
        b = (big_full - big_small) / (full - small) if full > small and big_full > big_small else big_full / full
        ok = 0.25 < b / expected < 4 and 0.25 < big_full / (full * expected) < 4
        maps[key] = (big_full - b * full, b) if ok else (0.0, expected)
    return maps


def _measure_tables(model: nn.Module, x: Tensor, shapes: dict[str, _Shape], modules: dict[str, str],
                    timer: Backend, rounds: int, seed: int, bar: Any, step: int, table_batch: int,
                    at_batch: dict[str, tuple[tuple, dict]]) -> LatencyModel:
    plans: dict[str, tuple[list[list[int]], list[int], list[tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        steps = [channel_step(h, step) for h in shape.heads]
        grid = [_grid(f, s, 5 if len(shape.kinds) > 1 else 9) for f, s in zip(shape.full, steps)]
        plans[key] = (grid, steps, list(product(*grid)))
    runners = [timer.runner(model, (x,), {})]
    runners += [timer.runner(_cut_model(model, shapes, modules, plans, w), (x,), {}) for w in ('smallest', 'middle')]
    for key, (_, _, points) in plans.items():
        runners += [timer.runner(shapes[key].build(pt), shapes[key].args, shapes[key].kwargs) for pt in points]
    for key, (args, kwargs) in at_batch.items():  # each shape's ends at the target batch too
        runners += [timer.runner(shapes[key].build(pt), args, kwargs) for pt in (plans[key][2][0], plans[key][2][-1])]
    bar.total += (rounds + 1) * len(runners)
    seconds, noise = _timed(runners, timer, rounds, seed + 1, bar)
    ms = [1e3 * s for s in seconds]
    (full, small, middle), at = ms[:3], 3
    tables: dict[str, Tensor] = {}
    for key, (grid, _, points) in plans.items():
        tables[key] = torch.tensor(ms[at:at + len(points)], dtype=torch.float64).reshape([len(g) for g in grid])
        at += len(points)
    if not all(math.isfinite(v) for v in ms):
        raise RuntimeError('latency calibration measured a non-finite time')
    expected = x.shape[0] / table_batch  # tables timed at a smaller batch: about that much faster
    maps = _batch_maps(tables, {key: (ms[at + 2 * i], ms[at + 2 * i + 1]) for i, key in enumerate(at_batch)},
                       expected)
    for key, (a, b) in maps.items():  # the tables in the target batch's time
        tables[key] = a + b * tables[key]
    expected = 1.0 if maps else expected
    # modules timed alone run in other caches than inside the model: scale them so that the model is exact for the
    # whole model at full and at the smallest widths (the constant is what the rest costs)
    m_full = sum(float(tables[k].flatten()[-1]) for k in modules.values())
    m_small = sum(float(tables[k].flatten()[0]) for k in modules.values())
    scale = (full - small) / (m_full - m_small) if m_full > m_small else expected
    scaled = 0.25 < scale / expected < 4
    scale = scale if scaled else expected
    ops = {key: OpTable(kinds=shapes[key].kinds, full=shapes[key].full, steps=plans[key][1], grid=plans[key][0],
                        values=(scale * tables[key]).tolist()) for key in plans}
    constant = full - scale * m_full

    def additive(where: str) -> float:  # what the (monotone, scaled) tables predict for a cut model
        return constant + sum(float(ops[k]([torch.tensor(float(g[_grid_index(g, where)])) for g in plans[k][0]],
                                           exact=True)) for k in modules.values())

    # the whole model measured against the additive prediction at three widths: where a cut model runs faster (or
    # slower) than the sum of its modules (caches, at large batches), the warp bends the prediction through them
    points = [(additive('smallest'), small), (additive('middle'), middle), (full, full)]
    warp = _warp(points, noise)
    meta = {'noise': noise, 'points': len(runners), 'shapes': len(shapes), 'module_scale': scale,
            'batch_maps': {k: list(v) for k, v in maps.items()}, 'smallest_ms': small, 'middle_ms': middle,
            'middle_additive_ms': points[1][0], 'scaled': scaled}
    return LatencyModel(ops, modules, constant=constant, full=full, step=step, warp=warp, meta=meta)
