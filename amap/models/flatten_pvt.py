"""FLatten-PVT: the Pyramid Vision Transformer (v1) with focused linear attention.

Our own implementation of ``PyramidVisionTransformer`` of the official FLatten Transformer code (LeapLabTHU,
``models/flatten_pvt.py``): same constructor arguments and defaults, same module tree and state-dict keys, same
arithmetic. The attention modules here (:class:`PvtAttention`, :class:`PvtFocusedLinearAttention`) also serve
FLatten-PVTv2 (:mod:`amap.models.flatten_pvt_v2`), which adds the ``linear`` (pooled) spatial reduction.

Per stage, the official constructor picks the attention from two strings:

* ``attn_type[i]`` -- ``'L'`` focused linear attention, ``'S'`` softmax attention;
* the spatial-reduction ratio -- ``sr_ratios[i]`` for ``'S'`` stages, ``int(la_sr_ratios[i])`` for ``'L'`` stages.

The released models use ``attn_type='LLLL'`` and ``la_sr_ratios='1111'`` (the repository's configs), which is what
the registered factories build; the constructor's own default stays ``la_sr_ratios='8421'`` as in the official code.

Widths: every attention module accepts per-head ``qk_dim`` and ``v_dim`` and every block an MLP ``mlp_hidden``, so a
pruned model is the same class built with smaller widths; the model takes them per block through ``block_widths``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..errors import ModelError
from .attention import HeadDWC, focusing_function, linear_attention

__all__ = [
    'PyramidVisionTransformer', 'PvtAttention', 'PvtFocusedLinearAttention', 'PvtBlock', 'PvtPatchEmbed',
    'stage_attention', 'expand_block_widths', 'BLOCK_WIDTH_KEYS',
]

#: Keys a ``block_widths`` entry may set (missing keys keep the block's default width).
BLOCK_WIDTH_KEYS = ('qk_dim', 'v_dim', 'mlp_hidden', 'dwc_shared')


def stage_attention(
        attn_type: str | None,
        la_sr_ratios: str | int | Sequence[int],
        sr_ratios: Sequence[int],
        num_stages: int,
) -> list[tuple[str, int]]:
    """Translate the official ``attn_type`` / ``la_sr_ratios`` arguments into a per-stage choice.

    As in the official constructors: ``attn_type=None`` means ``'LLLL'``; a softmax stage (``'S'``) reduces keys and
    values by ``sr_ratios[i]``, a focused-linear stage (``'L'``) by ``int(la_sr_ratios[i])``.

    Args:
        attn_type: One letter per stage, ``'L'`` or ``'S'``.
        la_sr_ratios: One digit per stage (``'1111'``, ``'8421'``); an int or a sequence of ints is accepted too.
        sr_ratios: Spatial-reduction ratios of softmax stages.
        num_stages: Number of stages.

    Returns:
        ``[(attn_letter, sr_ratio), ...]``, one entry per stage.

    Raises:
        ModelError: A letter other than L/S, or a string too short for ``num_stages``.
    """
    attn_type = 'LLLL' if attn_type is None else attn_type
    if isinstance(la_sr_ratios, int):
        la_sr_ratios = str(la_sr_ratios)
    if len(attn_type) < num_stages or len(la_sr_ratios) < num_stages or len(sr_ratios) < num_stages:
        raise ModelError(
            f'attn_type={attn_type!r}, la_sr_ratios={la_sr_ratios!r} and sr_ratios={list(sr_ratios)} need one entry '
            f'per stage ({num_stages} stages)')
    stages = []
    for i in range(num_stages):
        letter = attn_type[i]
        if letter not in ('L', 'S'):
            raise ModelError(f"attn_type={attn_type!r}: each letter must be 'L' (focused linear) or 'S' (softmax)")
        stages.append((letter, int(sr_ratios[i]) if letter == 'S' else int(la_sr_ratios[i])))
    return stages


def expand_block_widths(
        block_widths: Sequence[Mapping[str, Any]] | None,
        num_blocks: int,
) -> list[dict[str, Any]]:
    """Check a model's ``block_widths`` argument and return one dict per block (empty dicts when ``None``).

    Args:
        block_widths: ``None`` or one mapping per block, in model order (stage 1 block 0, block 1, ..., last stage),
            with any of the keys ``qk_dim``, ``v_dim``, ``mlp_hidden`` (ints) and ``dwc_shared`` (bool).
        num_blocks: Number of blocks of the model.

    Returns:
        A list of ``num_blocks`` dicts.

    Raises:
        ModelError: Wrong length or an unknown key.
    """
    if block_widths is None:
        return [{} for _ in range(num_blocks)]
    block_widths = list(block_widths)
    if len(block_widths) != num_blocks:
        raise ModelError(f'block_widths has {len(block_widths)} entries but the model has {num_blocks} blocks; '
                         'give one dict per block in order')
    out = []
    for i, widths in enumerate(block_widths):
        unknown = set(widths) - set(BLOCK_WIDTH_KEYS)
        if unknown:
            raise ModelError(f'block_widths[{i}] has unknown keys {sorted(unknown)}; allowed: {list(BLOCK_WIDTH_KEYS)}')
        out.append(dict(widths))
    return out


class _SpatialReduction(nn.Module):
    """Shared set-up of the key/value spatial reduction of PVT attention (official submodule names kept).

    ``linear=False``: a strided ``sr`` conv + ``norm`` when ``sr_ratio > 1`` (nothing otherwise). ``linear=True``
    (PVTv2-Li): ``pool`` to 7x7, a 1x1 ``sr`` conv, ``norm`` and ``act``.
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


