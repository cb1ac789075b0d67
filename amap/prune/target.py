"""The target guarantee: turn scores into a structure whose cost is at most the target, and as close as possible.

The cost is the pruner's resource (:meth:`~amap.prune.pruner.Pruner.cost`, exact): MACs by default, or the
step-shaped latency table of :class:`~amap.latency.LatencyModel`; "MAC" below stands for either.

After the search (or from a baseline criterion's scores) the structure is adjusted greedily, head-balanced:

* while the MACs exceed the target, remove from one group one channel per head -- the group whose next channels carry
  the least score per MAC saved;
* then, while some group can grow by one channel per head without exceeding the target, add the channels that bring
  the most score per MAC (``fill``), so the result lands just below the target.

Groups without head balance move one channel of one head at a time. :func:`uniform_counts` is the classic baseline:
the same kept ratio in every group, found by bisection.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import ConfigError
from .indicator import topk_mask
from .pruner import Pruner

__all__ = ['fit_to_target', 'apply_counts', 'uniform_counts', 'min_macs', 'min_cost', 'check_target', 'channel_step']


def channel_step(num_heads: int, multiple: int) -> int:
    """Per-head channel step that keeps a balanced group's width (``num_heads x count``) a multiple of ``multiple``."""
    return 1 if multiple <= 1 else multiple // math.gcd(num_heads, multiple)


