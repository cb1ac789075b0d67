"""Channel-similarity weights (docs/amap-method.md, section 4).

From calibration batches, for every group and head, the cosine similarity ``S`` between the channels' activation
vectors over tokens (at the group's gate: q and k for ``qk`` -- the two similarity matrices averaged --, the attention
output for ``v``, the hidden activation for ``mlp``). A channel's redundancy is ``r_i = mean_{j != i} |S_ij|`` and its
weight ``w_i = 1 - beta * (r_i - min r) / (max r - min r + eps)`` (per head), so ``w`` lies in ``[1 - beta, 1]``: the
most redundant channel of a head scores lowest, and no channel falls below the 0.5 threshold at step 0 for
``beta < 0.5``.

Streaming: only the ``(H, d, d)`` Gram matrix of each group is accumulated, never the activations.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

from .pruner import Pruner

__all__ = ['GramRecorder', 'redundancy', 'similarity_weights', 'weights_from_redundancy', 'calibrate_similarity']


class GramRecorder:
    """A recorder for the adapters' gates that accumulates per-head Gram matrices of the recorded activations."""

    def __init__(self, heads: dict[str, tuple[int, int]]) -> None:
        self.heads = heads  # group key (dotted) -> (number of heads, channels per head)
        self.grams: dict[tuple[str, str], Tensor] = {}

    def __call__(self, key: str, x: Tensor, role: str, first_head: int = 0) -> None:
        if key not in self.heads:
            return
        H, d = self.heads[key]
        x = x.reshape(-1, x.shape[-1] // d, d).float()
        gram = torch.einsum('nhd,nhe->hde', x, x)
        k = (key, role)
        if k not in self.grams:
            self.grams[k] = torch.zeros(H, d, d, device=x.device)
        self.grams[k][first_head:first_head + gram.shape[0]] += gram


def redundancy(gram: Tensor, eps: float = 1e-12) -> Tensor:
    """``r_i = mean_{j != i} |S_ij|`` from a Gram matrix ``(H, d, d)``; returns ``(H, d)``."""
    norm = gram.diagonal(dim1=-2, dim2=-1).clamp(min=eps).sqrt()
    sim = (gram / (norm.unsqueeze(-1) * norm.unsqueeze(-2))).abs()
    d = sim.shape[-1]
    if d == 1:
        return torch.zeros(sim.shape[:-1], device=gram.device)
    return (sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)) / (d - 1)


def weights_from_redundancy(r: Tensor, beta: float = 0.3, eps: float = 1e-8) -> Tensor:
    """``w = 1 - beta * (r - min r) / (max r - min r + eps)`` per head (rows of ``r``)."""
    lo = r.min(-1, keepdim=True).values
    hi = r.max(-1, keepdim=True).values
    return 1 - beta * (r - lo) / (hi - lo + eps)


def similarity_weights(recorder: GramRecorder, beta: float = 0.3) -> dict[str, Tensor]:
    """``{group key: (H, d) weights}`` from a filled recorder (q and k similarities averaged for ``qk``)."""
    by_key: dict[str, list[Tensor]] = defaultdict(list)
    for (key, _role), gram in recorder.grams.items():
        by_key[key].append(redundancy(gram))
    return {key: weights_from_redundancy(torch.stack(rs).mean(0), beta) for key, rs in by_key.items()}


@torch.no_grad()
def calibrate_similarity(pruner: Pruner, batches: Iterable[Tensor], *, beta: float = 0.3) -> dict[str, Tensor]:
    """Run calibration images through the (eval-mode) model and set every indicator's similarity weights.

    Args:
        pruner: The pruner (gates installed).
        batches: Input image batches (already on the model's device).
        beta: Strength of the similarity weights.

    Returns:
        The weights per group key.
    """
    model = pruner.model[0]
    groups = pruner.groups()
    recorder = GramRecorder({g.key: (g.num_heads, g.dim) for g in groups.values()})
    was_training = model.training
    model.eval()
    for adapter in pruner.adapters:
        adapter.recorder = recorder
    try:
        for x in batches:
            model(x)
    finally:
        for adapter in pruner.adapters:
            adapter.recorder = None
        model.train(was_training)
    weights = similarity_weights(recorder, beta)
    for key, ind in pruner.indicators.items():
        w = weights.get(groups[key].key)
        if w is not None:
            ind.similarity_weight.copy_(w.to(ind.similarity_weight.device))
    return weights
