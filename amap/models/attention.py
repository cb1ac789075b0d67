"""Focused linear attention (FLatten Transformer, Han et al., ICCV 2023) as reusable building blocks.

Every FLatten family (Swin, PVT, PVTv2, CSwin, DeiT) arranges tokens differently, but all share three pieces, kept
here so that each is written once:

* :func:`focusing_function` -- the focused kernel ``phi`` applied to q and k;
* :func:`linear_attention` -- ``phi(Q) (phi(K)^T V)`` with the normaliser ``z``, per head;
* :class:`HeadDWC` -- the depthwise convolution on v that restores feature diversity.

Per-head widths are decoupled: q/k may have ``qk_dim`` channels per head and v ``v_dim`` channels per head (a pruned
model keeps fewer channels than the original ``head_dim``). Nothing here knows about pruning; a pruned model is just a
model built with smaller per-head widths.

Hook point: the family modules call ``self.qk_gate(x)`` on the kernel-mapped q and k, after the division by
``softplus(scale)`` and before the norm-preserving power. It is an ``nn.Identity`` in every model; it is the one place
where a channel can be removed from the focusing function exactly (a zeroed channel adds nothing to the norms nor to
the dot products), in the same spirit as timm's ``q_norm``/``k_norm`` slots.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['focusing_function', 'linear_attention', 'HeadDWC']


def focusing_function(
        x: Tensor,
        scale: Tensor,
        focusing_factor: float,
        gate: nn.Module | None = None,
) -> Tensor:
    """Apply FLatten's focused kernel to q or k.

    ``x -> ReLU(x) + 1e-6``, divided by ``softplus(scale)``; then each token vector is raised element-wise to
    ``focusing_factor`` and rescaled to the norm it had before the power. Norms are over the last dimension (all
    heads together, as in the official implementation).

    Args:
        x: Queries or keys, shape ``(..., C)``.
        scale: The learnable ``scale`` parameter, broadcastable to ``x`` (official shape ``(1, 1, C)``).
        focusing_factor: The power ``p`` (3 in all released models).
        gate: Optional module applied after the division by ``softplus(scale)`` (the ``qk_gate`` hook point).

    Returns:
        The focused features, same shape as ``x``.
    """
    x = F.relu(x) + 1e-6
    x = x / F.softplus(scale)
    if gate is not None:
        x = gate(x)
    x_norm = x.norm(dim=-1, keepdim=True)
    x = x ** focusing_factor
    return (x / x.norm(dim=-1, keepdim=True)) * x_norm


def linear_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Normalised linear attention ``z * phi(Q) (phi(K)^T V)`` per head.

    The per-head widths are taken from the tensors: ``q``/``k`` carry ``num_heads * qk_dim`` channels and ``v``
    carries ``num_heads * v_dim`` channels.

    Args:
        q: Focused queries, ``(B, N, num_heads * qk_dim)``.
        k: Focused keys, ``(B, n, num_heads * qk_dim)``.
        v: Values, ``(B, n, num_heads * v_dim)``.
        num_heads: Number of heads.

    Returns:
        The attention output per head, ``(B, num_heads, N, v_dim)``.
    """
    B, N, _ = q.shape
    n = k.shape[1]
    q = q.reshape(B, N, num_heads, -1).transpose(1, 2)
    k = k.reshape(B, n, num_heads, -1).transpose(1, 2)
    v = v.reshape(B, n, num_heads, -1).transpose(1, 2)
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    return q @ kv * z


class HeadDWC(nn.Conv2d):
    """Depthwise convolution on the values of every head.

    In the official models one depthwise kernel bank of ``v_dim`` channels is *shared* by all heads (state-dict key
    ``dwc.weight`` of shape ``(head_dim, 1, k, k)``). A pruned model whose heads keep different v channels cannot share
    it; it is then *un-shared*: one kernel per kept channel of every head (``(num_heads * v_dim, 1, k, k)``), which
    costs the same MACs and computes the same function.

    Args:
        v_dim: Value channels per head.
        num_heads: Number of heads.
        kernel_size: Kernel size (padding keeps the spatial size).
        shared: Share one kernel bank across heads (the official layout).
    """

    def __init__(self, v_dim: int, num_heads: int, kernel_size: int = 5, shared: bool = True) -> None:
        channels = v_dim if shared else v_dim * num_heads
        super().__init__(channels, channels, kernel_size=kernel_size, groups=channels, padding=kernel_size // 2)
        self.v_dim = v_dim
        self.num_heads = num_heads
        self.shared = shared

    def forward(self, v: Tensor, height: int, width: int) -> Tensor:  # type: ignore[override]
        """Run the convolution.

        Args:
            v: Values per head, ``(B, num_heads, height * width, v_dim)``.
            height: Token grid height.
            width: Token grid width.

        Returns:
            ``(B, height * width, num_heads * v_dim)``, channels ordered head-major like the attention output.
        """
        B, H, N, d = v.shape
        if self.shared:
            x = v.reshape(B * H, height, width, d).permute(0, 3, 1, 2)
        else:
            x = v.permute(0, 1, 3, 2).reshape(B, H * d, height, width)
        x = super().forward(x)
        return x.reshape(B, H * d, N).transpose(1, 2)
