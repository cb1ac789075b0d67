"""Adapter for the attention of Hugging Face transformers' ViT, DeiT and Swin (transformers 5 layout: ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``; Swin adds a ``relative_position_bias`` module and windows as the batch).

It is a :class:`~amap.prune.adapters.projection.ProjectionAttentionAdapter` over three separate projections (gates,
MACs, weight norms and slicing come from there), with the head widths of timm's softmax attention. transformers
reshapes q, k and v into one ``head_dim``, so the pruned module is :class:`~amap.prune.dropin.PrunedHFAttention`,
called like the module it replaces. Their MLPs (``fc1`` / ``fc2``) are handled by
:class:`~amap.prune.adapters.mlp.MlpAdapter`. transformers need not be installed: the module classes are recognised by
name.
"""
from __future__ import annotations

import copy

from torch import nn

from ..dropin import PrunedHFAttention
from .projection import _Segment
from .timm_attention import SoftmaxAttentionAdapter

__all__ = ['HFAttentionAdapter', 'HF_ATTENTION_CLASSES']

#: transformers attention classes this adapter handles (by class name, in ``transformers.models.*``).
HF_ATTENTION_CLASSES = ('ViTAttention', 'DeiTAttention', 'SwinAttention')


class HFAttentionAdapter(SoftmaxAttentionAdapter):
    """transformers ``ViTAttention`` / ``DeiTAttention`` / ``SwinAttention`` and :class:`PrunedHFAttention`."""

    module_types = (PrunedHFAttention,)
    out_proj = 'o_proj'

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if isinstance(module, PrunedHFAttention):
            return True
        kind = type(module)
        return (kind.__name__ in HF_ATTENTION_CLASSES and kind.__module__.startswith('transformers.')
                and all(isinstance(getattr(module, n, None), nn.Linear) for n in ('q_proj', 'k_proj', 'v_proj',
                                                                                   'o_proj')))

    def segments(self) -> dict[str, _Segment]:
        return {'q': _Segment('q_proj', 0), 'k': _Segment('k_proj', 0), 'v': _Segment('v_proj', 0)}

    @property
    def num_heads(self) -> int:
        return self.module.num_attention_heads

    def build(self, widths: dict[str, int]) -> nn.Module:
        m = self.module
        rel = getattr(m, 'relative_position_bias', None)
        return PrunedHFAttention(
            m.q_proj.in_features, self.num_heads, widths.get('qk', self.qk_dim), widths.get('v', self.v_dim),
            scaling=float(m.scaling), qkv_bias=m.q_proj.bias is not None, attention_dropout=float(m.attention_dropout),
            relative_position_bias=copy.deepcopy(rel) if rel is not None else None)