def _lowest(ind, multiple: int) -> int:
    """Smallest per-head count allowed: ``min_keep`` rounded up to the channel step (all channels if that exceeds
    the head)."""
    step = channel_step(ind.group.num_heads, multiple)
    return min(ind.group.dim, -(-ind.min_keep // step) * step)


def _snap_down(c: Tensor, ind, multiple: int) -> Tensor:
    """Counts rounded down to the channel step (a full head stays full), never below :func:`_lowest`."""
    step = channel_step(ind.group.num_heads, multiple)
    snapped = torch.where(c >= ind.group.dim, c, (c // step) * step)
    return snapped.clamp(min=_lowest(ind, multiple))


def _lowest_counts(pruner: Pruner, multiple: int) -> dict[str, Tensor]:
    return {k: torch.full((ind.group.num_heads,), _lowest(ind, multiple)) for k, ind in pruner.indicators.items()}


def min_macs(pruner: Pruner, multiple: int = 1) -> float:
    """MACs of the smallest structure the constraints allow (every head keeps ``min_keep`` channels, rounded up to
    the channel step of ``multiple``)."""
    return float(pruner.macs(_lowest_counts(pruner, multiple)))


def min_cost(pruner: Pruner, multiple: int = 1) -> float:
    """:func:`min_macs` in the pruner's resource units (exact cost)."""
    return float(pruner.cost(_lowest_counts(pruner, multiple), exact=True))


def check_target(pruner: Pruner, target_macs: float, multiple: int = 1) -> None:
    """Raise :class:`ConfigError` when ``target_macs`` (in the pruner's resource units) is below :func:`min_cost`,
    saying what the minimum is."""
    low, r = min_cost(pruner, multiple), pruner.resource
    if target_macs < low:
        aligned = f' with widths in multiples of {multiple}' if multiple > 1 else ''
        at_least = math.ceil(low / r.full * 1000) / 1000
        raise ConfigError(f'target of {r.format(target_macs)} ({target_macs / r.full:.3f} of the '
                          f'model) is below the smallest structure the constraints allow{aligned} '
                          f'({r.format(low)} = {low / r.full:.3f} of the model); {r.raise_target(at_least)} '
                          f'or prune more group kinds')


def _moves(pruner: Pruner, counts: dict[str, Tensor], ranked: dict[str, Tensor], cost: dict[str, float], *,
           sign: int, multiple: int, per_mac: bool):
    """Candidate moves of :func:`fit_to_target` (one step down, ``sign < 0``, or up): ``(priority, key, new_counts,
    new_adapter_cost)``."""
    for key, ind in pruner.indicators.items():
        adapter = pruner.adapter_of(key)
        c = counts[key]
        H, d = ranked[key].shape
        step = channel_step(H, multiple)
        low = _lowest(ind, multiple)
        heads = [None] if ind.head_balance else range(H)
        for h in heads:
            new = c.clone()
            counts_now = c if h is None else c[h:h + 1]
            # one step along the lattice of allowed counts (a full head is allowed even when off the lattice)
            moved = torch.where(counts_now >= d, (d - 1) // step * step, counts_now - step) if sign < 0 else \
                torch.clamp(counts_now + step, max=d)
            if h is None:
                new = moved
            else:
                new[h] = moved[0]
            if (new < low).any() or (new > d).any() or torch.equal(new, c):
                continue
            trial = dict(counts)
            trial[key] = new
            new_cost = pruner.adapter_cost(adapter, trial)
            delta = abs(cost[adapter.name] - new_cost)
            if delta <= 0:
                continue
            lo_, hi_ = torch.minimum(c, new), torch.maximum(c, new)  # the channels that leave or enter
            changed_heads = range(H) if h is None else [h]
            value = float(sum(ranked[key][r, int(lo_[r]):int(hi_[r])].sum() for r in changed_heads))
            size = int((hi_ - lo_).sum()) if h is None else int(hi_[h] - lo_[h])
            yield value / (delta if per_mac else max(size, 1)), key, new, new_cost


@torch.no_grad()
def fit_to_target(
        pruner: Pruner,
        target_macs: float,
        *,
        scores: dict[str, Tensor] | None = None,
        counts: dict[str, Tensor] | None = None,
        fill: bool = True,
        multiple: int = 1,
        per_mac: bool = True,
) -> dict[str, Tensor]:
    """Adjust kept counts so that the cost <= target, greedily by score per unit of cost (MACs, or latency), and fix
    the indicators' structure.

    Args:
        pruner: The pruner (its indicators' current hard counts are the starting point unless ``counts`` is given).
        target_macs: Cost not to exceed, in the pruner's resource units (MACs per image by default).
        scores: ``{key: (H, d)}`` channel scores; default: the indicators' ``w * m``.
        counts: Starting ``{key: (H,) counts}``; default: the current hard structure.
        fill: Grow groups again while the target allows it.
        multiple: Keep every pruned layer width (heads x per-head count of a balanced group; the MLP hidden width) a
            multiple of this (GEMM kernels run faster on aligned widths); an unpruned group keeps its full width.

    Returns:
        The final ``{key: (H,) kept counts}``; every indicator is fixed to its top channels by score.
    """
    check_target(pruner, target_macs, multiple)
    inds = pruner.indicators
    scores = {k: (ind.scores() if scores is None else scores[k]).detach().float().cpu() for k, ind in inds.items()}
    counts = {k: (c.clone().long().cpu()) for k, c in (counts or pruner.hard_counts()).items()}
    if multiple > 1:
        counts = {k: _snap_down(c, inds[k], multiple) for k, c in counts.items()}
    ranked = {k: s.sort(dim=-1, descending=True).values for k, s in scores.items()}
    cost = {a.name: pruner.adapter_cost(a, counts) for a in pruner.adapters}
    total = pruner.resource.fixed + sum(cost.values())
    budget = pruner.resource.additive(target_macs)  # the greedy adds adapter costs: compare in additive units

    def moves(sign: int):
        return _moves(pruner, counts, ranked, cost, sign=sign, multiple=multiple, per_mac=per_mac)

    def take(move) -> float:
        """Apply a move; returns the new total."""
        _, key, new, new_cost = move
        name = pruner.adapter_of(key).name
        delta = new_cost - cost[name]
        cost[name], counts[key] = new_cost, new
        return total + delta

    while total > budget and (best := min(moves(-1), key=lambda m: m[0], default=None)) is not None:
        total = take(best)
    if total > budget:  # only reachable with a channel multiple (check_target covers the rest)
        raise ConfigError(f'target of {pruner.resource.format(target_macs)} cannot be met with widths in multiples of '
                          f'{multiple}; raise the target or lower channel_multiple')
    while fill and (fitting := [m for m in moves(+1)
                                if total + m[3] - cost[pruner.adapter_of(m[1]).name] <= budget]):
        total = take(max(fitting, key=lambda m: m[0]))
    apply_counts(pruner, counts, scores)
    return counts


@torch.no_grad()
def apply_counts(pruner: Pruner, counts: dict[str, Tensor], scores: dict[str, Tensor] | None = None) -> None:
    """Fix every indicator's structure: in each head keep the ``counts[key][h]`` channels of highest score."""
    for key, ind in pruner.indicators.items():
        s = (ind.scores() if scores is None else scores[key]).detach()
        ind.fixed = topk_mask(s.float().cpu(), counts[key].cpu()).to(ind.m.device)


@torch.no_grad()
def uniform_counts(pruner: Pruner, target_macs: float, multiple: int = 1) -> dict[str, Tensor]:
    """The same kept ratio in every group (rounded up per head, to the channel step of ``multiple``), the largest
    that meets the target."""
    check_target(pruner, target_macs, multiple)

    def count(ind, ratio: float) -> int:
        step = channel_step(ind.group.num_heads, multiple)
        return min(ind.group.dim, max(_lowest(ind, multiple), math.ceil(ratio * ind.group.dim / step) * step))

    def counts_at(ratio: float) -> dict[str, Tensor]:
        return {k: torch.full((ind.group.num_heads,), count(ind, ratio)) for k, ind in pruner.indicators.items()}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(pruner.cost(counts_at(mid), exact=True)) <= target_macs:
            lo = mid
        else:
            hi = mid
    return counts_at(lo)
