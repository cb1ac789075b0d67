"""FLatten-Swin: Swin Transformer with focused linear attention (Han et al., "FLatten Transformer", ICCV 2023).

Our own implementation of the official ``FLattenSwinTransformer`` (LeapLabTHU/FLatten-Transformer,
``models/flatten_swin.py``), written in timm's style. The constructor takes the official keyword arguments with the
official defaults, and the module tree and state-dict keys are the official ones (including the persistent
``relative_position_index`` and ``attn_mask`` buffers), so official checkpoints load with ``strict=True`` and
reproduce the official outputs.

Attention per stage is chosen by ``attn_type``, one letter per stage: ``L`` focused linear attention (windows of
``window_size`` clamped to the feature map, i.e. global attention in the released models), ``S`` softmax shifted-window
attention with relative position bias (window 7, or 12 when ``window_size > 56``; ``softmax_window_size`` overrides it),
``M`` a mix whose first ``n`` blocks are linear (``n`` follows the per-stage letters, e.g. ``'LLMS3'``).

Per-head widths are decoupled (``qk_dim`` / ``v_dim``, see :mod:`amap.models.attention`): a pruned attention layer is
its class rebuilt with smaller widths (:meth:`~amap.models.helpers.Rebuildable.rebuild`).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.swin_transformer import get_relative_position_index, window_partition, window_reverse
from torch import Tensor, nn

from ..errors import ModelError
from . import attention, helpers
from .attention import head_widths
from .helpers import BlockOptions, ClassifierMixin, Rebuildable, block_attn_types, register_variants

__all__ = [
    'FocusedLinearAttention', 'WindowAttention', 'SwinTransformerBlock', 'PatchMerging', 'BasicLayer',
    'FLattenSwinTransformer',
]

_logger = logging.getLogger(__name__)

class FocusedLinearAttention(attention.FocusedLinearAttention):
    """FLatten-Swin's ``L`` attention: the shared focused linear attention on the tokens of one window (the window is
    the layer's grid; ``forward(x, mask)`` ignores the shifted-window mask, as the official code does).

    Args:
        dim: Input (and output) channels.
        window_size: Window height and width.
        num_heads: Number of heads.
        **kwargs: The other arguments of :class:`~amap.models.attention.FocusedLinearAttention`.
    """

    def __init__(self, dim: int, window_size: int | tuple[int, int], num_heads: int, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, grid_size=to_2tuple(window_size), **kwargs)
        self.window_size = to_2tuple(window_size)


class WindowAttention(Rebuildable, nn.Module):
    """Softmax window attention with relative position bias (Swin W-MSA / SW-MSA), FLatten-Swin's ``S`` attention.

    When ``qk_dim`` is smaller than the original head width, the softmax scale stays ``(dim // num_heads) ** -0.5``
    (or ``qk_scale``), so a model with q/k channels removed computes the same logits as the masked original.

    Args:
        dim: Input (and output) channels.
        window_size: Window height and width.
        num_heads: Number of heads.
        qkv_bias: Add a bias to the qkv projection.
        qk_scale: Override the softmax scale ``head_dim ** -0.5`` of the original head width.
        attn_drop, proj_drop: Dropout on the attention weights, after the output projection.
        qk_dim, v_dim: q/k and v channels per head (default ``dim // num_heads``).
    """

    def __init__(
            self,
            dim: int,
            window_size: tuple[int, int],
            num_heads: int,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            qk_dim: int | None = None,
            v_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        self.head_dim, self.qk_dim, self.v_dim = head_widths(dim, num_heads, qk_dim, v_dim)
        self.scale = qk_scale or self.head_dim ** -0.5
        win_h, win_w = self.window_size

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads))
        self.register_buffer('relative_position_index', get_relative_position_index(win_h, win_w))
        self.qkv = nn.Linear(dim, num_heads * (2 * self.qk_dim + self.v_dim), bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * self.v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _relative_position_bias(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)  # 1, H, n, n

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within each window.

        Args:
            x: Window tokens, ``(num_windows * B, Wh * Ww, dim)``.
            mask: Additive (0 / -100) shifted-window mask ``(num_windows, Wh * Ww, Wh * Ww)`` or None.

        Returns:
            ``(num_windows * B, Wh * Ww, dim)``.
        """
        B_, N, _ = x.shape
        H, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([H * dq, H * dq, H * dv], dim=-1)
        q = q.reshape(B_, N, H, dq).transpose(1, 2) * self.scale
        k = k.reshape(B_, N, H, dq).transpose(1, 2)
        v = v.reshape(B_, N, H, dv).transpose(1, 2)
        attn = q @ k.transpose(-2, -1) + self._relative_position_bias()
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(B_ // num_win, num_win, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(B_, H, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(B_, N, H * dv)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'qk_dim={self.qk_dim}, v_dim={self.v_dim}')


def _shifted_window_mask(resolution: tuple[int, int], window_size: int, shift_size: int) -> Tensor:
    """The additive mask (0 / -100) keeping attention inside the regions of a cyclically shifted window grid."""
    H, W = resolution
    region = torch.zeros(1, H, W, 1)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    windows = window_partition(region, (window_size, window_size)).view(-1, window_size * window_size)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class SwinTransformerBlock(nn.Module):
    """One FLatten-Swin block: (shifted-)window attention and an MLP, each in a pre-norm residual branch.

    If the feature map is not larger than ``window_size``, the window is clamped to the map and not shifted (as in the
    official code); the clamped window fixes the size of ``positional_encoding`` and the relative-position tables.

    Args:
        dim: Channels.
        input_resolution: Token grid ``(H, W)`` of this stage.
        num_heads: Number of heads.
        window_size: Window size before clamping.
        shift_size: Cyclic shift (0 for W-MSA blocks, ``window_size // 2`` for SW-MSA blocks).
        drop_path: Stochastic depth rate.
        attn_type: ``'L'`` (focused linear) or ``'S'`` (softmax with relative position bias).
        opts: MLP, dropout, norm and attention settings (``focusing_factor`` and ``kernel_size`` for ``L`` attention,
            ``qk_scale`` for ``S`` attention).
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 7,
                 shift_size: int = 0, drop_path: float = 0., attn_type: str = 'L',
                 opts: BlockOptions | None = None) -> None:
        super().__init__()
        opts = opts or BlockOptions()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.num_heads = num_heads
        self.mlp_ratio = opts.mlp_ratio
        self.attn_type = attn_type
        clamped = min(self.input_resolution) <= window_size  # one unshifted window over the whole map
        self.window_size = min(self.input_resolution) if clamped else window_size
        self.shift_size = 0 if clamped else shift_size
        if not 0 <= self.shift_size < self.window_size:
            raise ModelError(f'shift_size={shift_size} must be in [0, window_size={self.window_size})')

        self.norm1 = opts.norm_layer(dim)
        window = to_2tuple(self.window_size)
        linear = helpers.is_linear(attn_type)
        attn_cls = FocusedLinearAttention if linear else WindowAttention
        self.attn = attn_cls(dim, window_size=window, num_heads=num_heads, **opts.attention(linear=linear))
        self.drop_path = helpers.drop_path(drop_path)
        self.norm2 = opts.norm_layer(dim)
        self.mlp = opts.mlp(dim)

        mask = None
        if self.shift_size > 0:
            mask = _shifted_window_mask(self.input_resolution, self.window_size, self.shift_size)
        self.register_buffer('attn_mask', mask)

    def forward(self, x: Tensor) -> Tensor:
        """Run the block on tokens ``(B, H*W, C)``."""
        H, W = self.input_resolution
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f'expected {H}x{W}={H * W} tokens, got {L}')
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        window = (self.window_size, self.window_size)
        windows = window_partition(x, window).view(-1, self.window_size * self.window_size, C)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, self.window_size, self.window_size, C), window, H, W)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, num_heads={self.num_heads}, '
                f'window_size={self.window_size}, shift_size={self.shift_size}, attn_type={self.attn_type}')


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood of tokens (4C), normalize, and project to ``out_dim`` (2C) channels.

    The concatenation order is (even row, even col), (odd, even), (even, odd), (odd, odd), as in Swin; ``reduction``
    is registered before ``norm`` so that the state-dict order is the official one.

    Args:
        dim: Input channels.
        out_dim: Output channels (default ``2 * dim``).
        norm_layer: Normalization layer over the ``4 * dim`` concatenated channels.
    """

    def __init__(self, dim: int, out_dim: int | None = None,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        """Merge ``(B, H, W, C)`` (H and W even) into ``(B, H/2, W/2, out_dim)``."""
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f'patch merging needs an even token grid, got {H}x{W}')
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One FLatten-Swin stage: ``depth`` blocks, then an optional patch merging (``downsample``).

    Args:
        dim: Channels of the stage.
        input_resolution: Token grid ``(H, W)`` of the stage.
        depth: Number of blocks.
        num_heads: Number of heads.
        window_size: Window size of linear-attention blocks (softmax blocks use 7, or 12 if this is above 56).
        drop_path: Stochastic depth rate, one for all blocks or a list with one per block.
        downsample: Whether to end the stage with a :class:`PatchMerging` (bool, or any truthy value such as a
            class, for compatibility with the official signature).
        use_checkpoint: Recompute the blocks in the backward pass (activation checkpointing) while training.
        attn_type: ``'L'``, ``'S'``, ``'M<n>'`` (first ``n`` blocks linear, the rest softmax), or a letter per block.
        softmax_window_size: Window of softmax blocks; None applies the official rule above.
        opts: The settings of every :class:`SwinTransformerBlock` (``norm_layer`` also for the patch merging).
    """

    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 drop_path: float | Sequence[float] = 0., downsample: Any = None, use_checkpoint: bool = False,
                 attn_type: str | Sequence[str] = 'L', softmax_window_size: int | None = None,
                 opts: BlockOptions | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        attn_types = block_attn_types(attn_type, [depth])[0] if isinstance(attn_type, str) else list(attn_type)
        if softmax_window_size is None:
            softmax_window_size = 7 if window_size <= 56 else 12
        windows = [window_size if t == 'L' else softmax_window_size for t in attn_types]
        opts = opts or BlockOptions()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=self.input_resolution, num_heads=num_heads, window_size=windows[i],
                shift_size=0 if i % 2 == 0 else windows[i] // 2,
                drop_path=drop_path[i] if isinstance(drop_path, Sequence) else drop_path, attn_type=attn_types[i],
                opts=opts)
            for i in range(depth)])
        self.downsample = PatchMerging(dim, 2 * dim, norm_layer=opts.norm_layer) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        """Run the stage on tokens ``(B, H*W, C)``; returns ``(B, H*W/4, 2C)`` when it downsamples."""
        for blk in self.blocks:
            if self.use_checkpoint and self.training and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if self.downsample is not None:
            H, W = self.input_resolution
            x = self.downsample(x.view(x.shape[0], H, W, -1)).flatten(1, 2)
        return x

    def extra_repr(self) -> str:
        return f'dim={self.dim}, input_resolution={self.input_resolution}, depth={self.depth}'


class FLattenSwinTransformer(ClassifierMixin, nn.Module):
    """FLatten-Swin Transformer (official constructor, keys and numerics).

    Args:
        img_size: Input image size.
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classes of the head (0: no head).
        embed_dim: Channels of the first stage (doubled by each patch merging).
        depths: Blocks per stage.
        num_heads: Heads per stage.
        window_size: Window of linear-attention stages (clamped to the feature map); the official default is 7, the
            released models use 56 (224 input) or 96 (384 input), i.e. global linear attention.
        mlp_ratio: MLP hidden width over the stage width.
        qkv_bias: Add a bias to qkv projections.
        qk_scale: Softmax scale override.
        drop_rate: Dropout rate.
        attn_drop_rate: Attention dropout rate.
        drop_path_rate: Stochastic depth rate (linearly increasing over blocks). The official default is 0.1; the
            registered factories set 0 (the cfgs' training values are a training choice, pass them explicitly).
        norm_layer: Normalization layer.
        ape: Add a learned absolute position embedding.
        patch_norm: Normalize the patch embedding.
        use_checkpoint: Activation checkpointing while training.
        focusing_factor: Focusing power of linear attention.
        kernel_size: DWC kernel size of linear attention.
        attn_type: Attention per stage (``L``/``S``/``M``; see the module docstring).
        softmax_window_size: Window of softmax (``S``) blocks before clamping (ours). None keeps the official rule:
            7, or 12 when ``window_size > 56``.
        **kwargs: Accepted and ignored, as the official constructor does (a warning names them).
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int | tuple[int, int] = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            ape: bool = False,
            patch_norm: bool = True,
            use_checkpoint: bool = False,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_type: str = 'LLLL',
            softmax_window_size: int | None = None,
            **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            _logger.warning('FLattenSwinTransformer ignores unknown arguments: %s', ', '.join(sorted(kwargs)))
        depths, num_heads = list(depths), list(num_heads)
        if len(num_heads) != len(depths):
            raise ModelError(f'num_heads={num_heads} needs one entry per stage of depths={depths}')
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.attn_type = attn_type

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None)
        grid = self.patch_embed.grid_size
        self.patches_resolution = list(grid)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        total = sum(depths)
        dpr = torch.linspace(0, drop_path_rate, total, device='cpu').tolist()
        stage_types = block_attn_types(attn_type, depths)
        opts = BlockOptions(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                            attn_drop=attn_drop_rate, norm_layer=norm_layer, focusing_factor=focusing_factor,
                            kernel_size=kernel_size)
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            start, end = sum(depths[:i]), sum(depths[:i + 1])
            self.layers.append(BasicLayer(
                dim=int(embed_dim * 2 ** i), input_resolution=(grid[0] // 2 ** i, grid[1] // 2 ** i),
                depth=depths[i], num_heads=num_heads[i], window_size=window_size, drop_path=dpr[start:end],
                downsample=i < self.num_layers - 1, use_checkpoint=use_checkpoint, attn_type=stage_types[i],
                softmax_window_size=softmax_window_size, opts=opts))
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(helpers.init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        """Parameter name fragments excluded from weight decay."""
        return {'relative_position_bias_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(
            stem=r'^absolute_pos_embed|patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+).downsample', (0,)),
                (r'^layers\.(\d+)\.\w+\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in every stage."""
        for layer in self.layers:
            layer.use_checkpoint = enable

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to normalized final-stage tokens ``(B, L, num_features)``."""
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Average-pool the tokens and apply the head (or return the pooled features if ``pre_logits``)."""
        x = self.avgpool(x.transpose(1, 2)).flatten(1)
        return x if pre_logits else self.head(x)


def _create_flatten_swin(variant: str, pretrained: bool = False, **kwargs: Any) -> FLattenSwinTransformer:
    """A registered FLatten-Swin: the released settings, overridden by ``kwargs`` (the variant's, then the caller's)."""
    released = dict(img_size=224, patch_size=4, window_size=56, attn_type='LLSS', drop_path_rate=0.)
    return build_model_with_cfg(FLattenSwinTransformer, variant, pretrained, **{**released, **kwargs})


_cfg = partial(helpers.flatten_cfg, 'patch_embed.proj')
default_cfgs = generate_default_cfgs({
    'flatten_swin_tiny': _cfg(),
    'flatten_swin_small': _cfg(),
    'flatten_swin_base': _cfg(),
    'flatten_swin_base_384': _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    'flatten_swin_micro': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, license='apache-2.0'),
    'flatten_swin_nano': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, license='apache-2.0'),
})

_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_CIFAR = dict(img_size=32, patch_size=2, window_size=16, softmax_window_size=4)

# The registered variants (cfgs/flatten_swin_*.yaml, and two of ours for 32x32 inputs): name -> (docstring, settings).
register_variants(__name__, _create_flatten_swin, {
    'flatten_swin_tiny': (
        'FLatten-Swin-T (cfgs/flatten_swin_t.yaml): 224, embed 96, depths 2-2-6-2, heads 3-6-12-24, LLSS. '
        '29.19M parameters, 4.5 GMACs (paper: 82.1% ImageNet top-1).', _T),
    'flatten_swin_small': (
        'FLatten-Swin-S (cfgs/flatten_swin_s.yaml): 224, embed 96, depths 2-2-18-2, heads 3-6-12-24, LLSS. '
        '50.51M parameters, 8.7 GMACs (paper: 83.5% ImageNet top-1).', dict(_T, depths=(2, 2, 18, 2))),
    'flatten_swin_base': (
        'FLatten-Swin-B (cfgs/flatten_swin_b.yaml): 224, embed 128, depths 2-2-18-2, heads 4-8-16-32, LLSS. '
        '88.97M parameters, 15.4 GMACs (paper: 83.8% ImageNet top-1).', _B),
    'flatten_swin_base_384': (
        'FLatten-Swin-B at 384 (cfgs/flatten_swin_b_384.yaml): window 96 (linear stages global at 96/48), softmax '
        'windows of 12 in stages 3-4; embed 128, depths 2-2-18-2, heads 4-8-16-32, LLSS. 91.43M parameters.',
        dict(_B, img_size=384, window_size=96)),
    'flatten_swin_micro': (
        'Small FLatten-Swin for 32x32 inputs (ours): patch 2, embed 32, depths 2-2-4-2, heads 2-4-8-16, LLSS. Token '
        'grids 16/8/4/2: global focused linear attention in stages 1-2 (windows of 16), softmax attention with '
        'relative position bias in stages 3-4 (windows of 4, so larger ``img_size`` powers of two get shifted '
        'windows). 2.70M parameters, 0.035 GMACs at 10 classes.',
        dict(_CIFAR, embed_dim=32, depths=(2, 2, 4, 2), num_heads=(2, 4, 8, 16))),
    'flatten_swin_nano': (
        'Tiny FLatten-Swin for fast tests on 32x32 inputs (ours): patch 2, embed 24, depths 1-1-2, heads 2-4-8, LLS. '
        'Token grids 16/8/4: global linear attention in stages 1-2 (windows of 16), softmax in stage 3 (windows of '
        '4). 0.29M parameters at 10 classes.',
        dict(_CIFAR, embed_dim=24, depths=(1, 1, 2), num_heads=(2, 4, 8), attn_type='LLS')),
})
