"""Adapters for torchvision's vision transformers: the ``nn.MultiheadAttention`` of ``VisionTransformer``
(``vit_b_16`` ...) and Swin's ``ShiftedWindowAttention`` (``swin_t`` ...). Their MLPs (torchvision ``MLP``) are
handled by :class:`~amap.prune.adapters.mlp.MlpAdapter`.

Neither module calls its projections as modules (``nn.MultiheadAttention`` holds the in-projection as a parameter,
``shifted_window_attention`` applies ``F.linear`` to the weights), so during the search each adapter replaces the
module's ``forward`` (restored by ``detach``) by the forward of its pruned drop-in form
(:mod:`amap.prune.dropin`), which computes the same function: ``ShiftedWindowAttention`` then calls ``qkv`` and
``proj`` as modules and is a :class:`~amap.prune.adapters.projection.ProjectionAttentionAdapter` like timm's Swin; the
in-projection of ``nn.MultiheadAttention`` is gated here, by rows of its weight, as
:meth:`~amap.prune.adapters.base.Adapter.gate_linear` gates a Linear.
"""
from __future__ import annotations

import types
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

from ..dropin import PrunedMultiheadAttention, PrunedShiftedWindowAttention, shifted_window_forward
from ..groups import ChannelGroup
from .base import Adapter, Keep, full_counts, row_factor, row_norms
from .slicing import head_rows, linear_params, prefixed
from .timm_attention import HeadWidths, WindowAttentionAdapter

__all__ = ['MultiheadAttentionAdapter', 'ShiftedWindowAttentionAdapter']


