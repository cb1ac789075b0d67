"""Adapters for the FLatten zoo: focused linear attention (Swin, DeiT, PVT/PVTv2), FLatten's softmax attention
(Swin windows, PVT with spatial reduction) and CSwin blocks (linear or LePE stripe attention in branches).

Where the gates act (all exact):

* ``qk`` of focused linear attention: at the module's ``qk_gate`` hook, i.e. on ``(ReLU(x) + 1e-6) / softplus(scale)``
  before the norm-preserving power -- a zeroed channel adds nothing to the norms nor to the products, exactly as if
  it had been sliced away; the reweight scales the q rows of the projection (before the ReLU, which commutes with a
  positive scale) and folds into them;
* ``qk`` of softmax attention: on the q and k rows of the projection (as for timm);
* ``v``: on the input columns of ``proj`` (each output channel depends on its own v channel only, through the
  attention, the DWC and LePE alike); the reweight folds into them.

Except the linear-attention qk mask, every gate scales projection weights, not activations (``Adapter.gate_linear``).

Surgery slices the projections, ``scale`` and ``positional_encoding`` with the qk channels, the DWC and LePE with the
v channels. When the heads of a layer keep different v channels, the shared DWC is un-shared (one depthwise kernel
per kept channel, copied from the shared bank): same MACs, same function.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...models import flatten_cswin, flatten_pvt, flatten_swin
from ...models.attention import FocusedLinearAttention, HeadDWC
from ..groups import ChannelGroup
from . import register_adapter
from .base import Adapter, Keep, full_counts, head_rows, row_factor, row_norms, slice_linear

__all__ = ['FocusedLinearAttentionAdapter', 'FLattenSoftmaxAdapter', 'CSWinBlockAdapter']


@dataclass
class _Segment:
    """Where a group's channels sit in a projection: ``rows`` offset in ``linear`` (attribute name)."""

    linear: str
    offset: int


class _QKGate(nn.Module):
    """Replaces a module's ``qk_gate`` slot during the search: multiplies q and k by the qk mask (alternate calls are
    q, then k) and hands them to the recorder."""

    def __init__(self, adapter: Adapter, first_head: int, heads: int) -> None:
        super().__init__()
        self.adapter = [adapter]  # a list: do not register the adapter's module as a child
        self.first_head, self.heads = first_head, heads
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        adapter = self.adapter[0]
        role = 'q' if self.calls % 2 == 0 else 'k'
        self.calls += 1
        adapter.record('qk', x, role, self.first_head)
        mask = adapter.indicators['qk'].mask()[self.first_head:self.first_head + self.heads].flatten()
        return x * mask


def _slice_param(p: Tensor, idx: Tensor, dim: int = -1) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, idx.to(p.device)).clone(), requires_grad=p.requires_grad)


def _dwc_stays_shared(dwc: HeadDWC, keep_v: Tensor) -> bool:
    """A shared DWC stays shared when every head keeps the same v channels."""
    return bool(dwc.shared and (keep_v == keep_v[0]).all())


def _sliced_dwc(dwc: HeadDWC, keep_v: Tensor) -> HeadDWC:
    """The DWC for kept v channels ``keep_v`` (H, k): shared when every head keeps the same channels, else un-shared."""
    H, k = keep_v.shape
    same = _dwc_stays_shared(dwc, keep_v)
    new = HeadDWC(k, H, kernel_size=dwc.kernel_size[0], shared=same).to(dwc.weight.device)
    if dwc.shared:
        src = keep_v[0] if same else keep_v.flatten()
    else:
        src = keep_v[0] if same else head_rows(keep_v, dwc.v_dim)
    with torch.no_grad():
        new.weight.copy_(dwc.weight[src.to(dwc.weight.device)])
        new.bias.copy_(dwc.bias[src.to(dwc.weight.device)])
    return new


def _empty_dwc(dwc: HeadDWC, v_dim: int, num_heads: int, shared: bool) -> HeadDWC:
    return HeadDWC(v_dim, num_heads, kernel_size=dwc.kernel_size[0], shared=shared)


