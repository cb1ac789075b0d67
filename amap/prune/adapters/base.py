"""The adapter contract: how the pruner reaches one kind of attention or MLP module.

An adapter wraps one module of a known type and exposes

* its prunable :class:`~amap.prune.groups.ChannelGroup` s;
* gates: during the search each group's channels are multiplied by the indicator's mask (and reweight) at a place
  where removing the channel is *exact* (the masked model and the sliced model compute the same function). Where the
  channel is a row or column of a Linear, the factor scales the *weight* (:meth:`Adapter.gate_linear`), which costs
  O(weights) per step instead of O(batch x tokens x channels) for scaling the activation and its gradient; only
  FLatten's qk mask, applied after the focusing function, acts on activations;
* recording: the gates hand the activations at the gate, ungated, to a recorder (similarity weights,
  initialisation);
* its MACs as an analytic, differentiable function of the channels kept per head;
* surgery: a physically smaller replacement module with the reweights folded in, and the same structure without
  weights (to rebuild a saved pruned model).

The pruner has no per-model code; supporting a new attention type means writing one adapter and registering it.
"""
from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..groups import ChannelGroup
from ..indicator import ChannelIndicator

__all__ = ['Adapter', 'Recorder', 'Keep', 'row_factor']

# recorder(group_key, activation (..., h * d) head-major, role, first_head): role is 'q' / 'k' for qk groups, else the
# kind; the activation may cover only heads first_head .. first_head + h - 1 of the group (e.g. one CSwin branch)
Recorder = Callable[[str, Tensor, str, int], None]
# kept channel indices per head, per group kind: {'qk': LongTensor (H, k), ...}
Keep = dict[str, Tensor]


def row_factor(size: int, parts: list[tuple[int, Tensor | None]]) -> Tensor | None:
    """A ``(size,)`` factor that is ``factor`` from each ``(offset, factor)`` part on and one elsewhere (None when every
    part is None)."""
    parts = sorted(((o, f) for o, f in parts if f is not None), key=lambda part: part[0])
    if not parts:
        return None
    pieces, at = [], 0
    for offset, f in parts:
        if offset > at:
            pieces.append(f.new_ones(offset - at))
        pieces.append(f)
        at = offset + f.numel()
    if at < size:
        pieces.append(parts[-1][1].new_ones(size - at))
    return torch.cat(pieces)