class PvtAttention(_SpatialReduction):
    """Softmax multi-head attention with spatial reduction of keys and values (PVT's SRA; ``attn_type`` 'S').

    Args:
        dim: Token width.
        num_heads: Number of heads.
        qkv_bias: Bias on ``q`` and ``kv``.
        qk_scale: Explicit softmax scale; default ``head_dim ** -0.5`` of the ORIGINAL ``head_dim = dim // num_heads``
            (kept when ``qk_dim`` is smaller, so that a pruned model computes the same function).
        attn_drop: Dropout on the attention map.
        proj_drop: Dropout after ``proj``.
        sr_ratio: Spatial-reduction ratio of keys/values.
        linear: PVTv2-Li pooled reduction (7x7 average pool + 1x1 conv).
        qk_dim: q/k channels per head (default ``dim // num_heads``).
        v_dim: v channels per head (default ``dim // num_heads``).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            linear: bool = False,
            qk_dim: int | None = None,
            v_dim: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f'dim {dim} is not divisible by num_heads {num_heads}')
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim
        self.scale = qk_scale or head_dim ** -0.5

        self.q = nn.Linear(dim, num_heads * self.qk_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, num_heads * (self.qk_dim + self.v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * self.v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, sr_ratio, linear)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Attend.

        Args:
            x: Tokens ``(B, H * W, dim)``.
            H: Token grid height.
            W: Token grid width.

        Returns:
            ``(B, H * W, dim)``.
        """
        B, N, _ = x.shape
        heads, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q = self.q(x).reshape(B, N, heads, dq).permute(0, 2, 1, 3)
        kv = self.kv(self._kv_tokens(x, H, W))
        n = kv.shape[1]
        k = kv[..., :heads * dq].reshape(B, n, heads, dq).permute(0, 2, 1, 3)
        v = kv[..., heads * dq:].reshape(B, n, heads, dv).permute(0, 2, 1, 3)

        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, heads * dv)
        x = self.proj(x)
        return self.proj_drop(x)


