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

Widths: every attention module accepts per-head ``qk_dim`` and ``v_dim``, so a pruned attention layer is its class
rebuilt with smaller widths (:meth:`~amap.models.helpers.Rebuildable.rebuild`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from ..errors import ModelError
from . import helpers
from .attention import FocusedLinearAttention, SpatialReduction, head_widths
from .helpers import BlockOptions, ClassifierMixin, Rebuildable, flatten_cfg, init_weights

__all__ = [
    'PyramidVisionTransformer', 'PyramidStages', 'PvtAttention', 'PvtFocusedLinearAttention', 'PvtBlock',
    'PvtPatchEmbed', 'stage_attention', 'pvt_attention',
]

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


class PvtAttention(SpatialReduction, Rebuildable):
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
        self.dim = dim
        self.num_heads = num_heads
        head_dim, self.qk_dim, self.v_dim = head_widths(dim, num_heads, qk_dim, v_dim)
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


class PvtFocusedLinearAttention(FocusedLinearAttention):
    """FLatten's focused linear attention in PVT form (``attn_type`` 'L'): separate ``q`` and ``kv`` projections,
    optional spatial reduction of keys/values, and the depthwise conv on the values interpolated back to the query
    tokens when keys/values are reduced (see :class:`~amap.models.attention.FocusedLinearAttention`).

    Args:
        dim: Token width.
        num_patches: Tokens of the stage at the model's ``img_size`` (sets ``positional_encoding``'s length,
            ``num_patches // sr_ratio ** 2``, as in the official code).
        num_heads: Number of heads.
        qkv_bias: Bias on ``q`` and ``kv``.
        **kwargs: The other arguments of :class:`~amap.models.attention.FocusedLinearAttention` (``sr_ratio``,
            ``linear``, ``qk_dim``, ``v_dim``, ``dwc_shared``, ...).
    """

    def __init__(self, dim: int, num_patches: int, num_heads: int = 8, qkv_bias: bool = False, sr_ratio: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, num_tokens=num_patches // (sr_ratio * sr_ratio), qkv_bias=qkv_bias,
                         qkv_layout='q_kv', sr_ratio=sr_ratio, **kwargs)


def pvt_attention(attn_type: str, dim: int, num_patches: int, num_heads: int, **kwargs: Any) -> nn.Module:
    """The attention module of a PVT/PVTv2 block for ``attn_type`` 'L' (:class:`PvtFocusedLinearAttention`) or 'S'
    (:class:`PvtAttention`); ``kwargs`` are the modules' arguments (``focusing_factor`` and ``kernel_size`` go to
    linear attention only)."""
    if helpers.is_linear(attn_type):
        return PvtFocusedLinearAttention(dim, num_patches, num_heads=num_heads, **kwargs)
    for name in ('focusing_factor', 'kernel_size'):
        kwargs.pop(name, None)
    return PvtAttention(dim, num_heads=num_heads, **kwargs)


class PvtBlock(nn.Module):
    """PVT (v1) transformer block: pre-norm attention and MLP, one shared stochastic-depth module.

    Args:
        dim: Token width.
        num_patches: Tokens of the stage at the model's ``img_size``.
        num_heads: Number of heads.
        drop_path: Stochastic-depth rate.
        sr_ratio: Spatial-reduction ratio of keys/values.
        linear: PVTv2-Li (pooled keys/values; ReLU in PVTv2's MLP).
        attn_type: ``'L'`` focused linear or ``'S'`` softmax attention.
        opts: MLP, dropout, norm and attention settings (``qk_scale`` for softmax attention; ``focusing_factor`` and
            ``kernel_size`` for linear attention); by default those of the official block (no qkv bias).
    """

    def __init__(self, dim: int, num_patches: int, num_heads: int, drop_path: float = 0., sr_ratio: int = 1,
                 linear: bool = False, attn_type: str = 'L', opts: BlockOptions | None = None) -> None:
        super().__init__()
        opts = opts or BlockOptions(qkv_bias=False)
        self.norm1 = opts.norm_layer(dim)
        self.attn = pvt_attention(attn_type, dim, num_patches, num_heads, sr_ratio=sr_ratio, linear=linear,
                                  **opts.attention())
        self.drop_path = helpers.drop_path(drop_path)
        self.norm2 = opts.norm_layer(dim)
        self.mlp = self._make_mlp(dim, opts, linear)

    def _make_mlp(self, dim: int, opts: BlockOptions, linear: bool) -> nn.Module:
        return opts.mlp(dim)

    def _run_mlp(self, x: Tensor, H: int, W: int) -> Tensor:
        return self.mlp(x)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Run the block on tokens ``(B, H * W, dim)``."""
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self._run_mlp(self.norm2(x), H, W))


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


class PyramidStages(ClassifierMixin, nn.Module):
    """The stage layout PVT v1 and PVTv2 share: per stage ``i`` (from 1) a patch embedding ``patch_embed{i}`` and the
    blocks ``block{i}``, the token map going to the next stage; the last stage's mean-pooled tokens go to ``head``.

    A subclass builds its stages with :meth:`_build_stages` and says what differs: the patch embedding
    (:meth:`_embedding`, :meth:`_embed`), what else a stage holds (:meth:`_add_stage`) and what follows its blocks
    (:meth:`_stage_out`).
    """

    block_cls: type[PvtBlock] = PvtBlock

    def _build_stages(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, embed_dims: Sequence[int],
                      num_heads: Sequence[int], mlp_ratios: Sequence[float], depths: Sequence[int], num_stages: int,
                      drop_path_rate: float, stage_attn: list[tuple[str, int]], opts: BlockOptions,
                      linear: bool = False) -> None:
        """Build the stages (the official constructors' arguments; ``stage_attn`` from :func:`stage_attention`,
        ``opts`` the block settings but the per-stage ``mlp_ratios``)."""
        self.depths = list(depths)
        self.num_stages = num_stages
        self.num_features = self.head_hidden_size = embed_dims[3]
        self.stage_attention = stage_attn
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        size = to_2tuple(img_size)
        for i in range(num_stages):
            stage_size = size if i == 0 else (size[0] // 2 ** (i + 1), size[1] // 2 ** (i + 1))
            patch_embed, num_patches = self._embedding(
                i, stage_size, patch_size, in_chans if i == 0 else embed_dims[i - 1], embed_dims[i])
            letter, sr_ratio = stage_attn[i]
            first, stage_opts = sum(depths[:i]), dataclasses.replace(opts, mlp_ratio=mlp_ratios[i])
            blocks = nn.ModuleList([self.block_cls(
                embed_dims[i], num_patches, num_heads[i], drop_path=dpr[first + j], sr_ratio=sr_ratio, linear=linear,
                attn_type=letter, opts=stage_opts) for j in range(depths[i])])
            self._add_stage(i, patch_embed, blocks, num_patches, embed_dims[i], opts)

    def _embedding(self, stage: int, stage_size: tuple[int, int], patch_size: int, in_chans: int,
                   embed_dim: int) -> tuple[nn.Module, int]:
        """Stage ``stage``'s patch embedding for inputs of ``stage_size``, and its number of tokens there."""
        raise NotImplementedError

    def _add_stage(self, stage: int, patch_embed: nn.Module, blocks: nn.ModuleList, num_patches: int, dim: int,
                   opts: BlockOptions) -> None:
        """Register stage ``stage``'s modules (in the official state-dict order)."""
        raise NotImplementedError

    def _embed(self, stage: int, x: Tensor) -> tuple[Tensor, int, int]:
        """Stage ``stage``'s tokens ``(B, H * W, C)`` of its input map ``(B, C', H', W')``, and ``H``, ``W``."""
        raise NotImplementedError

    def _stage_out(self, stage: int, x: Tensor) -> Tensor:
        """What follows stage ``stage``'s blocks (nothing by default)."""
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        """Run the stages; returns the last stage's tokens ``(B, N, num_features)``."""
        B = x.shape[0]
        for i in range(self.num_stages):
            x, height, width = self._embed(i, x)
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, height, width)
            x = self._stage_out(i, x)
            if i != self.num_stages - 1:
                x = x.reshape(B, height, width, -1).permute(0, 3, 1, 2).contiguous()
        return x


