"""Latency measurement: models side by side (:func:`measure_latency`) and the timing primitives of the latency
calibration (backends, interleaved random-order rounds, low percentiles, the split-half check).

Wall-clock speed swings between minutes on shared machines, so models are compared in one run, interleaved: every
round times each model once, and each model's figure is the median over rounds (warm-up rounds excluded).
"""
from __future__ import annotations

import copy
import functools
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ['measure_latency', 'LatencyWarning', 'BACKENDS', 'Backend', 'OnnxRuntimeBackend', 'make_backend',
           'interleaved', 'low_percentile', 'split_half', 'torch_threads', 'device_name']


class LatencyWarning(UserWarning):
    """A latency measurement or target the device's noise puts in doubt (printed as one line by the CLI)."""


@torch.no_grad()
def measure_latency(
        models: Mapping[str, nn.Module],
        input_size: Sequence[int],
        *,
        batch_sizes: Sequence[int] = (1, 32),
        rounds: int = 15,
        warmup: int = 3,
        device: str | torch.device = 'cpu',
) -> dict[str, dict[str, float]]:
    """Median latency (ms per batch) and throughput (images/s) of each model at each batch size.

    Each call is timed as :class:`Backend` times it: with one CPU thread as the process's CPU time (time slices other
    jobs take on a shared machine do not count), with more as wall time, on a GPU with CUDA events.

    Args:
        models: ``{name: model}``; put in eval mode, restored afterwards.
        input_size: ``(C, H, W)``.
        batch_sizes: Batch sizes to time.
        rounds: Timed rounds (each round runs every model once per batch size, interleaved).
        warmup: Untimed rounds first.
        device: Where to run.

    Returns:
        ``{name: {'b1_ms': ..., 'b1_images_per_s': ..., 'b32_ms': ..., ...}, '_meta': {'threads': n, ...}}``.
    """
    device = torch.device(device)
    timer = Backend(device, torch.get_num_threads())
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in batch_sizes}
    inputs = {b: torch.randn(b, *input_size, device=device) for b in batch_sizes}
    try:
        for r in range(warmup + rounds):
            for b in batch_sizes:
                for name, m in models.items():
                    t = timer.seconds(functools.partial(m, inputs[b]))
                    if r >= warmup:
                        times[(name, b)].append(t)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out: dict[str, dict[str, float]] = {}
    for (name, b), ts in times.items():
        med = statistics.median(ts)
        out.setdefault(name, {})[f'b{b}_ms'] = 1e3 * med
        out[name][f'b{b}_images_per_s'] = b / med
    out['_meta'] = {'threads': timer.threads, 'rounds': rounds, 'warmup': warmup, 'device': str(device),
                    'clock': 'cuda events' if device.type == 'cuda' else
                    'process cpu time' if timer.clock is time.process_time else 'wall'}
    return out


# ----------------------------------------------------------------------------------------- timing for calibration
BACKENDS = ('eager', 'onnxruntime')
MIN_SECONDS = 2e-3  # a timed call shorter than this is repeated back to back (timer resolution, call overhead)
WARM_BELOW = 0.05  # a call shorter than this is preceded by an untimed one (caches)
ROUND_BUDGET = 8.0  # seconds of timed calls per runner, beyond which a long runner is timed in fewer rounds
MIN_ROUNDS = 3  # ... but in at least this many

