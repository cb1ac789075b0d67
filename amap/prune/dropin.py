"""Pruned drop-in replacements for the attention modules of Hugging Face transformers and torchvision.

Their libraries reshape q, k and v into one head width (``head_dim``), so an attention whose heads keep ``qk_dim``
q/k channels and ``v_dim`` v channels needs its own module. Each class here is called like the module it replaces
(same arguments, same return value) and keeps the replaced module's parameter names, so a pruned model is the
library's model with these modules in place of its attention:

* :class:`PrunedHFAttention` replaces ``ViTAttention``, ``DeiTAttention`` and ``SwinAttention`` of transformers 5
  (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; Swin's ``relative_position_bias`` module is kept as it is);
* :class:`PrunedMultiheadAttention` replaces the self-attention ``nn.MultiheadAttention`` of torchvision's
  ``VisionTransformer`` (``in_proj_weight``, ``in_proj_bias``, ``out_proj``; batch first);
* :class:`PrunedShiftedWindowAttention` replaces torchvision Swin's ``ShiftedWindowAttention`` (``qkv``, ``proj``,
  ``relative_position_bias_table``).

All keep the softmax scale of the original head width, so the pruned model computes what the masked model computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .modules import PrunedHeads

__all__ = ['PrunedHFAttention', 'PrunedMultiheadAttention', 'PrunedShiftedWindowAttention', 'heads_attention']


def heads_attention(q: Tensor, k: Tensor, v: Tensor, heads: int, scale: float, *, bias: Tensor | None = None,
                    dropout: float = 0.0) -> Tensor:
    """Softmax attention of ``(B, N, heads * d)`` q/k/v (per-head widths may differ between q/k and v) -> ``(B, N,
    heads * dv)``."""
    B, N = q.shape[:2]
    q, k, v = (t.reshape(B, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    return out.transpose(1, 2).reshape(B, N, -1)


class PrunedHFAttention(PrunedHeads):
    """transformers' ViT / DeiT / Swin attention with ``qk_dim`` q/k and ``v_dim`` v channels per head.

    Args:
        dim: Token width.
        num_heads, qk_dim, v_dim: As for :class:`~amap.prune.modules.PrunedHeads`.
        scaling: Softmax scale (the original ``head_dim ** -0.5``; also ``scale``).
        qkv_bias: Bias on the q/k/v projections.
        attention_dropout: Dropout on the attention weights (training only).
        relative_position_bias: Swin's relative position bias module (None for ViT / DeiT).
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scaling: float, qkv_bias: bool = True,
                 attention_dropout: float = 0.0, relative_position_bias: nn.Module | None = None) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scaling)
        self.num_attention_heads = num_heads  # transformers' names
        self.scaling = scaling
        self.attention_dropout = attention_dropout
        self.q_proj = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, num_heads * qk_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, num_heads * v_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * v_dim, dim)
        if relative_position_bias is not None:
            self.relative_position_bias = relative_position_bias

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, **kwargs) -> tuple[Tensor, None]:
        """``hidden_states`` ``(B, N, C)`` (Swin: windows as the batch; ``attention_mask`` then the shifted-window
        mask ``(windows, N, N)``) -> ``(output, None)``, as the module it replaces."""
        B, N = hidden_states.shape[:2]
        bias = attention_mask
        rel = getattr(self, 'relative_position_bias', None)
        if rel is not None:
            bias = rel()
            if attention_mask is not None:
                windows = attention_mask.shape[0]
                mask = attention_mask.unsqueeze(1).unsqueeze(0).expand(B // windows, -1, -1, -1, -1)
                bias = bias + mask.reshape(-1, 1, N, N)
        out = heads_attention(self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                              self.num_attention_heads, self.scaling, bias=bias,
                              dropout=self.attention_dropout if self.training else 0.0)
        return self.o_proj(out), None


class PrunedMultiheadAttention(PrunedHeads):
    """Batch-first self-attention with ``qk_dim`` q/k and ``v_dim`` v channels per head, in place of
    ``nn.MultiheadAttention`` (torchvision ``VisionTransformer``).

    Args:
        embed_dim: Token width.
        num_heads, qk_dim, v_dim, scale: As for :class:`~amap.prune.modules.PrunedHeads`.
        bias: Biases on the in- and output projections.
        dropout: Dropout on the attention weights (training only).
    """

    batch_first = True

    def __init__(self, embed_dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scale)
        self.embed_dim = embed_dim
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(num_heads * (2 * qk_dim + v_dim), embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(num_heads * (2 * qk_dim + v_dim))) if bias else None
        self.out_proj = nn.Linear(num_heads * v_dim, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def attend(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The attention output before ``out_proj`` for in-projection ``weight`` / ``bias``."""
        H, dq = self.num_heads, self.qk_dim
        q, k, v = F.linear(x, weight, bias).split([H * dq, H * dq, H * self.v_dim], dim=-1)
        return heads_attention(q, k, v, H, self.scale, dropout=self.dropout if self.training else 0.0)

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None, *,
                key_padding_mask: Tensor | None = None, need_weights: bool = False, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        """Self-attention of ``query`` ``(B, N, C)`` (``key`` and ``value`` are the same tensor) -> ``(output,
        None)``; masks and attention weights are not supported."""
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError('PrunedMultiheadAttention does not take masks')
        return self.out_proj(self.attend(query, self.in_proj_weight, self.in_proj_bias)), None


class PrunedShiftedWindowAttention(PrunedHeads):
    """torchvision Swin's shifted-window attention with ``qk_dim`` q/k and ``v_dim`` v channels per head.

    Args:
        dim: Token width.
        window_size: Window height and width.
        shift_size: Cyclic shift of the windows.
        num_heads, qk_dim, v_dim, scale: As for :class:`~amap.prune.modules.PrunedHeads`.
        qkv_bias: Bias on the qkv projection.
        proj_bias: Bias on the output projection.
        attention_dropout: Dropout on the attention weights (training only).
        dropout: Dropout on the output (training only).
    """

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int, qk_dim: int,
                 v_dim: int, scale: float, qkv_bias: bool = True, proj_bias: bool = True,
                 attention_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scale)
        self.window_size = list(window_size)
        self.shift_size = list(shift_size)
        self.attention_dropout = attention_dropout
        self.dropout = dropout
        self.qkv = self.fused_qkv(dim, qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        self.register_buffer('relative_position_index', ((rel[..., 0] + wh - 1) * (2 * ww - 1) + rel[..., 1] + ww - 1)
                             .flatten())

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        return shifted_window_forward(self, x, self.qk_dim, self.v_dim, self.scale)


def shifted_window_forward(module: nn.Module, x: Tensor, qk_dim: int, v_dim: int, scale: float) -> Tensor:
    """torchvision's ``shifted_window_attention`` through ``module.qkv`` and ``module.proj`` (called as modules, so
    their gates act) with ``qk_dim`` / ``v_dim`` channels per head: the attention of
    :class:`PrunedShiftedWindowAttention` and of a gated ``ShiftedWindowAttention``."""
    B, H, W, C = x.shape
    (wh, ww), shift = module.window_size, list(module.shift_size)
    x = F.pad(x, (0, 0, 0, (ww - W % ww) % ww, 0, (wh - H % wh) % wh))
    _, pH, pW, _ = x.shape
    shift = [0 if wh >= pH else shift[0], 0 if ww >= pW else shift[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pH // wh) * (pW // ww)
    n = wh * ww
    x = x.view(B, pH // wh, wh, pW // ww, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B * windows, n, C)
    heads = module.num_heads
    table = module.relative_position_bias_table[module.relative_position_index]
    bias = table.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if sum(shift) > 0:
        mask = x.new_zeros((pH, pW))
        count = 0
        for h in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
            for w in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                mask[h[0]:h[1], w[0]:w[1]] = count
                count += 1
        mask = mask.view(pH // wh, wh, pW // ww, ww).permute(0, 2, 1, 3).reshape(windows, n)
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(B, -1, -1, -1, -1).reshape(-1, heads, n, n)
    q, k, v = module.qkv(x).split([heads * qk_dim, heads * qk_dim, heads * v_dim], dim=-1)
    out = heads_attention(q, k, v, heads, scale, bias=bias,
                          dropout=module.attention_dropout if module.training else 0.0)
    out = F.dropout(module.proj(out), p=module.dropout, training=module.training)
    out = out.view(B, pH // wh, pW // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, pH, pW, C)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :H, :W, :].contiguous()