class PyramidVisionTransformer(PyramidStages):
    """FLatten-PVT (v1): four stages of patch embedding + absolute position embedding + PVT blocks; mean-pooled tokens
    go to the ``head``.

    The constructor takes exactly the official arguments (same names and defaults). Like the
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
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        opts = BlockOptions(qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                            norm_layer=norm_layer, focusing_factor=focusing_factor, kernel_size=kernel_size)
        self._build_stages(img_size, patch_size, in_chans, embed_dims, num_heads, mlp_ratios, depths, num_stages,
                           drop_path_rate, stage_attention(attn_type, la_sr_ratios, sr_ratios, num_stages), opts)
        self.norm = norm_layer(embed_dims[3])
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            trunc_normal_(getattr(self, f'pos_embed{i + 1}'), std=.02)
        self.apply(init_weights)

    def _embedding(self, stage: int, stage_size: tuple[int, int], patch_size: int, in_chans: int,
                   embed_dim: int) -> tuple[nn.Module, int]:
        patch_embed = PvtPatchEmbed(img_size=stage_size, patch_size=patch_size if stage == 0 else 2, in_chans=in_chans,
                                    embed_dim=embed_dim)
        return patch_embed, patch_embed.num_patches

    def _add_stage(self, stage: int, patch_embed: nn.Module, blocks: nn.ModuleList, num_patches: int, dim: int,
                   opts: BlockOptions) -> None:
        setattr(self, f'patch_embed{stage + 1}', patch_embed)
        setattr(self, f'pos_embed{stage + 1}', nn.Parameter(torch.zeros(1, num_patches, dim)))
        setattr(self, f'pos_drop{stage + 1}', nn.Dropout(p=opts.drop))
        setattr(self, f'block{stage + 1}', blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (as in the official model)."""
        return {'cls_token'}

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

    def _embed(self, stage: int, x: Tensor) -> tuple[Tensor, int, int]:
        x, (height, width) = getattr(self, f'patch_embed{stage + 1}')(x)
        x = getattr(self, f'pos_drop{stage + 1}')(x + self._pos_embed(stage, height, width))
        return x, height, width


