"""Adapters for timm's softmax attention: ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

They are :class:`~amap.prune.adapters.projection.ProjectionAttentionAdapter` s (a fused ``qkv`` and ``proj``; gates,
MACs, weight norms and slicing come from there). timm's modules reshape ``qkv`` into equal q, k and v head widths, so
the pruned module is the matching :mod:`amap.prune.modules` class (decoupled ``qk_dim`` / ``v_dim``), which keeps the
original softmax scale ``head_dim ** -0.5``.
"""
from __future__ import annotations

import copy

from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from ..groups import ChannelGroup
from ..modules import PrunedAttention, PrunedWindowAttention
from .projection import ProjectionAttentionAdapter

__all__ = ['HeadWidths', 'SoftmaxAttentionAdapter', 'WindowAttentionAdapter']


class HeadWidths:
    """Per-head q/k and v widths of a module with one ``head_dim`` (unpruned) or ``qk_dim`` / ``v_dim`` (pruned)."""

    module: nn.Module

    @property
    def qk_dim(self) -> int:
        return getattr(self.module, 'qk_dim', None) or self.module.head_dim

    @property
    def v_dim(self) -> int:
        return getattr(self.module, 'v_dim', None) or self.module.head_dim


class SoftmaxAttentionAdapter(ProjectionAttentionAdapter):
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
    qk_dim = HeadWidths.qk_dim
    v_dim = HeadWidths.v_dim

    def groups(self) -> list[ChannelGroup]:
        m = self.module
        out = []
        if isinstance(getattr(m, 'q_norm', nn.Identity()), nn.Identity) and \
                isinstance(getattr(m, 'k_norm', nn.Identity()), nn.Identity):
            out.append(ChannelGroup(self.name, 'qk', self.num_heads, self.qk_dim))
        if isinstance(getattr(m, 'norm', nn.Identity()), nn.Identity):
            out.append(ChannelGroup(self.name, 'v', self.num_heads, self.v_dim))
        return out

    # ---------------------------------------------------------------------------------------------------- surgery
    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        new = PrunedAttention(
            m.qkv.in_features, self.num_heads, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim),
            scale=float(m.scale), qkv_bias=m.qkv.bias is not None, proj_bias=m.proj.bias is not None,
            dim_out=m.proj.out_features, attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p,
            fused_attn=bool(getattr(m, 'fused_attn', True)))
        for name in ('q_norm', 'k_norm', 'norm'):  # qk_norm / scale_norm: their groups are not pruned (groups())
            norm = getattr(m, name, None)
            if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity):
                setattr(new, name, copy.deepcopy(norm))
        return new


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
            m.qkv.in_features, self.num_heads, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim),
            scale=float(m.scale), window_size=tuple(m.window_size), qkv_bias=m.qkv.bias is not None,
            attn_drop=m.attn_drop.p, proj_drop=m.proj_drop.p, fused_attn=bool(getattr(m, 'fused_attn', True)))
