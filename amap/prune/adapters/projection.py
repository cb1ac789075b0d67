"""The adapter of attention modules with q/k/v projections and an output ``proj``: timm's ``Attention`` and
``WindowAttention``, FLatten's focused linear and softmax attention, CSwin blocks.

It finds q, k and v rows in the projections through :meth:`ProjectionAttentionAdapter.segments` (a fused ``qkv``, or
``q`` and ``kv``), and from there gates them, computes MACs from the token counts the projections see, computes the
magnitude criterion's weight norms and slices the projections. Subclasses say what differs: the attention matmuls
(linear or softmax), extra terms (DWC, LePE), where the qk mask acts, and the extra parameters to slice.

Where the gates act (all exact): ``qk`` of softmax attention on the q and k rows of the projection (the reweight scales
the q rows only and folds into them); ``v`` on the input columns of ``proj`` (each output channel of a head depends on
its own v channel only); both scale weights (:meth:`~amap.prune.adapters.base.Adapter.gate_linear`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..groups import ChannelGroup
from .base import Adapter, Keep, full_counts, row_factor, row_norms
from .slicing import head_rows, linear_params, prefixed

__all__ = ['ProjectionAttentionAdapter']


@dataclass
class _Segment:
    """Where a group's channels sit in a projection: ``rows`` offset in ``linear`` (attribute name)."""

    linear: str
    offset: int