default_cfgs = generate_default_cfgs({
    f'flatten_pvt_{size}': flatten_cfg('patch_embed1.proj', crop_pct=0.875, license='apache-2.0')
    for size in ('tiny', 'small', 'medium', 'large')})


def _create_flatten_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """A registered FLatten-PVT: the released settings (official factories + ``cfgs/*.yaml``), overridden by
    ``kwargs`` (the variant's, then the caller's)."""
    return build_model_with_cfg(PyramidVisionTransformer, variant, pretrained, **{**RELEASED, **kwargs})


# The settings shared by all released FLatten-PVT models; PVTv2's are the same but for its per-variant widths.
RELEASED: dict[str, Any] = dict(
    patch_size=4, embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), qkv_bias=True,
    norm_layer=partial(nn.LayerNorm, eps=1e-6), sr_ratios=(8, 4, 2, 1), attn_type='LLLL', la_sr_ratios='1111')

# The registered variants: name -> (docstring, settings).
helpers.register_variants(__name__, _create_flatten_pvt, {
    'flatten_pvt_tiny': ('FLatten-PVT-T (12.2M params, 2.0 GMACs at 224).', dict(depths=(2, 2, 2, 2))),
    'flatten_pvt_small': ('FLatten-PVT-S.', dict(depths=(3, 4, 6, 3))),
    'flatten_pvt_medium': ('FLatten-PVT-M.', dict(depths=(3, 4, 18, 3))),
    'flatten_pvt_large': ("FLatten-PVT-L (the repository's ``flatten_pvt_b`` config).", dict(depths=(3, 8, 27, 3))),
})
