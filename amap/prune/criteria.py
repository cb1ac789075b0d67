"""Baseline importance criteria on the same groups and structure constraints as AMAP, for fair comparisons.

Each criterion gives ``{indicator key: (H, d) scores}`` and a structure at the MAC target
(:func:`criterion_structure`), allocated the way Torch-Pruning's users run these importances:

* scores are normalised by their group mean (Torch-Pruning's default ``normalizer='mean'``), so that groups of
  different scale compete fairly;
* **global** allocation (``magnitude``, ``magnitude_l2``, ``taylor``, ``random``): one threshold on the normalised
  scores across all groups (Torch-Pruning's ``global_pruning=True``), applied head-balanced and moved until the MACs
  land at the target (:func:`~amap.prune.target.fit_to_target` with ``per_mac=False``: a channel's cost does not
  discount its score, unlike AMAP's own target guarantee);
* **per-layer uniform** allocation (``uniform`` = magnitude, ``taylor_uniform``): the same kept ratio in every group
  (Torch-Pruning's default local pruning), then the last channels the target still allows are added back by score so
  that every method spends the same MACs.

* ``magnitude``: L1 (or L2) norm of each channel's weights (projection rows in, projection columns out);
* ``taylor``: first-order Taylor importance ``|dL/db|`` of the channel's gate, summed over calibration batches;
* ``random``: uniform random scores (seeded).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..utils.outputs import logits_of
from .pruner import Pruner
from .target import apply_counts, fit_to_target, uniform_counts

__all__ = ['CRITERIA', 'criterion_scores', 'criterion_structure', 'gate_gradients']

CRITERIA = ('amap', 'magnitude', 'magnitude_l2', 'taylor', 'random', 'uniform', 'taylor_uniform')
UNIFORM = {'uniform': 'magnitude', 'taylor_uniform': 'taylor'}  # per-layer uniform criteria and their scores


def _normalise(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: s / s.mean().clamp(min=1e-12) for k, s in scores.items()}


def magnitude_scores(pruner: Pruner, p: float = 1.0) -> dict[str, Tensor]:
    return _normalise({k: pruner.adapter_of(k).weight_norms(g.kind, p).float().cpu() for k, g in
                       pruner.groups().items()})


def gate_gradients(pruner: Pruner, batches: Iterable[tuple[Tensor, Tensor]], *,
                   train: bool = False) -> Iterator[dict[str, Tensor]]:
    """Per batch, the cross-entropy's gradient ``dL/db`` at every gate with the gates fully open (``m = 1``, no
    similarity weights; straight-through), ``{key: (H, d)}``; the indicators, gradients and mode are restored after.

    Args:
        pruner: The pruner.
        batches: Labelled batches on the model's device.
        train: Run the model in train mode (as the search sees it) instead of eval mode.
    """
    model = pruner.model[0]
    inds = pruner.indicators
    saved = {k: (ind.m.detach().clone(), ind.similarity_weight.clone()) for k, ind in inds.items()}
    was_training = model.training
    model.train(train)
    try:
        for ind in inds.values():
            ind.m.data.fill_(1.0)
            ind.similarity_weight.fill_(1.0)
        for x, y in batches:
            for ind in inds.values():
                ind.m.grad = None
            F.cross_entropy(logits_of(model(x)), y).backward()
            yield {k: torch.zeros_like(ind.m) if ind.m.grad is None else ind.m.grad.detach().clone()
                   for k, ind in inds.items()}
    finally:
        for k, ind in inds.items():
            ind.m.data.copy_(saved[k][0])
            ind.similarity_weight.copy_(saved[k][1])
            ind.m.grad = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def taylor_scores(pruner: Pruner, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """``sum over batches of |dL/db|`` with the gates fully open (``m = 1``, straight-through gradient)."""
    acc = {k: torch.zeros_like(ind.m) for k, ind in pruner.indicators.items()}
    for grads in gate_gradients(pruner, batches):
        for k, g in grads.items():
            acc[k] += g.abs()
    return _normalise({k: a.cpu() for k, a in acc.items()})


def random_scores(pruner: Pruner, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(ind.m.shape, generator=g) for k, ind in pruner.indicators.items()}


def criterion_scores(
        name: str,
        pruner: Pruner,
        *,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        seed: int = 0,
) -> dict[str, Tensor]:
    """Scores of a baseline criterion.

    Args:
        name: One of ``magnitude``, ``magnitude_l2``, ``taylor``, ``random``, ``uniform``, ``taylor_uniform``.
        pruner: The pruner.
        batches: Labelled batches on the model's device (``taylor`` only).
        seed: Seed (``random`` only).
    """
    name = UNIFORM.get(name, name)
    if name == 'magnitude':
        return magnitude_scores(pruner, 1.0)
    if name == 'magnitude_l2':
        return magnitude_scores(pruner, 2.0)
    if name == 'taylor':
        if batches is None:
            raise ConfigError('the taylor criterion needs calibration batches with labels')
        return taylor_scores(pruner, batches)
    if name == 'random':
        return random_scores(pruner, seed)
    raise ConfigError(f'unknown criterion {name!r}; choose from {list(CRITERIA)}')


def criterion_structure(
        name: str,
        pruner: Pruner,
        target_macs: float,
        *,
        batches: Iterable[tuple[Tensor, Tensor]] | None = None,
        seed: int = 0,
        fill: bool = True,
        multiple: int = 1,
        scores: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Fix the structure a baseline criterion gives at ``target_macs`` (see the module docstring) and return its kept
    counts ``{key: (H,)}``.

    Args:
        name: A baseline criterion (any of :data:`CRITERIA` but ``amap``).
        pruner: The pruner.
        target_macs: MACs per image not to exceed.
        batches: Labelled batches (``taylor``, ``taylor_uniform``).
        seed: Seed (``random``).
        fill: Grow the structure back up to the target once the allocation rule has spoken.
        multiple: Keep pruned widths multiples of this.
        scores: The criterion's scores when already computed (:func:`criterion_scores`).
    """
    if scores is None:
        scores = criterion_scores(name, pruner, batches=batches, seed=seed)
    if name in UNIFORM:
        counts = uniform_counts(pruner, target_macs, multiple)
        if not fill:
            apply_counts(pruner, counts, scores)
            return counts
    else:
        counts = {k: torch.full((ind.group.num_heads,), ind.group.dim) for k, ind in pruner.indicators.items()}
    return fit_to_target(pruner, target_macs, scores=scores, counts=counts, fill=fill, multiple=multiple,
                         per_mac=False)