class PvtFocusedLinearAttention(_SpatialReduction):
    """FLatten's focused linear attention in PVT form (``attn_type`` 'L'): separate ``q`` and ``kv`` projections,
    optional spatial reduction of keys/values, learnable ``positional_encoding`` on the keys, and a depthwise conv on
    the values (interpolated back to the query tokens when keys/values are reduced).

    Hook point: ``self.qk_gate`` (an ``nn.Identity``) is applied to the kernel-mapped q and k inside
    :func:`~amap.models.attention.focusing_function`.

    Args:
        dim: Token width.
        num_patches: Tokens of the stage at the model's ``img_size`` (sets ``positional_encoding``'s length,
            ``num_patches // sr_ratio ** 2``, as in the official code).
        num_heads: Number of heads.
        qkv_bias: Bias on ``q`` and ``kv``.
        qk_scale: Unused (accepted for the official signature).
        attn_drop: Unused by linear attention (the official module keeps an ``attn_drop`` Dropout all the same).
        proj_drop: Dropout after ``proj``.
        sr_ratio: Spatial-reduction ratio of keys/values.
        linear: PVTv2-Li pooled reduction (7x7 average pool + 1x1 conv).
        focusing_factor: The focusing power ``p``.
        kernel_size: Kernel of the depthwise conv on v.
        qk_dim: q/k channels per head (default ``dim // num_heads``).
        v_dim: v channels per head (default ``dim // num_heads``).
        dwc_shared: One depthwise kernel bank shared by all heads (official) or one per head channel.
    """

    def __init__(
            self,
            dim: int,
            num_patches: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            linear: bool = False,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            qk_dim: int | None = None,
            v_dim: int | None = None,
            dwc_shared: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(f'dim {dim} is not divisible by num_heads {num_heads}')
        head_dim = dim // num_heads
        self.dim = dim
        self.num_heads = num_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim
        qk_channels = num_heads * self.qk_dim

        self.q = nn.Linear(dim, qk_channels, bias=qkv_bias)
        self.kv = nn.Linear(dim, num_heads * (self.qk_dim + self.v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * self.v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, sr_ratio, linear)

        self.focusing_factor = focusing_factor
        self.dwc = HeadDWC(self.v_dim, num_heads, kernel_size=kernel_size, shared=dwc_shared)
        self.scale = nn.Parameter(torch.zeros(1, 1, qk_channels))
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_patches // (sr_ratio * sr_ratio), qk_channels))
        self.qk_gate = nn.Identity()

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Attend.

        Args:
            x: Tokens ``(B, H * W, dim)``.
            H: Token grid height.
            W: Token grid width.

        Returns:
            ``(B, H * W, dim)``.
        """
        B, N, _ = x.shape
        heads, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q = self.q(x)
        kv = self.kv(self._kv_tokens(x, H, W))
        k, v = kv[..., :heads * dq], kv[..., heads * dq:]
        n = k.shape[1]

        k = k + self.positional_encoding
        q = focusing_function(q, self.scale, self.focusing_factor, gate=self.qk_gate)
        k = focusing_function(k, self.scale, self.focusing_factor, gate=self.qk_gate)
        x = linear_attention(q, k, v, heads)  # (B, heads, N, dv)

        v = v.reshape(B, n, heads, dv).permute(0, 2, 1, 3)
        if self.reduces:  # bring v back to the N query tokens for the DWC
            v = F.interpolate(v.transpose(-2, -1).reshape(B * heads, dv, n), size=N, mode='linear')
            v = v.reshape(B, heads, dv, N).transpose(-2, -1)
        x = x.transpose(1, 2).reshape(B, N, heads * dv)
        x = x + self.dwc(v, H, W)

        x = self.proj(x)
        return self.proj_drop(x)


def _make_attention(
        attn_type: str,
        dim: int,
        num_patches: int,
        num_heads: int,
        qkv_bias: bool,
        qk_scale: float | None,
        attn_drop: float,
        proj_drop: float,
        sr_ratio: int,
        linear: bool,
        focusing_factor: float,
        kernel_size: int,
        qk_dim: int | None,
        v_dim: int | None,
        dwc_shared: bool,
) -> nn.Module:
    """The attention module of a PVT/PVTv2 block for ``attn_type`` 'L' or 'S'."""
    if attn_type == 'L':
        return PvtFocusedLinearAttention(
            dim, num_patches, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
            proj_drop=proj_drop, sr_ratio=sr_ratio, linear=linear, focusing_factor=focusing_factor,
            kernel_size=kernel_size, qk_dim=qk_dim, v_dim=v_dim, dwc_shared=dwc_shared)
    if attn_type == 'S':
        return PvtAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=proj_drop,
            sr_ratio=sr_ratio, linear=linear, qk_dim=qk_dim, v_dim=v_dim)
    raise ModelError(f"attn_type {attn_type!r} must be 'L' (focused linear) or 'S' (softmax)")


class PvtBlock(nn.Module):
    """PVT (v1) transformer block: pre-norm attention and MLP, one shared stochastic-depth module.

    Args:
        dim: Token width.
        num_patches: Tokens of the stage at the model's ``img_size``.
        num_heads: Number of heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim`` (when ``mlp_hidden`` is not given).
        qkv_bias: Bias on ``q`` and ``kv``.
        qk_scale: Explicit softmax scale (softmax attention only).
        drop: Dropout after ``proj`` and in the MLP.
        attn_drop: Dropout on the attention map.
        drop_path: Stochastic-depth rate.
        act_layer: MLP activation.
        norm_layer: Norm layer of ``norm1``/``norm2``.
        sr_ratio: Spatial-reduction ratio of keys/values.
        focusing_factor: Focusing power of linear attention.
        kernel_size: DWC kernel of linear attention.
        attn_type: ``'L'`` focused linear or ``'S'`` softmax attention.
        qk_dim: q/k channels per head (default ``dim // num_heads``).
        v_dim: v channels per head (default ``dim // num_heads``).
        mlp_hidden: MLP hidden width (default ``int(dim * mlp_ratio)``).
        dwc_shared: Share the DWC kernel bank across heads (linear attention).
    """

    def __init__(
            self,
            dim: int,
            num_patches: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            sr_ratio: int = 1,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_type: str = 'L',
            qk_dim: int | None = None,
            v_dim: int | None = None,
            mlp_hidden: int | None = None,
            dwc_shared: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = _make_attention(
            attn_type, dim, num_patches, num_heads, qkv_bias, qk_scale, attn_drop, drop, sr_ratio, False,
            focusing_factor, kernel_size, qk_dim, v_dim, dwc_shared)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=mlp_hidden or int(dim * mlp_ratio), act_layer=act_layer,
                       drop=drop)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Run the block on tokens ``(B, H * W, dim)``."""
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PvtPatchEmbed(PatchEmbed):
    """PVT (v1) patch embedding: timm's non-overlapping conv ``proj`` + ``norm`` (LayerNorm, eps 1e-5), returning the
    token grid size too. Like the official module it floors the grid when the input is not a multiple of the patch.

    Args:
        img_size: Input size the stage is built for (sets ``grid_size``/``num_patches``).
        patch_size: Patch (and stride) size.
        in_chans: Input channels.
        embed_dim: Output width.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         norm_layer=nn.LayerNorm, strict_img_size=False)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:  # type: ignore[override]
        """Embed ``(B, C, H, W)`` into tokens ``(B, H' * W', embed_dim)``; also returns ``(H', W')``."""
        x = self.proj(x)
        height, width = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, (height, width)


def _stage_img_size(img_size: int | tuple[int, int], stage: int) -> tuple[int, int]:
    """The input size a stage's patch embedding is built for (``img_size // 2 ** (stage + 1)`` after stage 0)."""
    size = to_2tuple(img_size)
    return size if stage == 0 else (size[0] // 2 ** (stage + 1), size[1] // 2 ** (stage + 1))


class PyramidVisionTransformer(nn.Module):
    """FLatten-PVT (v1): four stages of patch embedding + absolute position embedding + PVT blocks; mean-pooled tokens
    go to the ``head``.

    The constructor takes exactly the official arguments (same names and defaults) plus ``block_widths``. Like the
    official model, the final ``norm`` exists (and is in the state dict) but is not applied in ``forward``.

    Args:
        img_size: Input size (sets the position embeddings and linear-attention ``positional_encoding`` lengths).
        patch_size: Patch size of stage 1 (later stages use 2).
        in_chans: Input channels.
        num_classes: Classes of the head (0: no head).
        embed_dims: Width per stage.
        num_heads: Heads per stage.
        mlp_ratios: MLP ratio per stage.
        qkv_bias: Bias on ``q``/``kv``.
        qk_scale: Explicit softmax scale for softmax stages.
        drop_rate: Dropout rate (position embeddings, ``proj``, MLP).
        attn_drop_rate: Attention-map dropout (softmax stages).
        drop_path_rate: Stochastic-depth rate, linearly increasing over blocks.
        norm_layer: Norm of the blocks and of the final ``norm``.
        depths: Blocks per stage.
        sr_ratios: Spatial-reduction ratios of softmax ('S') stages.
        la_sr_ratios: Spatial-reduction ratios of focused-linear ('L') stages, one digit per stage.
        num_stages: Number of stages (the official head assumes 4).
        focusing_factor: Focusing power of linear attention.
        kernel_size: DWC kernel of linear attention.
        attn_type: One letter per stage, 'L' (focused linear) or 'S' (softmax); ``None`` means 'LLLL'.
        block_widths: Optional per-block widths, one dict per block in model order with any of ``qk_dim``,
            ``v_dim``, ``mlp_hidden``, ``dwc_shared`` (how a pruned model is described); ``None``: default widths.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            num_heads: Sequence[int] = (1, 2, 4, 8),
            mlp_ratios: Sequence[float] = (4, 4, 4, 4),
            qkv_bias: bool = False,
            qk_scale: float | None = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            depths: Sequence[int] = (3, 4, 6, 3),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            la_sr_ratios: str = '8421',
            num_stages: int = 4,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_type: str | None = 'LLLL',
            block_widths: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.depths = list(depths)
        self.num_stages = num_stages
        self.num_features = self.head_hidden_size = embed_dims[3]
        self.stage_attention = stage_attention(attn_type, la_sr_ratios, sr_ratios, num_stages)
        widths = expand_block_widths(block_widths, sum(depths[:num_stages]))
        self.block_widths = None if block_widths is None else [dict(w) for w in widths]  # as given

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        cur = 0
        for i in range(num_stages):
            patch_embed = PvtPatchEmbed(
                img_size=_stage_img_size(img_size, i), patch_size=patch_size if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1], embed_dim=embed_dims[i])
            num_patches = patch_embed.num_patches
            letter, sr_ratio = self.stage_attention[i]
            block = nn.ModuleList([PvtBlock(
                dim=embed_dims[i], num_patches=num_patches, num_heads=num_heads[i], mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                drop_path=dpr[cur + j], norm_layer=norm_layer, sr_ratio=sr_ratio, focusing_factor=focusing_factor,
                kernel_size=kernel_size, attn_type=letter, **widths[cur + j])
                for j in range(depths[i])])
            cur += depths[i]
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'pos_embed{i + 1}', nn.Parameter(torch.zeros(1, num_patches, embed_dims[i])))
            setattr(self, f'pos_drop{i + 1}', nn.Dropout(p=drop_rate))
            setattr(self, f'block{i + 1}', block)

        self.norm = norm_layer(embed_dims[3])
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            trunc_normal_(getattr(self, f'pos_embed{i + 1}'), std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (as in the official model)."""
        return {'cls_token'}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: identity)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_block_widths(self) -> list[dict[str, Any]]:
        """The actual widths of every block in model order, in the form the ``block_widths`` argument takes."""
        return [_widths_of(blk) for i in range(self.num_stages) for blk in getattr(self, f'block{i + 1}')]

    def _pos_embed(self, stage: int, height: int, width: int) -> Tensor:
        """Stage ``stage``'s position embedding for a ``height x width`` grid (bilinear resize when it differs)."""
        pos_embed = getattr(self, f'pos_embed{stage + 1}')
        patch_embed = getattr(self, f'patch_embed{stage + 1}')
        grid = patch_embed.grid_size
        # The official model compares the token count of stage 1 only; for later stages it always resizes, which is
        # the identity at the built size.
        if (height, width) == tuple(grid) or (stage == 0 and height * width == patch_embed.num_patches):
            return pos_embed
        pos_embed = pos_embed.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        pos_embed = F.interpolate(pos_embed, size=(height, width), mode='bilinear')
        return pos_embed.reshape(1, -1, height * width).permute(0, 2, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Run the stages; returns the last stage's tokens ``(B, N, num_features)`` (no final norm, as official)."""
        B = x.shape[0]
        for i in range(self.num_stages):
            x, (height, width) = getattr(self, f'patch_embed{i + 1}')(x)
            x = getattr(self, f'pos_drop{i + 1}')(x + self._pos_embed(i, height, width))
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, height, width)
            if i != self.num_stages - 1:
                x = x.reshape(B, height, width, -1).permute(0, 3, 1, 2).contiguous()
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Mean-pool the tokens and apply the head (unless ``pre_logits``)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for images ``(B, in_chans, H, W)``."""
        return self.forward_head(self.forward_features(x))


def _widths_of(block: nn.Module) -> dict[str, Any]:
    """A block's widths as a ``block_widths`` entry (shared by PVT and PVTv2 blocks)."""
    attn = block.attn
    widths: dict[str, Any] = {'qk_dim': attn.qk_dim, 'v_dim': attn.v_dim, 'mlp_hidden': block.mlp.fc1.out_features}
    if isinstance(attn, PvtFocusedLinearAttention):
        widths['dwc_shared'] = attn.dwc.shared
    return widths


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed1.proj', 'classifier': 'head', 'license': 'apache-2.0',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'flatten_pvt_tiny': _cfg(),
    'flatten_pvt_small': _cfg(),
    'flatten_pvt_medium': _cfg(),
    'flatten_pvt_large': _cfg(),
})


def _create_flatten_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained, **kwargs)


def _released(depths: tuple[int, ...], **kwargs: Any) -> dict[str, Any]:
    """The settings shared by all released FLatten-PVT models (official factories + ``cfgs/*.yaml``)."""
    args: dict[str, Any] = dict(
        patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), depths=depths, sr_ratios=(8, 4, 2, 1),
        attn_type='LLLL', la_sr_ratios='1111')
    args.update(kwargs)
    return args


@register_model
def flatten_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """FLatten-PVT-T (12.2M params, 2.0 GMACs at 224)."""
    return _create_flatten_pvt('flatten_pvt_tiny', pretrained, **_released((2, 2, 2, 2), **kwargs))


@register_model
def flatten_pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """FLatten-PVT-S."""
    return _create_flatten_pvt('flatten_pvt_small', pretrained, **_released((3, 4, 6, 3), **kwargs))


@register_model
def flatten_pvt_medium(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """FLatten-PVT-M."""
    return _create_flatten_pvt('flatten_pvt_medium', pretrained, **_released((3, 4, 18, 3), **kwargs))


@register_model
def flatten_pvt_large(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """FLatten-PVT-L (the repository's ``flatten_pvt_b`` config)."""
    return _create_flatten_pvt('flatten_pvt_large', pretrained, **_released((3, 8, 27, 3), **kwargs))
