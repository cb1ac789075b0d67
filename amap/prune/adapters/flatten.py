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

import torch
from torch import Tensor, nn

from ...models import flatten_cswin, flatten_pvt, flatten_swin
from ...models.attention import FocusedLinearAttention
from . import register_adapter
from .base import Adapter, Keep
from .projection import ProjectionAttentionAdapter
from .slicing import depthwise_params, dwc_stays_shared, head_dwc_params, head_rows, prefixed, select

__all__ = ['FocusedLinearAttentionAdapter', 'FLattenSoftmaxAdapter', 'CSWinBlockAdapter']


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


@register_adapter
class FocusedLinearAttentionAdapter(ProjectionAttentionAdapter):
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
        out['dwc_shared'] = dwc_stays_shared(self.module.dwc, self._full_keep('v', keep))
        return out

    def _extra_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        k = self.module.dwc.kernel_size
        return self.rows['dwc'] * dv.sum() * k[0] * k[1]

    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        m, kv = self.module, self._full_keep('v', keep)
        idx = head_rows(self._full_keep('qk', keep), self.qk_dim)
        return {**self._projection_state(keep), 'scale': select(m.scale, idx),
                'positional_encoding': select(m.positional_encoding, idx),
                **prefixed('dwc', head_dwc_params(m.dwc, kv, dwc_stays_shared(m.dwc, kv)))}

    def build(self, widths: dict[str, int]) -> nn.Module:
        return self.module.rebuild(qk_dim=widths.get('qk', self.qk_dim), v_dim=widths.get('v', self.v_dim),
                                   dwc_shared=bool(widths.get('dwc_shared', True)))


@register_adapter
class FLattenSoftmaxAdapter(ProjectionAttentionAdapter):
    """FLatten's softmax attention: Swin window attention (relative position bias per head) and PVT attention
    (optionally with spatial reduction of keys and values)."""

    module_types = (flatten_swin.WindowAttention, flatten_pvt.PvtAttention)

    def build(self, widths: dict[str, int]) -> nn.Module:
        return self.module.rebuild(qk_dim=widths.get('qk', self.qk_dim), v_dim=widths.get('v', self.v_dim))


@register_adapter
class CSWinBlockAdapter(ProjectionAttentionAdapter):
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
            out['dwc_shared'] = all(dwc_stays_shared(a.dwc, kv[i * bh:(i + 1) * bh])
                                    for i, a in enumerate(self.module.attns))
        return out

    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        state = self._projection_state(keep)
        kq, kv = self._full_keep('qk', keep), self._full_keep('v', keep)
        bh = self.module.branch_heads
        shared = self.widths_of(keep).get('dwc_shared')
        for i, attn in enumerate(self.module.attns):
            bq, bv = kq[i * bh:(i + 1) * bh], kv[i * bh:(i + 1) * bh]
            state.update(prefixed(f'attns.{i}.get_v', depthwise_params(attn.get_v, head_rows(bv, self.v_dim))))
            if self.linear_attention:
                idx = head_rows(bq, self.qk_dim)
                state[f'attns.{i}.scale'] = select(attn.scale, idx)
                state[f'attns.{i}.positional_encoding'] = select(attn.positional_encoding, idx)
                state.update(prefixed(f'attns.{i}.dwc', head_dwc_params(attn.dwc, bv, shared)))
        return state

    def build(self, widths: dict[str, int]) -> nn.Module:
        return self.module.rebuild(qk_dim=widths.get('qk', self.qk_dim), v_dim=widths.get('v', self.v_dim),
                                   dwc_shared=bool(widths.get('dwc_shared', True)))