class MultiheadAttentionAdapter(HeadWidths, Adapter):
    """Batch-first self-attention ``nn.MultiheadAttention`` (one in-projection, no ``bias_k`` / ``add_zero_attn``)
    and :class:`~amap.prune.dropin.PrunedMultiheadAttention`."""

    module_types = (nn.MultiheadAttention, PrunedMultiheadAttention)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if isinstance(module, PrunedMultiheadAttention):
            return True
        return (isinstance(module, nn.MultiheadAttention) and module.batch_first and module._qkv_same_embed_dim
                and module.bias_k is None and not module.add_zero_attn)

    # ------------------------------------------------------------------------------------------------- structure
    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    @property
    def softmax_scale(self) -> float:
        return getattr(self.module, 'scale', None) or self.module.head_dim ** -0.5

    @property
    def in_proj(self) -> SimpleNamespace:
        """The in-projection as a Linear-like ``weight`` / ``bias`` pair (what the slicing primitives read)."""
        return SimpleNamespace(weight=self.module.in_proj_weight, bias=self.module.in_proj_bias)

    def groups(self) -> list[ChannelGroup]:
        return [ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim),
                ChannelGroup(self.name, 'v', self.num_heads, self.v_dim)]

    def _full_keep(self, kind: str, keep: Keep) -> Tensor:
        if kind in keep:
            return keep[kind]
        d = self.qk_dim if kind == 'qk' else self.v_dim
        return torch.arange(d).expand(self.num_heads, d)

    # ------------------------------------------------------------------------------------------------------ gates
    def _install(self) -> None:
        m, adapter = self.module, self
        n = self.num_heads * self.qk_dim
        attend = PrunedMultiheadAttention.attend
        shape = SimpleNamespace(num_heads=self.num_heads, qk_dim=self.qk_dim, v_dim=self.v_dim,
                                scale=self.softmax_scale, dropout=m.dropout, training=False)

        def forward(module: nn.Module, query: Tensor, *args, **kwargs) -> tuple[Tensor, None]:
            w, b = module.in_proj_weight, module.in_proj_bias
            if adapter.recorder is not None:
                with torch.no_grad():
                    out = F.linear(query, w, b)
                adapter.record('qk', out[..., :n], 'q')
                adapter.record('qk', out[..., n:2 * n], 'k')
            f = adapter.qk_row_factors() if 'qk' in adapter.indicators else None
            rows = row_factor(w.shape[0], [(0, f['q']), (n, f['k'])]) if f is not None else None
            if rows is not None:
                w = w * rows.unsqueeze(1)
                b = b * rows if b is not None else None
            shape.training = module.training
            x = attend(shape, query, w, b)
            adapter.record('v', x)
            wo = module.out_proj.weight
            c = adapter.scale('v')
            return F.linear(x, wo if c is None else wo * c, module.out_proj.bias), None

        m.forward = types.MethodType(forward, m)
        self._restore.append(lambda: m.__dict__.pop('forward', None))

    # ------------------------------------------------------------------------------------------------------- MACs
    def macs(self, kept: dict[str, Tensor]) -> Tensor:
        dq = kept['qk'] if 'qk' in kept else full_counts(self.num_heads, self.qk_dim, kept)
        dv = kept['v'] if 'v' in kept else full_counts(self.num_heads, self.v_dim, kept)
        rows, c = self.batch_rows * self.tokens, self.module.embed_dim
        return rows * c * (2 * dq.sum() + dv.sum()) + rows * self.tokens * (dq.sum() + dv.sum()) + rows * dv.sum() * c

    def weight_norms(self, kind: str, p: float = 1.0) -> Tensor:
        w, H = self.module.in_proj_weight, self.num_heads
        n = H * self.qk_dim
        if kind == 'qk':
            return (row_norms(w, slice(0, n), p) + row_norms(w, slice(n, 2 * n), p)).reshape(H, -1)
        v = row_norms(w, slice(2 * n, None), p) + row_norms(self.module.out_proj.weight.t(), slice(None), p)
        return v.reshape(H, -1)

    # ---------------------------------------------------------------------------------------------------- surgery
    def sliced_state(self, keep: Keep) -> dict[str, Tensor]:
        kq, kv = self._full_keep('qk', keep), self._full_keep('v', keep)
        n = self.num_heads * self.qk_dim
        rows = torch.cat([head_rows(kq, self.qk_dim), head_rows(kq, self.qk_dim, n), head_rows(kv, self.v_dim, 2 * n)])
        rw_q = self._fold('qk', keep)
        scale = None if rw_q is None else torch.cat([rw_q, rw_q.new_ones(rows.numel() - rw_q.numel())])
        inp = linear_params(self.in_proj, rows=rows, row_scale=scale)
        state = {'in_proj_weight': inp['weight']}
        if 'bias' in inp:
            state['in_proj_bias'] = inp['bias']
        out = linear_params(self.module.out_proj, cols=head_rows(kv, self.v_dim), col_scale=self._fold('v', keep))
        return {**state, **prefixed('out_proj', out)}

    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        return PrunedMultiheadAttention(m.embed_dim, self.num_heads, widths.get('qk', self.qk_dim),
                                        widths.get('v', self.v_dim), scale=float(self.softmax_scale),
                                        bias=m.in_proj_bias is not None, dropout=float(m.dropout))


class ShiftedWindowAttentionAdapter(WindowAttentionAdapter):
    """torchvision Swin ``ShiftedWindowAttention`` (not V2's cosine attention) and
    :class:`~amap.prune.dropin.PrunedShiftedWindowAttention`: a fused ``qkv`` and ``proj`` like timm's Swin."""

    module_types = (ShiftedWindowAttention, PrunedShiftedWindowAttention)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module) in cls.module_types

    @property
    def softmax_scale(self) -> float:
        return getattr(self.module, 'scale', None) or (self.module.qkv.in_features // self.module.num_heads) ** -0.5

    @property
    def windows(self) -> int:
        wh, ww = self.module.window_size
        return self.rows['qkv'] // (wh * ww)

    def _install(self) -> None:
        super()._install()
        m, dims = self.module, (self.qk_dim, self.v_dim, self.softmax_scale)
        if isinstance(m, ShiftedWindowAttention):  # its own forward reads the weights: run the drop-in's
            m.forward = types.MethodType(lambda module, x: shifted_window_forward(module, x, *dims), m)
            self._restore.append(lambda: m.__dict__.pop('forward', None))

    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        return PrunedShiftedWindowAttention(
            m.qkv.in_features, m.window_size, m.shift_size, self.num_heads, widths.get('qk', self.qk_dim),
            widths.get('v', self.v_dim), scale=float(self.softmax_scale), qkv_bias=m.qkv.bias is not None,
            proj_bias=m.proj.bias is not None, attention_dropout=float(m.attention_dropout), dropout=float(m.dropout))