def _sliced_depthwise(conv: nn.Conv2d, idx: Tensor) -> nn.Conv2d:
    n = idx.numel()
    new = nn.Conv2d(n, n, conv.kernel_size, conv.stride, conv.padding, groups=n, bias=conv.bias is not None)
    new = new.to(conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(conv.weight[idx.to(conv.weight.device)])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[idx.to(conv.weight.device)])
    return new


class _ProjectionAttentionAdapter(Adapter):
    """Shared logic of attention modules with q/k/v projections and a ``proj``: segments, gating of projection
    rows, slicing and MACs from the linears' recorded token counts."""

    linear_attention = False

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

    def groups(self) -> list[ChannelGroup]:
        la = self.linear_attention
        return [ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim, linear_attention=la),
                ChannelGroup(self.name, 'v', self.num_heads, self.v_dim, linear_attention=la)]

    # --------------------------------------------------------------------------------------------------- probing
    def attach(self, indicators: dict) -> None:
        super().attach(indicators)
        self.rows: dict[str, int] = getattr(self, 'rows', {})
        for name in {s.linear for s in self.segments().values()} | {'proj'}:
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
            self.gate_linear(self.owner.proj, cols=lambda: self.scale('v'), record_in=lambda x: self.record('v', x))

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
                + self.rows['proj'] * dv.sum() * o.proj.out_features)

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
        return (norms + row_norms(o.proj.weight.t(), slice(None), p)).reshape(H, -1)

    # ---------------------------------------------------------------------------------------------------- surgery
    def _slice_projections(self, new: nn.Module, keep: Keep) -> None:
        """Slice the q/k/v projections and ``proj`` of ``new`` (a copy of the owner), folding the reweights."""
        o, seg = self.owner, self.segments()
        kq, kv = self._full_keep('qk', keep), self._full_keep('v', keep)
        rw_q, rw_v = self._fold('qk', keep), self._fold('v', keep)
        parts: dict[str, list[tuple[int, Tensor, Tensor | None]]] = {}
        for role, idx, d in (('q', kq, self.qk_dim), ('k', kq, self.qk_dim), ('v', kv, self.v_dim)):
            rows = head_rows(idx, d, seg[role].offset)
            scale = rw_q if role == 'q' else None
            parts.setdefault(seg[role].linear, []).append((seg[role].offset, rows, scale))
        for name, items in parts.items():
            items.sort(key=lambda t: t[0])
            rows = torch.cat([r for _, r, _ in items])
            row_scale = None
            if any(s is not None for _, _, s in items):
                row_scale = torch.cat([s if s is not None else torch.ones(r.numel(), device=r.device)
                                       for _, r, s in items])
            setattr(new, name, slice_linear(getattr(o, name), rows=rows, row_scale=row_scale))
        new.proj = slice_linear(o.proj, cols=head_rows(kv, self.v_dim), col_scale=rw_v)
        new.qk_dim, new.v_dim = int(kq.shape[1]), int(kv.shape[1])

    def _resize_projections(self, new: nn.Module, dq: int, dv: int) -> None:
        """Give ``new`` (a copy of the owner) empty projections for per-head widths ``dq``/``dv``."""
        o, seg, H = self.owner, self.segments(), self.num_heads
        width: dict[str, int] = {}
        for role, d in (('q', dq), ('k', dq), ('v', dv)):
            width[seg[role].linear] = width.get(seg[role].linear, 0) + H * d
        for name, out in width.items():
            old = getattr(o, name)
            setattr(new, name, nn.Linear(old.in_features, out, bias=old.bias is not None))
        new.proj = nn.Linear(H * dv, o.proj.out_features, bias=o.proj.bias is not None)
        new.qk_dim, new.v_dim = dq, dv


