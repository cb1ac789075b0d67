"""The :class:`Pruner`: a model, its adapters and one indicator per channel group, plus MAC accounting.

It is the state the search, the baseline criteria, the target guarantee and the surgery work on:

* ``Pruner(model, input_size)`` finds the adapters, creates the indicators, installs the gates and probes the model
  once (batch 1) so every adapter knows its token counts;
* :meth:`Pruner.macs` is the analytic, differentiable MAC count of the whole model as a function of the kept channels
  (the fixed part, i.e. everything the groups do not touch, is taken from the executed MAC counter);
* :meth:`Pruner.cost` is the same in the unit the target is set in, :attr:`Pruner.resource` (MACs unless a
  :class:`~amap.latency.LatencyModel` replaced it), which the search and the target guarantee use;
* :meth:`Pruner.structure` describes the current (hard) structure per module.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..macs import count_macs
from .adapters import Adapter, find_adapters, unadapted_attention
from .groups import GROUP_KINDS, ChannelGroup
from .indicator import ChannelIndicator
from .resource import MacResource, Resource

__all__ = ['Pruner']

_logger = logging.getLogger(__name__)


def _key(group: ChannelGroup) -> str:
    return group.key.replace('.', '__')


class Pruner(nn.Module):
    """Indicators and gates for every prunable group of a model.

    Args:
        model: The model to prune (modified in place: gates are hooks, removed by :meth:`detach`).
        input_size: ``(C, H, W)`` of one input image.
        kinds: Which group kinds to prune (``'qk'``, ``'v'``, ``'mlp'``).
        head_balance: Every head of a group keeps the same number of channels (section 3).
        reweight: Learn a reweight scale per channel (section 6).
        threshold: Score threshold for a kept channel.
        min_keep: Channels every head keeps at least.
    """

    def __init__(
            self,
            model: nn.Module,
            input_size: tuple[int, int, int],
            *,
            kinds: Iterable[str] = GROUP_KINDS,
            head_balance: bool = True,
            reweight: bool = True,
            threshold: float = 0.5,
            min_keep: int = 1,
    ) -> None:
        super().__init__()
        kinds = tuple(kinds)
        unknown = set(kinds) - set(GROUP_KINDS)
        if unknown:
            raise ConfigError(f'unknown group kind(s) {sorted(unknown)}; choose from {list(GROUP_KINDS)}')
        self.model = [model]  # a list: not registered as a submodule (the pruner's state dict is the indicators)
        self.input_size = tuple(input_size)
        self.adapters: list[Adapter] = find_adapters(model)
        if not self.adapters:
            raise ConfigError(f'{type(model).__name__} has no module AMAP knows how to prune; '
                              'write an adapter for its attention type (amap.prune.adapters.register_adapter)')
        self.indicators = nn.ModuleDict()
        self._groups: dict[str, tuple[Adapter, ChannelGroup]] = {}
        for adapter in self.adapters:
            for group in adapter.groups():
                if group.kind in kinds:
                    key = _key(group)
                    self.indicators[key] = ChannelIndicator(
                        group, head_balance=head_balance, reweight=reweight, threshold=threshold, min_keep=min_keep)
                    self._groups[key] = (adapter, group)
        if not self.indicators:
            present = sorted({g.kind for a in self.adapters for g in a.groups()})
            raise ConfigError(f'{type(model).__name__} has no prunable group of kind {list(kinds)} (it has {present}); '
                              'prune one of those kinds')
        device = next(model.parameters()).device
        self.to(device)
        self.attach()
        self._probe(model, device)
        report = count_macs(model, self.input_size, device=device)
        full = report.total
        self._warn_unadapted(model, report)
        with torch.no_grad():
            self.full_macs = float(full)
            self.fixed_macs = self.full_macs - float(sum(a.macs({}) for a in self.adapters))
        #: What targets are counted in (see :mod:`amap.prune.resource`); MACs unless replaced.
        self.resource: Resource = MacResource(self.full_macs, self.fixed_macs)

    def _warn_unadapted(self, model: nn.Module, report) -> None:
        """Say which attention modules no adapter prunes and their share of the MACs (a partial prune is never
        silent; said before any search)."""
        skipped = unadapted_attention(model, self.adapters)
        if not skipped:
            return
        share = sum(report.macs_under(n) for ns in skipped.values() for n in ns) / max(report.total, 1)
        kinds = ', '.join(f'{len(ns)} x {kind} ({ns[0]}{", ..." if len(ns) > 1 else ""})'
                          for kind, ns in skipped.items())
        _logger.warning('%s has attention modules AMAP cannot prune (no adapter): %s; they stay as they are, %.1f%% of '
                        'the MACs (write an adapter: amap.prune.adapters.register_adapter)', type(model).__name__,
                        kinds, 100 * share)

    # -------------------------------------------------------------------------------------------------------- hooks
    def attach(self) -> None:
        """(Re)install the gates of every adapter."""
        for adapter in self.adapters:
            adapter.attach({g.kind: self.indicators[_key(g)] for g in adapter.groups() if _key(g) in self.indicators})

    def detach(self) -> None:
        """Remove every gate: the model is back to its unpruned function."""
        for adapter in self.adapters:
            adapter.detach()

    @torch.no_grad()
    def _probe(self, model: nn.Module, device: torch.device) -> None:
        was_training = model.training
        model.eval()
        try:
            model(torch.zeros(1, *self.input_size, device=device))
        except Exception as e:  # noqa: BLE001 - re-raised as a user error with the reason
            raise ConfigError(f'{type(model).__name__} does not run on input {self.input_size}: {e}') from e
        finally:
            model.train(was_training)
        missing = [a.name for a in self.adapters if a.tokens is None]
        if missing:
            raise ConfigError(f'modules {missing[:3]} did not run in a forward pass; they cannot be pruned')

    # ---------------------------------------------------------------------------------------------------- accessors
    def groups(self) -> dict[str, ChannelGroup]:
        """``{indicator key: group}``."""
        return {k: g for k, (_, g) in self._groups.items()}

    def adapter_of(self, key: str) -> Adapter:
        return self._groups[key][0]

    def indicator_parameters(self) -> list[nn.Parameter]:
        return [ind.m for ind in self.indicators.values()]

    def reweight_parameters(self) -> list[nn.Parameter]:
        return [ind.reweight for ind in self.indicators.values() if ind.reweight is not None]

    # --------------------------------------------------------------------------------------------------------- MACs
    def _kept_of(self, adapter: Adapter, counts: dict[str, Tensor] | None) -> dict[str, Tensor]:
        kept = {}
        for g in adapter.groups():
            key = _key(g)
            if key in self.indicators:
                kept[g.kind] = (self.indicators[key].kept() if counts is None else counts[key]).double()
        return kept

    def macs(self, counts: dict[str, Tensor] | None = None) -> Tensor:
        """MACs per image of the gated model; differentiable in the indicators when ``counts`` is None.

        Args:
            counts: Optional ``{indicator key: (H,) kept counts}`` to evaluate a hypothetical structure.
        """
        return self._total(self.fixed_macs, lambda a, kept: a.macs(kept), counts)

    def cost(self, counts: dict[str, Tensor] | None = None, *, exact: bool = False,
             resource: Resource | None = None) -> Tensor:
        """Cost of the gated model in :attr:`resource` units (or ``resource``'s); differentiable in the indicators
        when ``counts`` is None (see :meth:`macs`). ``exact`` is the step-shaped cost an integer structure really has
        (for latency), else the smooth one the search follows."""
        r = self.resource if resource is None else resource
        return r.total(self._total(r.fixed, lambda a, kept: r.adapter_cost(a, kept, exact=exact), counts))

    def _total(self, fixed: float, per_adapter, counts: dict[str, Tensor] | None) -> Tensor:
        device = next(iter(self.indicators.values())).m.device
        if counts is not None:
            counts = {k: c.to(device) for k, c in counts.items()}
        total = torch.tensor(fixed, device=device, dtype=torch.float64)  # exact integers up to 2**53
        for adapter in self.adapters:
            total = total + per_adapter(adapter, self._kept_of(adapter, counts))
        return total

    def adapter_macs(self, adapter: Adapter, counts: dict[str, Tensor]) -> float:
        return float(adapter.macs(self._kept_of(adapter, counts)))

    def adapter_cost(self, adapter: Adapter, counts: dict[str, Tensor]) -> float:
        """Exact cost of one adapter's module at ``counts`` in :attr:`resource` units."""
        return float(self.resource.adapter_cost(adapter, self._kept_of(adapter, counts), exact=True))

    @torch.no_grad()
    def hard_counts(self) -> dict[str, Tensor]:
        """``{key: (H,) kept counts}`` of the current hard masks."""
        return {k: ind.hard_mask().sum(-1).long() for k, ind in self.indicators.items()}

    @torch.no_grad()
    def hard_macs(self) -> float:
        """MACs per image of the current hard structure."""
        return float(self.macs(self.hard_counts()))

    # ---------------------------------------------------------------------------------------------------- structure
    @torch.no_grad()
    def keep(self) -> dict[str, dict[str, Tensor]]:
        """``{module name: {kind: LongTensor (H, k)}}`` kept channel indices; requires head-balanced masks."""
        out: dict[str, dict[str, Tensor]] = {}
        for key, (adapter, group) in self._groups.items():
            indices = self.indicators[key].keep_indices()
            widths = {i.numel() for i in indices}
            if len(widths) != 1:
                raise ConfigError(f'heads of {group.key} keep different channel counts {sorted(widths)}: '
                                  'a physical model needs head balance (or pad_heads=True in surgery)')
            out.setdefault(adapter.name, {})[group.kind] = torch.stack(indices)
        return out

    @torch.no_grad()
    def structure(self) -> list[dict]:
        """Per group: module, kind, heads, original and kept channels per head."""
        records = []
        for key, (_, group) in self._groups.items():
            counts = self.indicators[key].hard_mask().sum(-1).long().tolist()
            records.append({'module': group.module, 'kind': group.kind, 'heads': group.num_heads, 'dim': group.dim,
                         'kept': counts})
        return records
