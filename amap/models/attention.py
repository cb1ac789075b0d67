"""Focused linear attention (FLatten Transformer, Han et al., ICCV 2023): the one layer every FLatten family uses.

Every FLatten family (Swin, PVT, PVTv2, CSwin, DeiT) arranges tokens differently, but all share these pieces, kept
here so that each is written once:

* :func:`focusing_function` -- the focused kernel ``phi`` applied to q and k;
* :func:`linear_attention` -- ``phi(Q) (phi(K)^T V)`` with the normaliser ``z``, per head;
* :class:`HeadDWC` -- the depthwise convolution on v that restores feature diversity;
* :class:`SpatialReduction` -- PVT's key/value spatial reduction (strided conv, or PVTv2-Li's pooling);
* :class:`FocusedLinearAttention` -- the layer; the families' differences are its arguments (fused ``qkv`` or
  separate ``q``/``kv`` projections, none at all for CSwin, whose blocks project; spatial reduction; prefix tokens kept
  out of the DWC; LePE) and its state-dict keys are the official ones in every case.

Per-head widths are decoupled: q/k may have ``qk_dim`` channels per head and v ``v_dim`` channels per head (a pruned
model keeps fewer channels than the original ``head_dim``). Nothing here knows about pruning; a pruned layer is just
this layer built with smaller per-head widths.

Hook point: the layer calls ``self.qk_gate(x)`` on the kernel-mapped q and k, after the division by
``softplus(scale)`` and before the norm-preserving power. It is an ``nn.Identity`` in every model; it is the one place
where a channel can be removed from the focusing function exactly (a zeroed channel adds nothing to the norms nor to
the dot products), in the same spirit as timm's ``q_norm``/``k_norm`` slots.

Interface for tools (what :mod:`amap.prune.adapters` reads): ``num_heads``, ``qk_dim``, ``v_dim``,
``focusing_factor``, ``qkv_layout`` (``'qkv'``, ``'q_kv'`` or None), the projections ``qkv`` or ``q``/``kv`` and
``proj``, the parameters ``scale`` and ``positional_encoding`` (last dimension: q/k channels, head-major), ``dwc`` and
``get_v`` (LePE, on v channels), and the ``qk_gate`` slot; ``rebuild(qk_dim=..., v_dim=..., dwc_shared=...)`` builds the
same layer at other widths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError
from .helpers import Rebuildable

__all__ = ['focusing_function', 'linear_attention', 'HeadDWC', 'SpatialReduction', 'FocusedLinearAttention',
           'head_widths']


def head_widths(dim: int, num_heads: int, qk_dim: int | None, v_dim: int | None) -> tuple[int, int, int]:
    """``(head_dim, qk_dim, v_dim)``: the original head width and the per-head q/k and v widths (None or 0: the
    original width).

    Raises:
        ModelError: ``dim`` is not divisible by ``num_heads``.
    """
    if dim % num_heads:
        raise ModelError(f'dim={dim} is not divisible by num_heads={num_heads}; pick a num_heads that divides it')
    head_dim = dim // num_heads
    return head_dim, int(qk_dim or head_dim), int(v_dim or head_dim)


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


class SpatialReduction(nn.Module):
    """Key/value spatial reduction of PVT attention (official submodule names ``sr``, ``norm``, ``pool``, ``act``).

    ``linear=False``: a strided ``sr`` conv + ``norm`` when ``sr_ratio > 1`` (nothing otherwise). ``linear=True``
    (PVTv2-Li): ``pool`` to 7x7, a 1x1 ``sr`` conv, ``norm`` and ``act``. A mixin: the attention module holds the
    submodules itself (official keys ``attn.sr.weight``, ...); call :meth:`_init_reduction` in its constructor.
    """

    def _init_reduction(self, dim: int, sr_ratio: int, linear: bool) -> None:
        self.linear = linear
        self.sr_ratio = sr_ratio
        if not linear:
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
                self.norm = nn.LayerNorm(dim)
        else:
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()

    @property
    def reduces(self) -> bool:
        """Whether keys/values have fewer tokens than queries."""
        return self.linear or self.sr_ratio > 1

    def _kv_tokens(self, x: Tensor, height: int, width: int) -> Tensor:
        """The tokens keys and values are computed from, ``(B, n, C)``."""
        if not self.reduces:
            return x
        B, N, C = x.shape
        x = x.permute(0, 2, 1).reshape(B, C, height, width)
        if self.linear:
            x = self.pool(x)
        x = self.sr(x).reshape(B, C, -1).permute(0, 2, 1)
        x = self.norm(x)
        if self.linear:
            x = self.act(x)
        return x


class FocusedLinearAttention(SpatialReduction, Rebuildable):
    """FLatten's focused linear attention, for every family (keys ``qkv`` or ``q``/``kv``, ``proj``, ``scale``
    ``(1, 1, H*qk_dim)``, ``positional_encoding`` ``(1, num_tokens, H*qk_dim)``, ``dwc``; PVT's ``sr``/``norm``; CSwin's
    ``get_v``).

    ``k`` gets ``positional_encoding``; q and k go through the focusing function; the normalised linear attention runs
    over all tokens; the depthwise conv ``dwc`` on v (on the token grid; prefix tokens get no DWC term; reduced v is
    interpolated back to the query tokens) and, with ``lepe``, a 3x3 depthwise conv ``get_v`` on v are added.

    Args:
        dim: Input (and output) channels at the original width (``num_heads * head_dim``).
        num_heads: Number of heads.
        grid_size: Token grid ``(H, W)`` when ``forward`` is not given one (Swin windows, DeiT patches, CSwin maps).
        num_tokens: Length of ``positional_encoding`` (default: prefix + grid tokens, reduced by ``sr_ratio ** 2``).
        qkv_bias: Bias on the q/k/v projections.
        qk_scale: Accepted for the official signatures (linear attention has no softmax scale).
        attn_drop: Accepted for the official signatures (built, never applied, as in the official modules).
        proj_drop: Dropout after ``proj``.
        focusing_factor: The focusing power ``p``.
        kernel_size: Kernel of the depthwise conv on v.
        qk_dim: q/k channels per head (default ``dim // num_heads``).
        v_dim: v channels per head (default ``dim // num_heads``).
        dwc_shared: One depthwise kernel bank shared by all heads (official) or one kernel per channel.
        qkv_layout: ``'qkv'`` (one fused projection, Swin/DeiT), ``'q_kv'`` (``q`` and ``kv``, PVT) or None (no
            projections: ``forward`` takes q, k and v, CSwin).
        num_prefix_tokens: Tokens before the grid tokens (DeiT's class token), kept out of the DWC.
        sr_ratio: Spatial-reduction ratio of keys/values (``'q_kv'`` layout).
        linear: PVTv2-Li pooled reduction.
        lepe: Add LePE (CSwin's ``get_v``, a 3x3 depthwise conv on v).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: tuple[int, int] | None = None,
            num_tokens: int | None = None,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            qk_dim: int | None = None,
            v_dim: int | None = None,
            dwc_shared: bool = True,
            qkv_layout: str | None = 'qkv',
            num_prefix_tokens: int = 0,
            sr_ratio: int = 1,
            linear: bool = False,
            lepe: bool = False,
    ) -> None:
        super().__init__()
        if qkv_layout not in ('qkv', 'q_kv', None):
            raise ModelError(f"qkv_layout={qkv_layout!r} must be 'qkv', 'q_kv' or None")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim, self.qk_dim, self.v_dim = head_widths(dim, num_heads, qk_dim, v_dim)
        self.grid_size = None if grid_size is None else (int(grid_size[0]), int(grid_size[1]))
        self.focusing_factor = focusing_factor
        self.qkv_layout = qkv_layout
        self.num_prefix_tokens = num_prefix_tokens
        qk_channels, v_channels = num_heads * self.qk_dim, num_heads * self.v_dim
        if qkv_layout == 'qkv':
            self.qkv = nn.Linear(dim, 2 * qk_channels + v_channels, bias=qkv_bias)
        elif qkv_layout == 'q_kv':
            self.q = nn.Linear(dim, qk_channels, bias=qkv_bias)
            self.kv = nn.Linear(dim, qk_channels + v_channels, bias=qkv_bias)
        if qkv_layout is not None:
            self.attn_drop = nn.Dropout(attn_drop)
            self.proj = nn.Linear(v_channels, dim)
            self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, sr_ratio, linear)
        if lepe:
            self.get_v = nn.Conv2d(v_channels, v_channels, kernel_size=3, stride=1, padding=1, groups=v_channels)
        self.dwc = HeadDWC(self.v_dim, num_heads, kernel_size=kernel_size, shared=dwc_shared)
        if num_tokens is None:
            if self.grid_size is None:
                raise ModelError('FocusedLinearAttention needs grid_size or num_tokens (positional encoding length)')
            num_tokens = num_prefix_tokens + self.grid_size[0] * self.grid_size[1] // (sr_ratio * sr_ratio)
        self.scale = nn.Parameter(torch.zeros(1, 1, qk_channels))
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_tokens, qk_channels))
        self.qk_gate = nn.Identity()

    @property
    def has_lepe(self) -> bool:
        """Whether the layer adds LePE (``get_v``)."""
        return hasattr(self, 'get_v')

    def project(self, x: Tensor, height: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """q ``(B, N, H*qk_dim)``, k ``(B, n, H*qk_dim)`` and v ``(B, n, H*v_dim)`` of tokens ``x`` ``(B, N, dim)``."""
        qk_channels = self.num_heads * self.qk_dim
        if self.qkv_layout == 'qkv':
            return self.qkv(x).split([qk_channels, qk_channels, self.num_heads * self.v_dim], dim=-1)
        kv = self.kv(self._kv_tokens(x, height, width))
        return self.q(x), kv[..., :qk_channels], kv[..., qk_channels:]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, height: int, width: int) -> Tensor:
        """The attention output before ``proj``, ``(B, N, H*v_dim)``, of projected q, k, v (see :meth:`project`)."""
        k = k + self.positional_encoding
        q = focusing_function(q, self.scale, self.focusing_factor, gate=self.qk_gate)
        k = focusing_function(k, self.scale, self.focusing_factor, gate=self.qk_gate)
        out = linear_attention(q, k, v, self.num_heads)  # B, H, N, v_dim
        B, H, N, d = out.shape
        out = out.transpose(1, 2).reshape(B, N, H * d)
        return out + self._local(v, height, width, N)

    def _local(self, v: Tensor, height: int, width: int, num_queries: int) -> Tensor:
        """The DWC (and LePE) terms on v ``(B, n, H*v_dim)`` for the ``num_queries`` query tokens."""
        B, n, _ = v.shape
        H, d, p = self.num_heads, self.v_dim, self.num_prefix_tokens
        heads = v[:, p:].reshape(B, n - p, H, d).transpose(1, 2)
        if self.reduces:  # bring v back to the query tokens for the DWC
            heads = F.interpolate(heads.transpose(-2, -1).reshape(B * H, d, n), size=num_queries, mode='linear')
            heads = heads.reshape(B, H, d, num_queries).transpose(-2, -1)
        local = self.dwc(heads, height, width)
        if self.has_lepe:
            local = local + self.get_v(v.transpose(1, 2).reshape(B, H * d, height, width)).flatten(2).transpose(1, 2)
        return F.pad(local, (0, 0, p, 0)) if p else local  # prefix tokens get no DWC term

    def forward(self, x: Tensor, height: int | None = None, width: int | None = None,
                mask: Tensor | None = None) -> Tensor:
        """Attend over all tokens.

        Args:
            x: Tokens ``(B, num_prefix_tokens + height * width, dim)``.
            height: Token grid height (default ``grid_size[0]``).
            width: Token grid width (default ``grid_size[1]``).
            mask: Ignored (linear attention does not mask shifted windows, as in the official code).

        Returns:
            ``(B, num_prefix_tokens + height * width, dim)``.
        """
        if height is None or width is None:
            height, width = self.grid_size
        q, k, v = self.project(x, height, width)
        return self.proj_drop(self.proj(self.attend(q, k, v, height, width)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, qk_dim={self.qk_dim}, '
                f'v_dim={self.v_dim}, focusing_factor={self.focusing_factor}')
