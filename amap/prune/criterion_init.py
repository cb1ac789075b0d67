"""Indicators initialised from a baseline criterion's structure at the target (ours; docs/amap-method.md, section 5b).

With every indicator at ``m = 1`` the search spends its first steps only reaching the target, on weights that train
for a structure that is still moving. Seeded from a criterion (``indicator_init='taylor'``), the search starts *at*
the target: the channels the criterion keeps at the target (as :func:`~amap.prune.criteria.criterion_structure`
allocates them) start above the threshold, the others below it, so step 0 gates exactly the criterion's structure.
The search then moves only the channels whose task and resource gradients disagree with the criterion, while the weights
train on (nearly) the final structure from the first step.

Start scores, per head, ordered by the criterion's score within the head (rank ``r`` in [0, 1], highest 1)::

    kept:  s = threshold + margin * (1 + r) / 2      in (threshold + margin/2, threshold + margin]
    cut:   s = threshold - margin * (2 - r) / 2      in [threshold - margin, threshold - margin/2)

so a channel near the boundary needs about ``margin / 2 / indicator_lr`` consistent steps to cross it. The indicator
is ``m = s / w`` (``w`` the similarity weights, folded in before), so the score ``w * m`` is the one above.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import ConfigError
from .criteria import criterion_scores, criterion_structure
from .indicator import within_head_ranks
from .pruner import Pruner

__all__ = ['INDICATOR_INITS', 'criterion_init']

INDICATOR_INITS = ('constant', 'taylor')


def criterion_init(
        pruner: Pruner,
        target: float,
        batches: Iterable[tuple[Tensor, Tensor]],
        *,
        criterion: str = 'taylor',
        margin: float = 0.1,
        multiple: int = 1,
        seed: int = 0,
) -> dict[str, Tensor]:
    """Start every indicator at the structure ``criterion`` gives at ``target`` (see the module docstring).

    Args:
        pruner: The pruner (similarity weights already folded in, if any).
        target: Cost to reach, in the pruner's resource units.
        batches: Labelled calibration batches on the model's device.
        criterion: A baseline criterion of :mod:`amap.prune.criteria` (``taylor``).
        margin: Distance of the start scores from the threshold (see above).
        multiple: Width multiple of the structure (as the target guarantee keeps it).
        seed: Seed (``random`` criterion).

    Returns:
        The criterion's kept counts ``{key: (H,)}``; the indicators are left searching (not fixed).
    """
    if not 0 < margin < 1:
        raise ConfigError(f'init_margin must be in (0, 1), got {margin}')
    batches = list(batches)
    scores = criterion_scores(criterion, pruner, batches=batches, seed=seed)
    counts = criterion_structure(criterion, pruner, target, scores=scores, multiple=multiple)
    with torch.no_grad():
        for key, ind in pruner.indicators.items():
            kept = ind.fixed.cpu().bool()
            ind.unfix()
            r = within_head_ranks(scores[key])
            thr = ind.threshold
            s0 = torch.where(kept, thr + margin * (1 + r) / 2, thr - margin * (2 - r) / 2)
            w = ind.similarity_weight.detach().float().cpu()
            m0 = s0 / w.clamp(min=1e-6)
            ind.m.copy_(m0.to(ind.m.device))
            ind.upper = max(1.0, float(m0.max()))
    return counts