@register_adapter
class FocusedLinearAttentionAdapter(_ProjectionAttentionAdapter):
    """Focused linear attention of FLatten-Swin, FLatten-DeiT and FLatten-PVT/PVTv2."""

    module_types = (FocusedLinearAttention,)
    linear_attention = True

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        # without projections (a CSwin branch) the layer is part of a block, which has its own adapter
        return isinstance(module, FocusedLinearAttention) and module.qkv_layout is not None

    @property
    def focusing_factor(self) -> float:
        return float(self.module.focusing_factor)

    def attach(self, indicators: dict) -> None:
        super().attach(indicators)
        self._handles.append(self.module.dwc.register_forward_pre_hook(self._count_dwc))

    def _count_dwc(self, module: nn.Module, args: tuple) -> None:
        if 'dwc' not in self.rows:
            v, height, width = args[0], args[1], args[2]
            self.rows['dwc'] = v.shape[0] * height * width

    def _install_qk(self) -> None:
        """Linear attention: the mask acts after the focusing function (``qk_gate``, on activations); the reweight
        scales the q rows of the projection."""
        gate = _QKGate(self, 0, self.num_heads)
        self.module.qk_gate = gate
        self._restore.append(lambda: setattr(self.module, 'qk_gate', nn.Identity()))
        self._gate_qk_rows(lambda: {'q': self.reweight('qk')}, roles=('q',), record=False)

    def widths_of(self, keep: Keep) -> dict[str, int | bool]:
        out = super().widths_of(keep)
        out['dwc_shared'] = _dwc_stays_shared(self.module.dwc, self._full_keep('v', keep))
        return out

    def _extra_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        k = self.module.dwc.kernel_size
        return self.rows['dwc'] * dv.sum() * k[0] * k[1]

    def _slice_qk_params(self, new: nn.Module, kq: Tensor) -> None:
        idx = head_rows(kq, self.qk_dim)
        new.scale = _slice_param(self.module.scale, idx)
        new.positional_encoding = _slice_param(self.module.positional_encoding, idx)

    def shrink(self, keep: Keep) -> nn.Module:
        new = copy.deepcopy(self.module)
        new.qk_gate = nn.Identity()
        self._slice_projections(new, keep)
        self._slice_qk_params(new, self._full_keep('qk', keep))
        new.dwc = _sliced_dwc(self.module.dwc, self._full_keep('v', keep))
        return new

    def build(self, widths: dict[str, int]) -> nn.Module:
        dq, dv = widths.get('qk', self.qk_dim), widths.get('v', self.v_dim)
        new = copy.deepcopy(self.module)
        self._resize_projections(new, dq, dv)
        n = self.num_heads * dq
        new.scale = nn.Parameter(torch.zeros(*self.module.scale.shape[:-1], n))
        new.positional_encoding = nn.Parameter(torch.zeros(*self.module.positional_encoding.shape[:-1], n))
        new.dwc = _empty_dwc(self.module.dwc, dv, self.num_heads, bool(widths.get('dwc_shared', True)))
        return new


@register_adapter
class FLattenSoftmaxAdapter(_ProjectionAttentionAdapter):
    """FLatten's softmax attention: Swin window attention (relative position bias per head) and PVT attention
    (optionally with spatial reduction of keys and values)."""

    module_types = (flatten_swin.WindowAttention, flatten_pvt.PvtAttention)

    def shrink(self, keep: Keep) -> nn.Module:
        new = copy.deepcopy(self.module)
        self._slice_projections(new, keep)
        return new

    def build(self, widths: dict[str, int]) -> nn.Module:
        new = copy.deepcopy(self.module)
        self._resize_projections(new, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim))
        return new


