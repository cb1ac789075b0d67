"""Latency and throughput of several models measured side by side.

Wall-clock speed swings between minutes on shared machines, so models are compared in one run, interleaved: every
round times each model once, and each model's figure is the median over rounds (warm-up rounds excluded).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ['measure_latency']


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
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in batch_sizes}
    inputs = {b: torch.randn(b, *input_size, device=device) for b in batch_sizes}
    try:
        for r in range(warmup + rounds):
            for b in batch_sizes:
                for name, m in models.items():
                    if device.type == 'cuda':
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    m(inputs[b])
                    if device.type == 'cuda':
                        torch.cuda.synchronize(device)
                    if r >= warmup:
                        times[(name, b)].append(time.perf_counter() - t0)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    out: dict[str, dict[str, float]] = {}
    for (name, b), ts in times.items():
        med = statistics.median(ts)
        out.setdefault(name, {})[f'b{b}_ms'] = 1e3 * med
        out[name][f'b{b}_images_per_s'] = b / med
    out['_meta'] = {'threads': torch.get_num_threads(), 'rounds': rounds, 'warmup': warmup, 'device': str(device)}
    return out
