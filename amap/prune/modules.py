"""Pruned replacements for timm's softmax attention modules, with decoupled per-head q/k and v widths.

timm's ``Attention`` and Swin ``WindowAttention`` reshape their qkv projection into equal q, k and v head widths, so a
pruned layer (``qk_dim`` channels per head for q and k, ``v_dim`` for v) needs its own module. Both keep the softmax
scale of the *original* head width: the pruned model computes the same function as the masked one. The fused
``scaled_dot_product_attention`` path (used when timm enables fused attention) and the explicit path agree.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import get_relative_position_index
from torch import Tensor, nn

__all__ = ['PrunedHeads', 'PrunedAttention', 'PrunedWindowAttention']


class PrunedHeads(nn.Module):
    """What every pruned attention module (here and in :mod:`amap.prune.dropin`) holds: ``num_heads`` heads of
    ``qk_dim`` q/k and ``v_dim`` v channels, and the softmax ``scale`` of the original head width.

    Args:
        num_heads: Number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head.
        scale: Softmax scale (the original ``head_dim ** -0.5``).
    """

    def __init__(self, num_heads: int, qk_dim: int, v_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.scale = scale

    def fused_qkv(self, dim: int, bias: bool) -> nn.Linear:
        """A fused ``[q | k | v]`` projection of ``dim``-wide tokens for these heads."""
        return nn.Linear(dim, self.num_heads * (2 * self.qk_dim + self.v_dim), bias=bias)


class PrunedAttention(PrunedHeads):
    """Multi-head self-attention with ``qk_dim`` q/k and ``v_dim`` v channels per head (timm ``Attention`` layout).

    Args:
        dim: Token width.
        num_heads, qk_dim, v_dim, scale: As for :class:`PrunedHeads`.
        qkv_bias: Bias on the qkv projection.
        proj_bias: Bias on the output projection.
        dim_out: Output width (default ``dim``).
        attn_drop: Attention dropout.
        proj_drop: Output dropout.
        fused_attn: Use ``F.scaled_dot_product_attention``.

    ``q_norm`` / ``k_norm`` (per head, on q and k) and ``norm`` (on the attention output before ``proj``) are identities
    unless the adapter copies them from a timm ``Attention`` built with ``qk_norm`` / ``scale_norm``; the groups they
    normalise are then not pruned.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qk_dim: int,
            v_dim: int,
            scale: float,
            qkv_bias: bool = False,
            proj_bias: bool = True,
            dim_out: int | None = None,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            fused_attn: bool = True,
    ) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scale)
        self.fused_attn = fused_attn
        self.qkv = self.fused_qkv(dim, qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(num_heads * v_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        H, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([H * dq, H * dq, H * dv], dim=-1)
        q, k = self.q_norm(q.reshape(B, N, H, dq).transpose(1, 2)), self.k_norm(k.reshape(B, N, H, dq).transpose(1, 2))
        return q, k, v.reshape(B, N, H, dv).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, is_causal: bool = False) -> Tensor:
        if self.fused_attn:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal,
                scale=self.scale)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if is_causal:
            n, m = attn.shape[-2:]
            causal = torch.ones(n, m, dtype=torch.bool, device=attn.device).tril()
            attn = attn.masked_fill(~causal, float('-inf'))
        if bias is not None:
            attn = attn + bias
        attn = self.attn_drop(attn.softmax(dim=-1))
        return attn @ v

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self._split(x)
        x = self._attend(q, k, v, attn_mask, is_causal)
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.v_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class PrunedWindowAttention(PrunedAttention):
    """Swin window attention (relative position bias per head, shifted-window mask) with decoupled head widths.

    Args:
        dim, num_heads, qk_dim, v_dim, scale: As for :class:`PrunedAttention`.
        window_size: Window height and width.
        qkv_bias: Bias on the qkv projection.
        **kwargs: ``attn_drop``, ``proj_drop``, ``fused_attn`` of :class:`PrunedAttention`.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, scale: float,
                 window_size: tuple[int, int] = (7, 7), qkv_bias: bool = True, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, qk_dim, v_dim, scale, qkv_bias=qkv_bias, proj_bias=True, **kwargs)
        self.window_size = tuple(window_size)
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.register_buffer('relative_position_index', get_relative_position_index(win_h, win_w), persistent=False)

    def _rel_pos_bias(self) -> Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        B_, N, _ = x.shape
        q, k, v = self._split(x)
        bias = self._rel_pos_bias()
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, num_win, 1, N, N)).expand(B_ // num_win, -1, -1, -1, -1)
            bias = bias.reshape(B_, self.num_heads, N, N)
        x = self._attend(q, k, v, bias)
        x = x.transpose(1, 2).reshape(B_, N, self.num_heads * self.v_dim)
        return self.proj_drop(self.proj(x))
