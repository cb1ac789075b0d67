"""Shared helpers of the benchmark scripts: models, interleaved timing, peak tensor memory, machine facts, output.

Speed on shared machines swings 2-3x from minute to minute, so every comparison here is a ratio of measurements taken
side by side: :func:`interleaved` times all candidates round by round (the order rotating every round), warm-up
excluded, and reports medians; the load average is recorded before and after every round.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import amap  # noqa: E402,F401  (registers the FLatten zoo in timm)
from amap.utils.io import atomic_write_bytes, atomic_write_json  # noqa: E402

__all__ = ['MODELS', 'build_model', 'random_loader', 'interleaved', 'peak_tensor_bytes', 'machine_info',
           'loadavg', 'markdown_table', 'write_results', 'command_line']

# name -> (builder, input side). Random weights: speed and cost do not depend on training.
MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    'flatten_deit_micro': (lambda: timm.create_model('flatten_deit_micro', num_classes=10), 32),
    'flatten_swin_micro': (lambda: timm.create_model('flatten_swin_micro', num_classes=10), 32),
    # a timm DeiT of about the size of the micro models (the model the quality benchmark trains beside them)
    'timm_deit_micro': (lambda: timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=4, depth=6,
                                                  num_classes=10), 32),
    'flatten_deit_tiny': (lambda: timm.create_model('flatten_deit_tiny'), 224),
    'flatten_swin_tiny': (lambda: timm.create_model('flatten_swin_tiny'), 224),
    'deit_small_patch16_224': (lambda: timm.create_model('deit_small_patch16_224'), 224),
    'swin_tiny_patch4_window7_224': (lambda: timm.create_model('swin_tiny_patch4_window7_224'), 224),
}
SMALL_MODELS = ['flatten_deit_micro', 'flatten_swin_micro', 'timm_deit_micro']
FULL_MODELS = ['flatten_swin_tiny', 'flatten_deit_tiny', 'deit_small_patch16_224', 'swin_tiny_patch4_window7_224']


def build_model(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """A randomly initialised model (eval mode) and its input side; zero-initialised FLatten/Swin parameters
    (focusing scale, positional encoding, relative position bias) are perturbed so the model is not degenerate."""
    if name not in MODELS:
        raise SystemExit(f'unknown model {name!r}; choose from {sorted(MODELS)}')
    builder, side = MODELS[name]
    torch.manual_seed(seed)
    model = builder().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(('.scale', 'positional_encoding', 'relative_position_bias_table')):
                p.normal_(0, 0.5)
    return model, side


def random_loader(batch: int, side: int, batches: int, num_classes: int = 10, seed: int = 0
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A list of ``batches`` random ``(images, labels)`` batches."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, side, side, generator=g), torch.randint(0, num_classes, (batch,), generator=g))
            for _ in range(batches)]


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _summary(samples: list[float]) -> dict[str, Any]:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {'median': statistics.median(samples), 'q1': q[0], 'q3': q[2], 'min': min(samples), 'n': len(samples),
            'samples': samples}


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, reps: int = 1, warmup: int = 1,
                budget: float | None = None, min_rounds: int = 3) -> dict[str, Any]:
    """Time several callables side by side, in wall time and in process CPU time.

    Every callable is first run ``warmup`` times (not timed). Then, ``rounds`` times, each callable is timed over
    ``reps`` back-to-back calls (one sample: seconds per call), the order of the callables rotating every round so
    that none always follows the same neighbour.

    CPU time (``time.process_time``: all threads of this process) is what a shared machine cannot steal: when other
    jobs take the cores, wall time grows and CPU time does not. With one thread it equals the latency on an idle
    core; with several it also counts threads that spin while waiting.

    Args:
        fns: ``{name: callable}``.
        rounds: Rounds (samples per callable).
        reps: Calls per sample.
        warmup: Untimed calls per callable before the first round.
        budget: Optional wall-time budget (seconds) for the rounds; after ``min_rounds`` rounds the timing stops
            when the budget is spent.
        min_rounds: Rounds always run, whatever the budget.

    Returns:
        ``{'stats': {name: {'median', 'q1', 'q3', 'min', 'n', 'samples', 'cpu': {...same in CPU seconds}}},
        'rounds': n, 'loadavg_1min': [...]}`` with the 1-minute load average before the first and after every round.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    loads = [loadavg()[:1]]
    start = time.perf_counter()
    done = 0
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = fns[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps):
                fn()
            wall[name].append((time.perf_counter() - t0) / reps)
            cpu[name].append((time.process_time() - c0) / reps)
        loads.append(loadavg()[:1])
        done += 1
        if budget is not None and done >= min_rounds and time.perf_counter() - start > budget:
            break
    return {'stats': {n: {**_summary(wall[n]), 'cpu': _summary(cpu[n])} for n in names}, 'rounds': done,
            'loadavg_1min': [x[0] for x in loads if x]}


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the bytes of live CPU tensors allocated during ``fn()``, above what was live when it started.

    Measured with ``torch.profiler`` (``profile_memory=True``): every allocation and free of torch's CPU allocator
    is an event with a signed size; the running sum of those events, in time order, is the tensor memory ``fn``
    holds at each moment, and its maximum is the peak (the CPU analogue of CUDA's ``max_memory_allocated``). It
    counts tensor storage only: not Python objects, not the allocator's or oneDNN's own caches, not RSS.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, cores, torch threads, load, versions, commit, date."""
    info: dict[str, Any] = {
        'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        'cpu': _cpu_model(),
        'cpu_count': os.cpu_count(),
        'torch_threads': threads,
        'loadavg_start': loadavg(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'amap': amap.__version__,
        'git_commit': _git_commit(),
    }
    try:
        import onnxruntime
        info['onnxruntime'] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that produced a result, as a user would type it."""
    args = sys.argv[1:] if argv is None else list(argv)
    return ' '.join(['python', f'benchmarks/{script}', *args])


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    lines = ['| ' + ' | '.join(map(str, head)) + ' |',
             '|' + '|'.join(['---'] * left + ['---:'] * (len(head) - left)) + '|']
    lines += ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]
    return '\n'.join(lines)


def write_results(out: str | os.PathLike, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``payload`` (plus the Markdown under ``'markdown'``) to ``out`` as JSON and the Markdown to the same
    stem with ``.md``, each atomically. Returns both paths."""
    out = Path(out)
    md = out.with_suffix('.md')
    atomic_write_json(out, {**payload, 'markdown': markdown})
    atomic_write_bytes(md, (markdown.rstrip() + '\n').encode())
    return out, md
