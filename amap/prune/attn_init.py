"""Indicator initialisation for linear attention from the attention difference (docs/amap-method.md, section 5).

For a focused-linear-attention layer, with ``q`` and ``k`` taken at the layer's qk gate (after ``ReLU + 1e-6`` and
the division by ``softplus(scale)``, before the norm-preserving power ``p``):

* ``A`` is the row-normalised attention map ``phi(Q) phi(K)^T`` of a head (query tokens subsampled);
* ``A_-c`` is the same with qk channel ``c`` removed, the focusing function recomputed without it (the norms are over
  all channels, so a removal also rescales the other channels);
* ``D_c = ||A - A_-c||_F / ||A||_F`` on the head that holds ``c``.

For the v channels, ``D_c = ||O_c|| / ||O||``: the share of the attention output (with DWC) that channel ``c`` carries,
which is exactly what removing it changes.

How ``D`` becomes the initial indicator (softmax attention and MLP groups start at ``m = 1``):

* default (ours): **ranked within each head and centred on the common start**: the channel of a head with the
  ``i``-th smallest ``D`` of ``d`` starts at ``1 + spread * (i / (d - 1) - 1/2)``, so the linear-attention groups
  start, on average, where every other group starts, and ``D`` only decides which channels of a head go first. (Adam
  moves every indicator by about its learning rate per step, so a group started lower is cut first: the paper's
  mapping below cut the linear-attention groups to 20-27% of their channels and cost 4.9 top-1 points on
  FLatten-DeiT.) The search may raise these indicators up to their start's maximum (``upper``).
* ``low`` given (the paper's mapping): ``D`` mapped linearly per layer onto ``[low, high]``, the largest difference
  at ``high``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .indicator import within_head_ranks
from .pruner import Pruner

__all__ = ['focus', 'qk_attention_difference', 'v_output_difference', 'attention_difference_init']


def focus(x: Tensor, p: float) -> Tensor:
    """The norm-preserving power of the focusing function: ``x**p / ||x**p|| * ||x||`` over the last dimension."""
    n = x.norm(dim=-1, keepdim=True)
    y = x ** p
    return y / y.norm(dim=-1, keepdim=True).clamp(min=1e-30) * n


def _row_normalised_maps(qf: Tensor, kf: Tensor, heads: int) -> Tensor:
    """``(B, H, Nq, Nk)`` row-normalised ``phi(Q) phi(K)^T`` per head."""
    B, Nq, C = qf.shape
    q = qf.reshape(B, Nq, heads, C // heads).transpose(1, 2)
    k = kf.reshape(B, kf.shape[1], heads, C // heads).transpose(1, 2)
    a = q @ k.transpose(-2, -1)
    return a / a.sum(-1, keepdim=True).clamp(min=1e-30)


@torch.no_grad()
def qk_attention_difference(q: Tensor, k: Tensor, heads: int, p: float) -> Tensor:
    """``D`` of every qk channel, ``(H, d)``.

    Args:
        q: Queries at the gate, ``(B, Nq, H * d)`` (positive).
        k: Keys at the gate, ``(B, Nk, H * d)`` (positive).
        heads: Number of heads.
        p: Focusing factor.
    """
    q, k = q.double(), k.double()
    C = q.shape[-1]
    d = C // heads
    base = _row_normalised_maps(focus(q, p), focus(k, p), heads)
    out = torch.zeros(heads, d, dtype=torch.float64)
    keep = torch.ones(C, dtype=q.dtype, device=q.device)
    for c in range(C):
        h = c // d
        keep[c] = 0
        a = _row_normalised_maps(focus(q * keep, p), focus(k * keep, p), heads)[:, h]
        keep[c] = 1
        out[h, c % d] = ((base[:, h] - a).norm() / base[:, h].norm().clamp(min=1e-30)).cpu()
    return out.float()


@torch.no_grad()
def v_output_difference(o: Tensor, heads: int) -> Tensor:
    """``D`` of every v channel from the attention output at the v gate ``(..., H * d)``: ``||O_c|| / ||O||``."""
    o = o.reshape(-1, o.shape[-1]).double()
    share = o.norm(dim=0) / o.norm().clamp(min=1e-30)
    return share.reshape(heads, -1).float().cpu()


def centred_ranks(d: Tensor, spread: float) -> Tensor:
    """``1 + spread * (rank / (dim - 1) - 1/2)`` per row (head) of ``d``, rank 0 for the smallest value."""
    return 1.0 + spread * (within_head_ranks(d) - 0.5)


def _to_range(d: Tensor, low: float, high: float) -> Tensor:
    lo, hi = d.min(), d.max()
    if float(hi - lo) <= 0:
        return torch.full_like(d, high)
    return low + (high - low) * (d - lo) / (hi - lo)


class _FirstBatch:
    """Recorder keeping the first activation of each (group, role), with tokens subsampled."""

    def __init__(self, keys: set[str], max_tokens: int, generator: torch.Generator) -> None:
        self.keys, self.max_tokens, self.generator = keys, max_tokens, generator
        self.store: dict[tuple[str, str], Tensor] = {}

    def __call__(self, key: str, x: Tensor, role: str, first_head: int = 0) -> None:
        if key not in self.keys or (key, role, first_head) in self.store:
            return
        x = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.reshape(1, -1, x.shape[-1])
        n = x.shape[1]
        if n > self.max_tokens:
            idx = torch.randperm(n, generator=self.generator)[: self.max_tokens].to(x.device)
            x = x[:, idx]
        self.store[(key, role, first_head)] = x[:8].detach()


@torch.no_grad()
def attention_difference_init(
        pruner: Pruner,
        batch: Tensor,
        *,
        spread: float = 0.1,
        low: float | None = None,
        high: float = 1.0,
        max_tokens: int = 256,
        seed: int = 0,
) -> dict[str, Tensor]:
    """Initialise the indicators of every linear-attention group from the attention difference.

    Args:
        pruner: The pruner (gates installed).
        batch: A calibration image batch on the model's device.
        spread: Width of the centred per-head ranking around 1 (default mapping).
        low: Use the paper's mapping instead: the least important channel of a layer starts at ``low``...
        high: ... and the most important at ``high``.
        max_tokens: Query/key tokens kept per window (random subsample) to bound the cost.
        seed: Seed of the subsampling.

    Returns:
        ``{indicator key: (H, d) initial values}`` of the groups it initialised.
    """
    model = pruner.model[0]
    groups = pruner.groups()
    linear = {k: g for k, g in groups.items() if g.linear_attention}
    if not linear:
        return {}
    recorder = _FirstBatch({g.key for g in linear.values()}, max_tokens, torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    for adapter in pruner.adapters:
        adapter.recorder = recorder
    try:
        model(batch)
    finally:
        for adapter in pruner.adapters:
            adapter.recorder = None
        model.train(was_training)
    out = {}
    for key, group in linear.items():
        d = torch.zeros(group.num_heads, group.dim)
        found = False
        for (gkey, role, first), x in recorder.store.items():
            if gkey != group.key or role == 'k':
                continue
            heads = x.shape[-1] // group.dim
            if group.kind == 'qk':
                k = recorder.store.get((gkey, 'k', first))
                if k is None:
                    continue
                p = float(getattr(pruner.adapter_of(key), 'focusing_factor', 3.0))
                d[first:first + heads] = qk_attention_difference(x, k, heads, p)
            else:
                d[first:first + heads] = v_output_difference(x, heads)
            found = True
        if not found:
            continue
        init = centred_ranks(d, spread) if low is None else _to_range(d, low, high)
        ind = pruner.indicators[key]
        ind.m.data.copy_(init.to(ind.m.device))
        ind.upper = max(1.0, float(init.max()))
        out[key] = init
    return out