class Adapter(ABC):
    """Base class of all adapters.

    Args:
        name: Qualified name of the module in the model.
        module: The module.
    """

    #: Module classes this adapter handles (exact type or subclass).
    module_types: tuple[type, ...] = ()
    #: Whether modules inside the matched module are left alone (False lets e.g. a block's MLP get its own adapter).
    claims_subtree: bool = True

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.indicators: dict[str, ChannelIndicator] = {}
        self.recorder: Recorder | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._restore: list[Callable[[], None]] = []
        self.tokens: int | None = None  # tokens per image seen by the module (set by the probe)

    # ----------------------------------------------------------------------------------------------------- matching
    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """Whether this adapter handles ``module``."""
        return isinstance(module, cls.module_types)

    # ------------------------------------------------------------------------------------------------------- groups
    @abstractmethod
    def groups(self) -> list[ChannelGroup]:
        """The module's prunable groups (may be empty when nothing can be removed exactly)."""

    # -------------------------------------------------------------------------------------------------------- gates
    def attach(self, indicators: dict[str, ChannelIndicator]) -> None:
        """Install the gates of the given groups (keyed by kind) and the shape probe."""
        self.detach()
        self.indicators = indicators
        self._handles.append(self.module.register_forward_pre_hook(self._probe, with_kwargs=True))
        self._install()

    def detach(self) -> None:
        """Remove every hook and restore replaced slots."""
        for h in self._handles:
            h.remove()
        for undo in self._restore:
            undo()
        self._handles, self._restore = [], []

    @abstractmethod
    def _install(self) -> None:
        """Register the gate hooks for ``self.indicators``."""

    def _probe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._record_shape(args[0] if args else next(iter(kwargs.values())))

    def _record_shape(self, x: Tensor) -> None:
        """Remember the tokens per image from the module's first input (probe forward with batch size 1)."""
        if self.tokens is None and isinstance(x, Tensor):
            self.tokens = x.shape[-2] if x.dim() >= 3 else 1
            self.batch_rows = x.shape[0]

    def gate_linear(
            self,
            linear: nn.Linear,
            *,
            rows: Callable[[], Tensor | None] | None = None,
            cols: Callable[[], Tensor | None] | None = None,
            record_in: Callable[[Tensor], None] | None = None,
            record_out: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Gate a Linear through its weights until :meth:`detach`.

        ``linear`` computes ``x @ (W * cols)^T * rows`` (bias times ``rows``): exactly what scaling its input
        channels by ``cols()`` and its outputs by ``rows()`` computes, at the cost of scaling the weight. A factor
        callable may return None (no factor). While a recorder is set, ``record_in(input)`` and ``record_out(ungated
        output)`` see what activation gates would have seen. One call per Linear: a second one replaces the first.
        """
        def forward(module: nn.Linear, x: Tensor) -> Tensor:
            if self.recorder is not None:
                if record_in is not None:
                    record_in(x)
                if record_out is not None:
                    with torch.no_grad():
                        record_out(F.linear(x, module.weight, module.bias))
            w, b = module.weight, module.bias
            c = cols() if cols is not None else None
            if c is not None:
                w = w * c
            r = rows() if rows is not None else None
            if r is not None:
                w = w * r.unsqueeze(1)
                b = b * r if b is not None else None
            return F.linear(x, w, b)

        # bound to the Linear (a deep copy rebinds to the copy's weights); removed again by detach
        linear.forward = types.MethodType(forward, linear)
        self._restore.append(lambda: linear.__dict__.pop('forward', None))

    def qk_row_factors(self) -> dict[str, Tensor]:
        """Softmax attention's qk gate as row factors, the mask computed once: q rows by mask x reweight, k rows by
        the mask."""
        mask, rw = self.mask('qk'), self.reweight('qk')
        return {'q': mask if rw is None else mask * rw, 'k': mask}

    def scale(self, kind: str) -> Tensor | None:
        """The flattened channel factor (mask x reweight) of a group, or None when the group is not gated."""
        ind = self.indicators.get(kind)
        return None if ind is None else ind.channel_scale().flatten()

    def mask(self, kind: str) -> Tensor | None:
        """The flattened mask of a group (without reweight)."""
        ind = self.indicators.get(kind)
        return None if ind is None else ind.mask().flatten()

    def reweight(self, kind: str) -> Tensor | None:
        """The flattened factor where a group's reweights act: the reweights, times the search's ramp gate while it is
        on (:meth:`~amap.prune.indicator.ChannelIndicator.reweight_scale`); None when there is none."""
        ind = self.indicators.get(kind)
        rw = None if ind is None else ind.reweight_scale()
        return None if rw is None else rw.flatten()

    def record(self, kind: str, x: Tensor, role: str | None = None, first_head: int = 0) -> None:
        """Hand an activation at a gate to the recorder (if any)."""
        if self.recorder is not None and kind in self.indicators:
            self.recorder(f'{self.name}.{kind}', x.detach(), role or kind, first_head)

    # --------------------------------------------------------------------------------------------------------- MACs
    @abstractmethod
    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        """MACs per image as a differentiable function of the kept channels per head.

        Args:
            kept: ``{kind: (H,) kept counts}`` for the gated groups; missing kinds are at full width.
        """

    # ------------------------------------------------------------------------------------------------------ surgery
    def shrink(self, keep: Keep) -> nn.Module:
        """A physically smaller module computing what the gated module computes, reweights folded in: the module
        :meth:`build` makes for ``widths_of(keep)``, loaded with the module's state where :meth:`sliced_state`
        replaces the sliced entries.

        Args:
            keep: ``{kind: LongTensor (H, k)}`` kept channel indices per head (ascending); missing kinds keep all.
        """
        p = next(self.module.parameters())
        with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the random streams alone
            new = self.build(self.widths_of(keep))
        new = new.to(device=p.device, dtype=p.dtype)
        state = {k: v.detach() for k, v in self.module.state_dict().items()}
        state.update(self.sliced_state(keep))
        new.load_state_dict(state, strict=True)
        return new

    @abstractmethod
    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        """The state-dict entries of the module that slicing changes (kept channels only, reweights folded in)."""

    @abstractmethod
    def build(self, widths: dict[str, int]) -> nn.Module:
        """The pruned module's structure (uninitialised weights) for per-head ``widths`` ({kind: channels})."""

    def widths_of(self, keep: Keep) -> dict[str, int | bool]:
        """What :meth:`build` needs to recreate the pruned module: per-head widths per kind (and adapter extras)."""
        return {kind: int(idx.shape[1]) for kind, idx in keep.items()}

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        """``(H, d)`` L_p norm of each channel's weights (its input-projection rows and output-projection columns);
        the magnitude criterion's scores."""
        raise NotImplementedError(f'{type(self).__name__} does not provide weight norms for {kind!r}')

    def _full_keep(self, kind: str, keep: Keep) -> Tensor:
        if kind in keep:
            return keep[kind]
        g = next(g for g in self.groups() if g.kind == kind)
        return torch.arange(g.dim).expand(g.num_heads, g.dim)

    def _fold(self, kind: str, keep: Keep) -> Tensor | None:
        """Reweight scales of the kept channels, flattened head-major (None when there is no reweight)."""
        ind = self.indicators.get(kind)
        if ind is None or ind.reweight is None or kind not in keep:
            return None
        return torch.gather(ind.reweight.detach(), 1, keep[kind].to(ind.reweight.device)).flatten()


def full_counts(heads: int, width: int, kept: dict[str, Tensor]) -> Tensor:
    """``(heads,)`` float64 counts at full width, on the device of the other kept counts."""
    device = next(iter(kept.values())).device if kept else None
    return torch.full((heads,), float(width), dtype=torch.float64, device=device)


def row_norms(weight: Tensor, rows: Tensor | slice, p: float) -> Tensor:
    """``L_p`` norm of each selected row of a weight matrix."""
    return weight.detach()[rows].flatten(1).norm(p=p, dim=1)