@register_adapter
class CSWinBlockAdapter(_ProjectionAttentionAdapter):
    """A CSwin block: ``qkv`` and ``proj`` in the block, heads split over one or two branches of stripe attention
    (focused linear attention with DWC and LePE, or softmax with LePE). The block's MLP has its own adapter."""

    module_types = (flatten_cswin.CSWinBlock,)
    claims_subtree = False

    @property
    def linear_attention(self) -> bool:  # type: ignore[override]
        return self.module.attn_type == 'L'

    @property
    def num_heads(self) -> int:
        return self.module.branch_num * self.module.branch_heads

    @property
    def focusing_factor(self) -> float:
        return float(getattr(self.module.attns[0], 'focusing_factor', 3.0))

    @property
    def windows(self) -> int:
        return 1

    def _install_qk(self) -> None:
        if not self.linear_attention:
            super()._install_qk()
            return
        bh = self.module.branch_heads
        for i, attn in enumerate(self.module.attns):
            attn.qk_gate = _QKGate(self, i * bh, bh)
            self._restore.append(lambda a=attn: setattr(a, 'qk_gate', nn.Identity()))
        self._gate_qk_rows(lambda: {'q': self.reweight('qk')}, roles=('q',), record=False)

    def _matmul_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        L = self.rows['qkv']
        bh = self.module.branch_heads
        total = torch.zeros((), dtype=torch.float64, device=dq.device)
        for i, attn in enumerate(self.module.attns):
            q, v = dq[i * bh:(i + 1) * bh], dv[i * bh:(i + 1) * bh]
            if self.linear_attention:  # linear attention over all L tokens of the map
                total = total + L * q.sum() + 2 * L * (q * v).sum()
            else:
                n = attn.H_sp * attn.W_sp
                total = total + L * n * (q.sum() + v.sum())
        return total

    def _extra_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        L = self.rows['qkv']
        total = L * dv.sum() * 9  # LePE: depthwise 3x3 on v
        if self.linear_attention:
            k = self.module.attns[0].dwc.kernel_size
            total = total + L * dv.sum() * k[0] * k[1]
        return total

    def widths_of(self, keep: Keep) -> dict[str, int | bool]:
        out = super().widths_of(keep)
        if self.linear_attention:
            bh, kv = self.module.branch_heads, self._full_keep('v', keep)
            out['dwc_shared'] = all(_dwc_stays_shared(a.dwc, kv[i * bh:(i + 1) * bh])
                                    for i, a in enumerate(self.module.attns))
        return out

    def shrink(self, keep: Keep) -> nn.Module:
        block = self.module
        new = copy.deepcopy(block)
        self._slice_projections(new, keep)
        kq, kv = self._full_keep('qk', keep), self._full_keep('v', keep)
        bh = block.branch_heads
        for i, (attn, new_attn) in enumerate(zip(block.attns, new.attns)):
            bq, bv = kq[i * bh:(i + 1) * bh], kv[i * bh:(i + 1) * bh]
            new_attn.qk_dim, new_attn.v_dim = int(bq.shape[1]), int(bv.shape[1])
            new_attn.get_v = _sliced_depthwise(attn.get_v, head_rows(bv, self.v_dim))
            if self.linear_attention:
                new_attn.qk_gate = nn.Identity()
                idx = head_rows(bq, self.qk_dim)
                new_attn.scale = _slice_param(attn.scale, idx)
                new_attn.positional_encoding = _slice_param(attn.positional_encoding, idx)
                new_attn.dwc = _sliced_dwc(attn.dwc, bv)
        return new

    def build(self, widths: dict[str, int]) -> nn.Module:
        block = self.module
        dq, dv = widths.get('qk', self.qk_dim), widths.get('v', self.v_dim)
        new = copy.deepcopy(block)
        self._resize_projections(new, dq, dv)
        bh = block.branch_heads
        for attn in new.attns:
            attn.qk_dim, attn.v_dim = dq, dv
            attn.get_v = nn.Conv2d(bh * dv, bh * dv, 3, 1, 1, groups=bh * dv)
            if self.linear_attention:
                attn.scale = nn.Parameter(torch.zeros(*attn.scale.shape[:-1], bh * dq))
                attn.positional_encoding = nn.Parameter(torch.zeros(*attn.positional_encoding.shape[:-1], bh * dq))
                attn.dwc = _empty_dwc(attn.dwc, dv, bh, bool(widths.get('dwc_shared', True)))
        return new
