"""Pruning indicators: one learnable real per channel, a straight-through binary gate, and head balance.

Section 3 of docs/amap-method.md: the score of a channel is ``s = w * m`` (``w`` the similarity weights of section 4,
``m`` the learnable indicator). The forward pass multiplies the channel by a binary mask ``b`` chosen from ``s``;
gradients reach ``m`` straight through (``b + (s - s.detach())``).

Head balance: with ``K`` channels of a group scoring above the threshold, every one of the group's ``H`` heads keeps
its top ``max(1, round(K / H))`` channels, so all heads keep the same number and the pruned tensors still reshape to
``(heads, head_dim)``. Without head balance each channel is kept when its score exceeds the threshold (at least one per
head).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .groups import ChannelGroup

__all__ = ['ChannelIndicator', 'topk_mask', 'within_head_ranks']


def topk_mask(scores: Tensor, counts: Tensor) -> Tensor:
    """Binary mask keeping, in every row (head), the ``counts[h]`` highest scores.

    Args:
        scores: ``(H, d)`` scores.
        counts: ``(H,)`` integer number of channels to keep per head.

    Returns:
        ``(H, d)`` float mask of zeros and ones.
    """
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (rank < counts.to(rank.device).unsqueeze(-1)).to(scores.dtype)


def within_head_ranks(scores: Tensor) -> Tensor:
    """Rank of every channel among its head's (row's), scaled to [0, 1]: 0 for the lowest score, 1 for the highest
    (ties in index order), ``(H, d)`` float."""
    d = scores.shape[-1]
    order = scores.argsort(dim=-1, stable=True)
    ranks = torch.empty(order.shape, dtype=torch.float32, device=scores.device)
    ranks.scatter_(-1, order, torch.arange(d, dtype=torch.float32, device=scores.device).expand_as(order).contiguous())
    return ranks / max(d - 1, 1)


class ChannelIndicator(nn.Module):
    """Indicator, similarity weights, reweight scales and the resulting gate of one channel group.

    Args:
        group: The channel group.
        init: Initial indicator value (a float, or an ``(H, d)`` tensor, e.g. from the linear-attention init).
        head_balance: Keep the same number of channels in every head.
        threshold: Score above which a channel counts as kept.
        reweight: Learn a positive scale per channel (the reweight module, section 6).
        min_keep: Channels every head keeps at least.
    """

    def __init__(
            self,
            group: ChannelGroup,
            *,
            init: float | Tensor = 1.0,
            head_balance: bool = True,
            threshold: float = 0.5,
            reweight: bool = True,
            min_keep: int = 1,
    ) -> None:
        super().__init__()
        self.group = group
        self.head_balance = head_balance
        self.threshold = threshold
        self.min_keep = min_keep
        self.upper = 1.0  # the search clamps m to [0, upper]; an initialisation may start m above 1 and raise it
        self.ramp = False  # the search's ramp gate (SearchSettings.gate); folded into the reweights at the cut
        shape = (group.num_heads, group.dim)
        value = init if isinstance(init, Tensor) else torch.full(shape, float(init))
        self.m = nn.Parameter(value.detach().clone().float().reshape(shape))
        self.register_buffer('similarity_weight', torch.ones(shape))
        self.reweight = nn.Parameter(torch.ones(shape)) if reweight else None
        # A fixed structure (set after the search or by a baseline criterion); None while searching.
        self.register_buffer('fixed', torch.empty(0), persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # search states written before the buffer was renamed hold the similarity weights as ``weight``
        if prefix + 'weight' in state_dict and prefix + 'similarity_weight' not in state_dict:
            state_dict[prefix + 'similarity_weight'] = state_dict.pop(prefix + 'weight')
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------- scores & masks
    def scores(self) -> Tensor:
        """``s = w * m``, shape ``(H, d)``."""
        return self.similarity_weight * self.m

    @torch.no_grad()
    def counts(self, scores: Tensor | None = None) -> Tensor:
        """Channels kept per head, ``(H,)`` integers, by the head-balance rule (or the fixed structure)."""
        if self.fixed.numel():
            return self.fixed.sum(-1).long()
        s = self.scores() if scores is None else scores
        H, d = s.shape
        if self.head_balance:
            k = int(torch.round((s > self.threshold).sum().float() / H).item())
            return torch.full((H,), min(d, max(self.min_keep, k)), dtype=torch.long, device=s.device)
        return (s > self.threshold).sum(-1).clamp(min=self.min_keep).long()

    @torch.no_grad()
    def hard_mask(self) -> Tensor:
        """The binary mask ``b`` of the current scores (or the fixed structure), ``(H, d)``."""
        if self.fixed.numel():
            return self.fixed
        s = self.scores()
        return topk_mask(s, self.counts(s))

    def mask(self) -> Tensor:
        """Binary mask with a straight-through gradient to the indicator, ``(H, d)``."""
        b = self.hard_mask()
        if self.fixed.numel() or not self.m.requires_grad:
            return b
        s = self.scores()
        return b + (s - s.detach())  # exactly b in value (b + s - s would round), gradient d/ds = 1

    def ramp_scale(self) -> Tensor:
        """The ramp gate's factor of every channel, ``clip((s - threshold) / (w - threshold), 0, 1)`` (1 at the start
        ``m = 1``, 0 at the threshold), with the gradient of the unclipped line, ``(H, d)``."""
        w = self.similarity_weight
        line = (self.scores() - self.threshold) / (w - self.threshold).clamp(min=1e-3)
        return line + (line.clamp(0.0, 1.0) - line).detach()

    def reweight_scale(self) -> Tensor | None:
        """The factor where the reweights act, ``(H, d)`` (None when there is none): the reweights, times, while
        searching with the ramp gate on, :meth:`ramp_scale` on the kept channels -- a kept channel fades out as its
        indicator falls to the threshold, so the task loss feels the cut coming (with the binary gate alone the
        gradient at a kept channel is the unpruned model's)."""
        if not self.ramp or self.fixed.numel() or not self.m.requires_grad:
            return self.reweight
        ramp = torch.where(self.hard_mask().bool(), self.ramp_scale(), torch.ones_like(self.m))
        return ramp if self.reweight is None else self.reweight * ramp

    def channel_scale(self) -> Tensor:
        """Mask times reweight: the factor the gate multiplies each channel by, ``(H, d)``."""
        scale, rw = self.mask(), self.reweight_scale()
        return scale if rw is None else scale * rw

    def kept(self) -> Tensor:
        """Channels kept per head, ``(H,)``, differentiable through the straight-through mask."""
        return self.mask().sum(-1)

    # --------------------------------------------------------------------------------------------- fixed structure
    @torch.no_grad()
    def fix(self, counts: Tensor | None = None) -> None:
        """Freeze the structure: keep, in every head, the ``counts[h]`` highest-scoring channels."""
        self.fixed = torch.empty(0, device=self.m.device)
        s = self.scores()
        self.fixed = topk_mask(s, self.counts(s) if counts is None else counts.to(s.device))

    @torch.no_grad()
    def fold_ramp(self, floor: float = 0.05) -> None:
        """End the ramp gate: multiply the reweights by the ramp factors (at least ``floor``, so that a channel the
        target guarantee adds back stays trainable), so the fixed structure computes what the search's gate did.
        Without reweights the factors become fixed (untrained) scales that the surgery folds like reweights."""
        if not self.ramp:
            return
        scale = self.ramp_scale().clamp(floor, 1.0)
        if self.reweight is None:  # without the reweight module the factors are fixed scales, folded the same way
            self.reweight = nn.Parameter(scale.detach().clone(), requires_grad=False)
        else:
            self.reweight.mul_(scale)
        self.ramp = False

    def unfix(self) -> None:
        """Return to searching."""
        self.fixed = torch.empty(0, device=self.m.device)

    @torch.no_grad()
    def keep_indices(self) -> list[Tensor]:
        """Kept channel indices of every head (ascending), from the hard mask."""
        return [row.nonzero().flatten() for row in self.hard_mask()]

    def extra_repr(self) -> str:
        g = self.group
        return f'{g.key}: heads={g.num_heads}, dim={g.dim}, head_balance={self.head_balance}'