class ProjectionAttentionAdapter(Adapter):
    """Shared logic of attention modules with q/k/v projections and a ``proj``: segments, gating of projection
    rows, slicing and MACs from the linears' recorded token counts."""

    linear_attention = False
    #: Attribute name of the output projection in :attr:`owner`.
    out_proj = 'proj'

    # ---------------------------------------------------------------------------------------------- layout (override)
    @property
    def owner(self) -> nn.Module:
        """The module holding the projections (the adapter's module, or the CSwin block)."""
        return self.module

    def segments(self) -> dict[str, _Segment]:
        """Where q, k and v rows live: ``{'q': _Segment, 'k': ..., 'v': ...}``."""
        o, H, dq = self.owner, self.num_heads, self.qk_dim
        if hasattr(o, 'qkv'):
            return {'q': _Segment('qkv', 0), 'k': _Segment('qkv', H * dq), 'v': _Segment('qkv', 2 * H * dq)}
        return {'q': _Segment('q', 0), 'k': _Segment('kv', 0), 'v': _Segment('kv', H * dq)}

    @property
    def num_heads(self) -> int:
        return self.owner.num_heads

    @property
    def qk_dim(self) -> int:
        return self.owner.qk_dim

    @property
    def v_dim(self) -> int:
        return self.owner.v_dim

    def _full_keep(self, kind: str, keep: Keep) -> Tensor:
        if kind in keep:
            return keep[kind]
        d = self.qk_dim if kind == 'qk' else self.v_dim  # all channels, also of a group that is not prunable
        return torch.arange(d).expand(self.num_heads, d)

    def groups(self) -> list[ChannelGroup]:
        la = self.linear_attention
        return [ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim, linear_attention=la),
                ChannelGroup(self.name, 'v', self.num_heads, self.v_dim, linear_attention=la)]

    # --------------------------------------------------------------------------------------------------- probing
    def attach(self, indicators: dict) -> None:
        super().attach(indicators)
        self.rows: dict[str, int] = getattr(self, 'rows', {})
        for name in {s.linear for s in self.segments().values()} | {self.out_proj}:
            linear = getattr(self.owner, name)
            self._handles.append(linear.register_forward_pre_hook(self._count_rows(name)))

    def _count_rows(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name not in self.rows:
                x = args[0]
                self.rows[name] = x.numel() // x.shape[-1]
        return hook

    # ------------------------------------------------------------------------------------------------------ gates
    def _install(self) -> None:
        if 'qk' in self.indicators:
            self._install_qk()
        if 'v' in self.indicators:
            self.gate_linear(getattr(self.owner, self.out_proj), cols=lambda: self.scale('v'),
                             record_in=lambda x: self.record('v', x))

    def _install_qk(self) -> None:
        """Softmax attention: gate the q and k rows of the projections (q rows also reweighted), recording both."""
        self._gate_qk_rows(self.qk_row_factors, roles=('q', 'k'), record=True)

    def _gate_qk_rows(self, factors: Callable[[], dict[str, Tensor | None]], *, roles: tuple[str, ...],
                      record: bool) -> None:
        """Scale the rows of each role in ``roles`` (``'q'``, ``'k'``) by ``factors()[role]``, in whichever
        projections hold them (``factors`` is called once per projection and forward)."""
        seg, n = self.segments(), self.num_heads * self.qk_dim
        parts: dict[str, list[tuple[str, int]]] = {}
        for role in roles:
            parts.setdefault(seg[role].linear, []).append((role, seg[role].offset))
        for name, ps in parts.items():
            linear = getattr(self.owner, name)

            def rows(linear: nn.Linear = linear, ps: list = ps) -> Tensor | None:
                f = factors()
                return row_factor(linear.out_features, [(offset, f[role]) for role, offset in ps])

            def rec(out: Tensor, ps: list = ps) -> None:
                for role, offset in ps:
                    self.record('qk', out[..., offset:offset + n], role)

            self.gate_linear(linear, rows=rows, record_out=rec if record else None)

    # ------------------------------------------------------------------------------------------------------- MACs
    def _dims(self, kept: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        dq = kept['qk'] if 'qk' in kept else full_counts(self.num_heads, self.qk_dim, kept)
        dv = kept['v'] if 'v' in kept else full_counts(self.num_heads, self.v_dim, kept)
        return dq, dv

    def _projection_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        o, seg = self.owner, self.segments()
        c_in = getattr(o, seg['q'].linear).in_features
        rows_q = self.rows[seg['q'].linear]
        rows_kv = self.rows[seg['k'].linear]
        return (rows_q * c_in * dq.sum() + rows_kv * c_in * (dq.sum() + dv.sum())
                + self.rows[self.out_proj] * dv.sum() * getattr(o, self.out_proj).out_features)

    @property
    def windows(self) -> int:
        """Independent attention problems per image (windows; 1 for global attention)."""
        return self.batch_rows

    def _matmul_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        seg = self.segments()
        w = self.windows
        nq = self.rows[seg['q'].linear] // w
        nk = self.rows[seg['k'].linear] // w
        if self.linear_attention:
            # z = q @ mean(k)^T: nq*dq; kv = k^T @ v: nk*dq*dv; q @ kv: nq*dq*dv (per head and window)
            return w * (nq * dq.sum() + (nk + nq) * (dq * dv).sum())
        return w * nq * nk * (dq.sum() + dv.sum())

    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        dq, dv = self._dims(kept)
        return self._projection_macs(dq, dv) + self._matmul_macs(dq, dv) + self._extra_macs(dq, dv)

    def _extra_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        return torch.zeros((), dtype=torch.float64, device=dq.device)

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        o, seg, H = self.owner, self.segments(), self.num_heads
        if kind == 'qk':
            n = H * self.qk_dim
            norms = sum(row_norms(getattr(o, seg[r].linear).weight, slice(seg[r].offset, seg[r].offset + n), p)
                        for r in ('q', 'k'))
            return norms.reshape(H, -1)
        n = H * self.v_dim
        s = seg['v']
        norms = row_norms(getattr(o, s.linear).weight, slice(s.offset, s.offset + n), p)
        return (norms + row_norms(getattr(o, self.out_proj).weight.t(), slice(None), p)).reshape(H, -1)

    # ---------------------------------------------------------------------------------------------------- surgery
    def _projection_state(self, keep: Keep) -> dict[str, Tensor]:
        """The kept rows of the q/k/v projections and columns of ``proj``, reweights folded in (state-dict entries
        relative to the owner)."""
        o, seg = self.owner, self.segments()
        kq, kv = self._full_keep('qk', keep), self._full_keep('v', keep)
        rw_q, rw_v = self._fold('qk', keep), self._fold('v', keep)
        parts: dict[str, list[tuple[int, Tensor, Tensor | None]]] = {}
        for role, idx, d in (('q', kq, self.qk_dim), ('k', kq, self.qk_dim), ('v', kv, self.v_dim)):
            rows = head_rows(idx, d, seg[role].offset)
            scale = rw_q if role == 'q' else None
            parts.setdefault(seg[role].linear, []).append((seg[role].offset, rows, scale))
        state = prefixed(self.out_proj, linear_params(getattr(o, self.out_proj), cols=head_rows(kv, self.v_dim),
                                                   col_scale=rw_v))
        for name, items in parts.items():
            items.sort(key=lambda t: t[0])
            rows = torch.cat([r for _, r, _ in items])
            scales = [s for _, _, s in items if s is not None]
            row_scale = None
            if scales:
                row_scale = torch.cat([s if s is not None else scales[0].new_ones(r.numel()) for _, r, s in items])
            state.update(prefixed(name, linear_params(getattr(o, name), rows=rows, row_scale=row_scale)))
        return state

    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        return self._projection_state(keep)
