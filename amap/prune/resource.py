"""What the target is counted in: a :class:`Resource` is the cost of a structure as a function of the kept channels.

The search's resource loss, the target guarantee and the target check see the resource only through this interface
(via :meth:`amap.prune.pruner.Pruner.cost`), so MACs and latency are two implementations of one contract:

* :class:`MacResource` -- the analytic MAC count of each adapter (the default; exact integers);
* :class:`amap.latency.LatencyModel` -- latency measured on the device, per block shape, as a function of the kept
  counts (smooth for the search's gradient, step-shaped for the final selection).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from .adapters import Adapter

__all__ = ['Resource', 'MacResource']


class Resource(ABC):
    """The cost a target is set in: ``fixed + sum over adapters of adapter_cost`` (through :meth:`total`).

    Attributes:
        name: Short name (``'macs'``, ``'latency'``), as in ``PruneConfig.resource``.
        full: Cost of the unpruned model.
        fixed: Cost of everything the adapters' groups do not change.
        step: The width step the cost rewards (the final structure's widths are multiples of it; 1: none).
    """

    name: str = ''
    full: float = 0.0
    fixed: float = 0.0
    step: int = 1

    @abstractmethod
    def adapter_cost(self, adapter: Adapter, kept: dict[str, Tensor], *, exact: bool) -> Tensor:
        """Cost of one adapter's module as a function of ``{kind: (H,) kept counts}`` (missing kinds: full width).

        Args:
            adapter: The adapter.
            kept: Kept counts per head (float64; differentiable when they are).
            exact: The cost a final, integer structure really has (the target guarantee selects against it); when
                False, a smooth, monotone function of the counts whose gradient the search follows.
        """

    def total(self, additive: Tensor) -> Tensor:
        """The cost of a structure from its additive part ``fixed + sum of adapter costs``: the identity, unless a
        resource measured the whole model bending away from the sum of its parts (a monotone map)."""
        return additive

    def additive(self, value: float) -> float:
        """The inverse of :meth:`total`: the additive part whose cost is ``value`` (the target guarantee's budget)."""
        return value

    @abstractmethod
    def format(self, value: float) -> str:
        """``value`` with its unit, for messages (``'12.3 MMACs'``, ``'4.56 ms'``)."""

    def raise_target(self, ratio: float) -> str:
        """How to ask for at least ``ratio`` of the full cost, for messages."""
        return f'raise --target to at least {ratio:.3f}'


class MacResource(Resource):
    """MACs per image: each adapter's analytic count (exact and smooth alike).

    Args:
        full: MACs of the unpruned model (from the executed counter).
        fixed: MACs of everything the groups do not touch.
    """

    name = 'macs'

    def __init__(self, full: float, fixed: float) -> None:
        self.full, self.fixed = float(full), float(fixed)

    def adapter_cost(self, adapter: Adapter, kept: dict[str, Tensor], *, exact: bool) -> Tensor:
        return adapter.macs(kept)

    def format(self, value: float) -> str:
        return f'{value / 1e6:.3g} MMACs'
