"""The latency model the search and the target guarantee use: measured tables, additive over block modules.

``L(counts) = warp(constant + sum over pruned modules of T_shape(per-head kept counts))``, where ``T_shape`` is a table
of one distinct block shape's module (an attention module as a function of its q/k and v counts per head, an MLP as a
function of its hidden width) measured on the device (:mod:`amap.latency.calibrate`), ``constant`` is what the rest
of the model costs (the measured whole model minus its modules at full width), and ``warp`` is a monotone piecewise
linear map through whole-model measurements (a cut model at large batch can run faster than the sum of its modules
timed alone, because its activations fit caches the full model's do not); without knots it is the identity.

Each table is made monotone (a running maximum along every axis, with a small minimum rise per grid step so that no
segment is flat; data that rise anyway are unchanged) and read two ways:

* smooth (``exact=False``): multilinear through the measured points, extrapolated linearly below the first, so the
  search's resource loss has a non-zero gradient everywhere;
  (or, with ``smooth='fit'``, the table's value at full width plus a least-squares multilinear fit of the whole table
  taken relative to full width: one price per channel over the whole range, so a group whose last channels happen
  to time cheap near full width is not left out of the search's pull);
* exact (``exact=True``): each count rounded up to the width step the device rewards (an unaligned width costs what
  the next aligned one costs, or more) before the lookup -- the step-shaped cost the final structure is selected
  against. On the lattice of aligned counts both readings agree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..prune.adapters import Adapter
from ..prune.resource import Resource

__all__ = ['OpTable', 'LatencyModel', 'monotone', 'SMOOTH']

SMOOTH = ('table', 'fit')  # the readings of the search (PruneConfig.latency_search, but macs)

RAMP = 1e-3  # the least rise per grid step, as a fraction of a table's range: no flat segment, no zero gradient


def monotone(values: Tensor) -> Tensor:
    """``values`` made to rise along every axis by at least ``RAMP`` of their range per grid step: the running
    maximum of ``values - ramp``, plus the ramp. Data that already rise that fast are returned unchanged."""
    v = values.double().clone()
    span = float(v.max() - v.min()) or float(v.abs().max()) or 1.0
    for axis in range(v.dim()):
        shape = [1] * v.dim()
        shape[axis] = v.shape[axis]
        ramp = RAMP * span * torch.arange(v.shape[axis], dtype=v.dtype).reshape(shape)
        v = torch.cummax(v - ramp, dim=axis).values + ramp
    return v


def _through(x: Tensor, knots: list[list[float]], src: int, dst: int) -> Tensor:
    """``x`` mapped through the piecewise linear function of ``knots`` (coordinate ``src`` to ``dst``), linear along
    the end segments outside them; the identity with fewer than two knots. Differentiable in ``x``."""
    if len(knots) < 2:
        return x
    xs = [k[src] for k in knots]
    i = sum(float(x.detach()) >= v for v in xs[1:-1])  # the segment: interior knots at or below x
    (a0, b0), (a1, b1) = (knots[i][src], knots[i][dst]), (knots[i + 1][src], knots[i + 1][dst])
    return b0 + (x - a0) * ((b1 - b0) / (a1 - a0))


@dataclass
class OpTable:
    """Latency (ms) of one block shape's module on a grid of per-head kept counts.

    Attributes:
        kinds: The group kinds of the axes (``('qk', 'v')``, ``('mlp',)``).
        full: Per-head full count of each axis.
        steps: Per-head count step of each axis that keeps the layer width aligned (the exact reading rounds up to
            it).
        grid: Per axis, the ascending per-head counts measured (the last is the full count).
        values: The measured latencies, nested lists indexed by grid position (ms).
    """

    kinds: list[str]
    full: list[int]
    steps: list[int]
    grid: list[list[int]]
    values: Any
    _v: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._v = monotone(torch.tensor(self.values, dtype=torch.float64))
        self._g = [torch.tensor(g, dtype=torch.float64) for g in self.grid]
        self._fit = self._least_squares()

    def _least_squares(self) -> Tensor:
        """Coefficients of the multilinear polynomial (``1, x, y, xy`` for two axes) closest to the table in least
        squares, counts in units of the full count."""
        axes = torch.meshgrid(*[g / f for g, f in zip(self._g, self.full)], indexing='ij')
        basis = _multilinear_basis([a.reshape(-1) for a in axes])
        return torch.linalg.lstsq(basis, self._v.reshape(-1, 1)).solution[:, 0]

    def fitted(self, counts: list[Tensor]) -> Tensor:
        """The smooth reading of ``smooth='fit'``: the table's value at full width plus the least-squares fit's change
        from full width to ``counts``, never less than a small fall per count removed (a count that falls never
        raises the cost, however the fit bends)."""
        device = counts[0].device
        x = [c.double().reshape(1) / f for c, f in zip(counts, self.full)]
        at = _multilinear_basis(x)[0] - _multilinear_basis([torch.ones_like(t) for t in x])[0]
        change = at @ self._fit.to(device)
        least = RAMP * float(self._v.max() - self._v.min()) * sum(t[0] - 1 for t in x)
        return self._v.reshape(-1)[-1].to(device) + torch.where(change <= least, change, least)

    def __call__(self, counts: list[Tensor], *, exact: bool = False) -> Tensor:
        """Latency (ms) at per-head ``counts`` (one 0-d tensor per axis), multilinear between grid points."""
        device = counts[0].device if counts else None
        v = self._v.to(device)
        for x, g, step, full in zip(counts, self._g, self.steps, self.full):
            x = x.double()
            if exact:
                x = torch.clamp(torch.ceil(x.detach() / step - 1e-9) * step, max=full)
            g = g.to(device)
            if len(g) == 1:
                v = v[0]
                continue
            i = torch.clamp(torch.searchsorted(g, x.detach().reshape(1), right=True) - 1, 0, len(g) - 2)[0]
            t = (x - g[i]) / (g[i + 1] - g[i])
            v = (1 - t) * v[i] + t * v[i + 1]
        return v

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith('_')}


def _multilinear_basis(xs: list[Tensor]) -> Tensor:
    """``(n, 2**k)`` products of every subset of the ``k`` coordinate columns ``xs`` (the empty product first)."""
    cols = [torch.ones_like(xs[0])]
    for x in xs:
        cols = cols + [c * x for c in cols]
    return torch.stack(cols, dim=-1)


class LatencyModel(Resource):
    """Latency (ms per batch) as a function of the kept counts: the :class:`~amap.prune.resource.Resource` a latency
    target is set in.

    Args:
        tables: ``{shape key: OpTable}``, one per distinct block shape.
        modules: ``{adapter (module) name: shape key}`` of every pruned module.
        constant: Latency of everything else (ms).
        full: Measured latency of the unpruned model (ms); ``constant + sum of the tables at full width``.
        step: The width step the device rewards (the final structure's widths are multiples of it).
        warp: ``[[additive ms, measured ms], ...]``, ascending in both: whole models measured against what the
            additive part predicts for them; the cost is interpolated through them (extrapolated along the end
            segments). Empty: the identity.
        meta: How it was measured (device, backend, threads, batch, rounds, split-half noise, seconds).
        smooth: How the search reads the tables (``exact=False``): table (multilinear through the measured points)
            or fit (the value at full width plus a least-squares multilinear fit relative to it).
    """

    name = 'latency'

    def __init__(self, tables: dict[str, OpTable], modules: dict[str, str], *, constant: float, full: float,
                 step: int, warp: list[list[float]] | None = None, meta: dict[str, Any] | None = None,
                 smooth: str = 'table') -> None:
        if smooth not in SMOOTH:
            raise ValueError(f'smooth must be one of {list(SMOOTH)}, got {smooth!r}')
        self.smooth = smooth
        self.tables, self.modules = tables, modules
        self.fixed, self.full, self.step = float(constant), float(full), int(step)
        self.warp = [[float(a), float(b)] for a, b in (warp or [])]
        for (a0, b0), (a1, b1) in zip(self.warp, self.warp[1:]):
            if not (a1 > a0 and b1 > b0):
                raise ValueError(f'latency warp knots must ascend in both coordinates: {self.warp}')
        self.meta = dict(meta or {})

    def total(self, additive: Tensor) -> Tensor:
        return _through(additive, self.warp, 0, 1)

    def additive(self, value: float) -> float:
        return float(_through(torch.tensor(float(value), dtype=torch.float64), self.warp, 1, 0))

    def adapter_cost(self, adapter: Adapter, kept: dict[str, Tensor], *, exact: bool) -> Tensor:
        key = self.modules.get(adapter.name)
        if key is None:  # not timed on its own: part of the constant
            return torch.zeros((), dtype=torch.float64)
        table = self.tables[key]
        xs = [kept[k].double().mean() if k in kept else torch.tensor(float(f), dtype=torch.float64)
              for k, f in zip(table.kinds, table.full)]
        return table.fitted(xs) if self.smooth == 'fit' and not exact else table(xs, exact=exact)

    def format(self, value: float) -> str:
        return f'{value:.3g} ms'

    def raise_target(self, ratio: float) -> str:
        return f'raise --target to at least {ratio:.3f} (--speedup at most {math.floor(100 / ratio) / 100:.2f})'

    @property
    def noise(self) -> float:
        """Split-half disagreement of the calibration (a fraction; 0.03 is 3%)."""
        return float(self.meta.get('noise', 0.0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (:meth:`from_dict` reads it back)."""
        return {'tables': {k: t.to_dict() for k, t in self.tables.items()}, 'modules': self.modules,
                'constant': self.fixed, 'full': self.full, 'step': self.step, 'warp': self.warp, 'meta': self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        return cls({k: OpTable(**t) for k, t in d['tables'].items()}, dict(d['modules']), constant=d['constant'],
                   full=d['full'], step=d['step'], warp=d.get('warp'), meta=d.get('meta'))

    def ratio(self, value: float) -> float:
        return value / self.full if self.full > 0 else math.nan
