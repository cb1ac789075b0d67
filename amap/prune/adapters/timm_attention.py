"""Adapters for timm's softmax attention: ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

Where the gates act (all exact):

* ``qk``: on the q and k rows of the qkv projection (a zero q/k channel adds nothing to ``q . k``); the reweight
  scales the q rows only and folds into them;
* ``v``: on the input columns of ``proj`` (each output channel of a head depends on its own v channel only); the
  reweight folds into them.

Both scale the weights (:meth:`~amap.prune.adapters.base.Adapter.gate_linear`), not the activations.

The pruned modules keep the original softmax scale ``head_dim ** -0.5``.
"""
from __future__ import annotations

import copy

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import Tensor, nn

from ..groups import ChannelGroup
from ..modules import PrunedAttention, PrunedWindowAttention
from .base import Adapter, Keep, full_counts, head_rows, row_factor, row_norms, slice_linear

__all__ = ['SoftmaxAttentionAdapter', 'WindowAttentionAdapter']


class SoftmaxAttentionAdapter(Adapter):
    """timm ``Attention`` (ViT, DeiT) and our :class:`~amap.prune.modules.PrunedAttention`."""

    module_types = (Attention, PrunedAttention)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if type(module) is PrunedWindowAttention:
            return False
        if isinstance(module, Attention):
            # q/k norms, a norm before proj or an output gate mix channels: removal would not be exact.
            return getattr(module, 'gate', None) is None
        return isinstance(module, PrunedAttention)

    # ------------------------------------------------------------------------------------------------- structure
    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def qk_dim(self) -> int:
        return getattr(self.module, 'qk_dim', None) or self.module.head_dim

    @property
    def v_dim(self) -> int:
        return getattr(self.module, 'v_dim', None) or self.module.head_dim

    @property
    def in_dim(self) -> int:
        return self.module.qkv.in_features

    @property
    def out_dim(self) -> int:
        return self.module.proj.out_features

    def groups(self) -> list[ChannelGroup]:
        m = self.module
        out = []
        if isinstance(getattr(m, 'q_norm', nn.Identity()), nn.Identity) and \
                isinstance(getattr(m, 'k_norm', nn.Identity()), nn.Identity):
            out.append(ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim))
        if isinstance(getattr(m, 'norm', nn.Identity()), nn.Identity):
            out.append(ChannelGroup(self.name, 'v', self.num_heads, self.v_dim))
        return out

    # ------------------------------------------------------------------------------------------------------ gates
    def _install(self) -> None:
        m, n = self.module, self.num_heads * self.qk_dim
        if 'qk' in self.indicators:
            def rows() -> Tensor | None:
                f = self.qk_row_factors()
                return row_factor(m.qkv.out_features, [(0, f['q']), (n, f['k'])])

            self.gate_linear(m.qkv, rows=rows, record_out=self._record_qk)
        if 'v' in self.indicators:
            self.gate_linear(m.proj, cols=lambda: self.scale('v'), record_in=lambda x: self.record('v', x))

    def _record_qk(self, out: Tensor) -> None:
        n = self.num_heads * self.qk_dim
        self.record('qk', out[..., :n], 'q')
        self.record('qk', out[..., n:2 * n], 'k')

    # ------------------------------------------------------------------------------------------------------- MACs
    def _attention_macs(self, dq: Tensor, dv: Tensor) -> Tensor:
        """Attention matmuls per image: ``H * n^2 * (dq + dv)`` summed over heads and windows."""
        n = self.tokens
        windows = self.batch_rows  # probe batch size is 1: rows of the module input = windows per image
        return windows * n * n * (dq.sum() + dv.sum())

    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        dq = kept['qk'] if 'qk' in kept else full_counts(self.num_heads, self.qk_dim, kept)
        dv = kept['v'] if 'v' in kept else full_counts(self.num_heads, self.v_dim, kept)
        rows = self.batch_rows * self.tokens  # tokens per image
        proj = rows * dv.sum() * self.out_dim
        qkv = rows * self.in_dim * (2 * dq.sum() + dv.sum())
        return qkv + proj + self._attention_macs(dq, dv)

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        m = self.module
        H, nq = self.num_heads, self.num_heads * self.qk_dim
        if kind == 'qk':
            norms = row_norms(m.qkv.weight, slice(0, nq), p) + row_norms(m.qkv.weight, slice(nq, 2 * nq), p)
            return norms.reshape(H, -1)
        v = row_norms(m.qkv.weight, slice(2 * nq, None), p) + row_norms(m.proj.weight.t(), slice(None), p)
        return v.reshape(H, -1)

    # ---------------------------------------------------------------------------------------------------- surgery
    def _sliced(self, target: PrunedAttention, keep: Keep) -> PrunedAttention:
        m = self.module
        kq = self._full_keep('qk', keep)
        kv = self._full_keep('v', keep)
        nq = self.num_heads * self.qk_dim
        rows = torch.cat([head_rows(kq, self.qk_dim), head_rows(kq, self.qk_dim, nq),
                          head_rows(kv, self.v_dim, 2 * nq)])
        rw_q = self._fold('qk', keep)
        row_scale = None
        if rw_q is not None:
            row_scale = torch.ones(rows.numel(), device=rw_q.device)
            row_scale[:rw_q.numel()] = rw_q
        target.qkv = slice_linear(m.qkv, rows=rows, row_scale=row_scale)
        target.proj = slice_linear(m.proj, cols=head_rows(kv, self.v_dim), col_scale=self._fold('v', keep))
        return target

    def _full_keep(self, kind: str, keep: Keep) -> Tensor:
        if kind in keep:
            return keep[kind]
        d = self.qk_dim if kind == 'qk' else self.v_dim  # all channels, also of a group that is not prunable
        return torch.arange(d).expand(self.num_heads, d)

    def _widths(self, keep: Keep) -> tuple[int, int]:
        return self._full_keep('qk', keep).shape[1], self._full_keep('v', keep).shape[1]

    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        new = PrunedAttention(
            self.in_dim, self.num_heads, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim),
            scale=float(m.scale), qkv_bias=m.qkv.bias is not None, proj_bias=m.proj.bias is not None,
            dim_out=self.out_dim, attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p,
            fused_attn=bool(getattr(m, 'fused_attn', True)))
        for name in ('q_norm', 'k_norm', 'norm'):  # qk_norm / scale_norm: their groups are not pruned (groups())
            norm = getattr(m, name, None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                setattr(new, name, copy.deepcopy(norm))
        return new

    def shrink(self, keep: Keep) -> nn.Module:
        dq, dv = self._widths(keep)
        target = self.build({'qk': dq, 'v': dv}).to(self.module.qkv.weight.device)
        return self._sliced(target, keep)


class WindowAttentionAdapter(SoftmaxAttentionAdapter):
    """timm Swin ``WindowAttention`` (relative position bias stays per head) and its pruned form."""

    module_types = (WindowAttention, PrunedWindowAttention)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_types)

    @property
    def qk_dim(self) -> int:
        m = self.module
        return getattr(m, 'qk_dim', None) or m.qkv.out_features // (3 * m.num_heads)

    @property
    def v_dim(self) -> int:
        m = self.module
        return getattr(m, 'v_dim', None) or m.qkv.out_features // (3 * m.num_heads)

    def groups(self) -> list[ChannelGroup]:
        return [ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim),
                ChannelGroup(self.name, 'v', self.num_heads, self.v_dim)]

    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        return PrunedWindowAttention(
            self.in_dim, self.num_heads, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim),
            scale=float(m.scale), window_size=tuple(m.window_size), qkv_bias=m.qkv.bias is not None,
            attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p, fused_attn=bool(getattr(m, 'fused_attn', True)))

    def shrink(self, keep: Keep) -> nn.Module:
        target = super().shrink(keep)
        with torch.no_grad():
            target.relative_position_bias_table.copy_(self.module.relative_position_bias_table)
        return target