Runner = Callable[[], Any]


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch with ``threads`` intra-op threads inside the block (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_name(device: torch.device | str) -> str:
    """A name of the hardware for cache keys: the GPU's name, or the CPU's model name and architecture."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
    except OSError:
        names = []
    return f'{names[0] if names else platform.processor() or "cpu"} ({platform.machine()})'


class Backend:
    """How a module is run and timed: ``runner(module, args, kwargs)`` makes a zero-argument callable that runs it
    once, :meth:`seconds` times one call: with CUDA events on a GPU; on a CPU with one thread, as the process's CPU
    time (on a shared machine a call longer than the scheduler's time slice is preempted by other jobs, and its wall
    time grows with their load; its CPU time does not); with more threads, as wall time.

    Args:
        device: Where to run (eager; ONNX Runtime runs on the CPU here).
        threads: Intra-op threads (set by the caller for torch; given to the ONNX Runtime session).
    """

    name = 'eager'

    def __init__(self, device: torch.device | str = 'cpu', threads: int = 1) -> None:
        self.device, self.threads = torch.device(device), threads
        self.clock = time.process_time if threads == 1 else time.perf_counter

    def runner(self, module: nn.Module, args: tuple, kwargs: dict) -> Runner:
        module = module.to(self.device).eval()

        def run() -> Any:
            with torch.no_grad():
                return module(*args, **kwargs)
        return run

    def seconds(self, run: Runner, reps: int = 1) -> float:
        """Seconds per call of ``run``, averaged over ``reps`` calls back to back."""
        if self.device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        t0 = self.clock()
        for _ in range(reps):
            run()
        return (self.clock() - t0) / reps


class _Closed(nn.Module):
    """A module with its non-tensor arguments bound, taking only the tensors (for export)."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.inner, self.args, self.kwargs = module, args, kwargs
        self.slots = [i for i, a in enumerate(args) if isinstance(a, Tensor)]

    def forward(self, *tensors: Tensor) -> Any:
        args = list(self.args)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        return self.inner(*args, **self.kwargs)


class OnnxRuntimeBackend(Backend):
    """Each module exported to ONNX (in memory) and run in an ONNX Runtime CPU session with ``threads`` threads."""

    name = 'onnxruntime'

    def __init__(self, device: torch.device | str = 'cpu', threads: int = 1) -> None:
        super().__init__('cpu', threads)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ConfigError("latency_backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime "
                              "(or choose latency_backend 'eager')") from None

    def runner(self, module: nn.Module, args: tuple, kwargs: dict) -> Runner:
        import io
        import warnings

        import onnxruntime as ort
        if any(t.device.type != 'cpu' for t in module.parameters()):
            module = copy.deepcopy(module).cpu()  # ONNX Runtime runs on the CPU here; the caller's model stays put
        closed = _Closed(module.eval(), args, kwargs)
        tensors = tuple(args[i].cpu() for i in closed.slots)
        buf = io.BytesIO()
        names = [f'x{i}' for i in range(len(tensors))]
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(closed, tensors, buf, input_names=names, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = self.threads, 1
        session = ort.InferenceSession(buf.getvalue(), opts, providers=['CPUExecutionProvider'])
        feed = {n: t.numpy() for n, t in zip(names, tensors)}
        return lambda: session.run(None, feed)


def make_backend(name: str, device: torch.device | str = 'cpu', threads: int = 1) -> Backend:
    """The timing backend called ``name`` (:data:`BACKENDS`)."""
    if name not in BACKENDS:
        raise ConfigError(f'latency_backend {name!r} is unknown; choose from {list(BACKENDS)}')
    return (Backend if name == 'eager' else OnnxRuntimeBackend)(device, threads)


def low_percentile(times: Sequence[float], q: float = 0.2) -> float:
    """The ``q`` quantile of ``times`` (nearest rank): a low percentile, robust to the slow outliers of a busy
    machine."""
    ts = sorted(times)
    return ts[min(len(ts) - 1, int(q * len(ts)))]


def split_half(times: Sequence[Sequence[float]], q: float = 0.2) -> float:
    """Disagreement of two halves of the rounds (even vs odd): the median over items of ``|a - b| / min(a, b)`` of
    their low percentiles (0 with fewer than 2 rounds)."""
    gaps = []
    for ts in times:
        if len(ts) < 2:
            return 0.0
        a, b = low_percentile(ts[0::2], q), low_percentile(ts[1::2], q)
        gaps.append(abs(a - b) / max(min(a, b), 1e-12))
    return statistics.median(gaps) if gaps else 0.0


def interleaved(
        runners: Sequence[Runner],
        backend: Backend,
        *,
        rounds: int,
        warmup: int = 1,
        seed: int = 0,
        progress: Callable[[int], None] | None = None,
        times: list[list[float]] | None = None,
) -> list[list[float]]:
    """Time every runner once per round, in a new random order each round; returns seconds per runner and round.

    A call shorter than :data:`WARM_BELOW` follows one untimed call of the same runner, so it finds its weights in
    the caches as a model run over and over does (timed cold, after the other runners, a small model measured up to
    30% slower; a long call's weights do not stay in the caches anyway). A runner faster than :data:`MIN_SECONDS` is
    called several times back to back per round (as many as its first warm-up call says make up that time, at most
    100) and its time per call recorded.

    Long calls cost the time, not the statistics: a runner of :data:`WARM_BELOW` or more skips the warm-up rounds
    (its first, untimed call warmed it), and one whose rounds would add up to more than :data:`ROUND_BUDGET` seconds
    is timed in fewer of them, spread evenly over the rounds, at least :data:`MIN_ROUNDS` (a DeiT-S at batch 32 on
    one CPU thread, 3-5 s a call, in 3 rounds instead of 5 and no warm-up round). Such a call averages thousands of
    kernels and is not preempted in CPU time; whether its rounds agree is still checked (:func:`split_half`), and
    an extension (``times``) adds rounds to it as to the others.

    Args:
        runners: Zero-argument callables.
        backend: Times one call (:meth:`Backend.seconds`).
        rounds: Timed rounds (added to ``times`` when given, to extend an earlier measurement).
        warmup: Untimed rounds first.
        seed: Seed of the orders.
        progress: Called with the number of calls done after each call (and once with the number of calls the
            long runners skip).
        times: Earlier rounds to extend (their medians stand for the first, untimed calls).
    """
    rng = random.Random(seed + (len(times[0]) if times else 0))
    first = [statistics.median(t) for t in times] if times and all(times) else [backend.seconds(r) for r in runners]
    times = times if times is not None else [[] for _ in runners]
    reps = [max(1, min(100, math.ceil(MIN_SECONDS / max(t, 1e-9)))) for t in first]
    counts = [min(rounds, max(MIN_ROUNDS, math.ceil(ROUND_BUDGET / max(t * n, 1e-9)))) for t, n in zip(first, reps)]
    timed = [{warmup + j * rounds // n for j in range(n)} | (set(range(warmup)) if t < WARM_BELOW else set())
             for t, n in zip(first, counts)]
    skipped = sum(warmup + rounds - len(s) for s in timed)
    if progress is not None and skipped:
        progress(skipped)
    order = list(range(len(runners)))
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for i in order:
            if r not in timed[i]:
                continue
            if first[i] < WARM_BELOW:
                runners[i]()  # warm: weights and activations in the caches
            t = backend.seconds(runners[i], reps[i])
            if r >= warmup:
                times[i].append(t)
            if progress is not None:
                progress(1)
    return times
