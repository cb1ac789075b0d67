"""FLatten-DeiT: a DeiT/ViT whose every block uses focused linear attention (ours).

The FLatten Transformer paper reports a FLatten-DeiT-T (6.1M parameters, 1.1G MACs, 74.1% ImageNet top-1) but no code
was released; this is our construction. It follows timm's :class:`~timm.models.vision_transformer.VisionTransformer`
key names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1/attn/norm2/mlp.fc1/fc2``, ``norm``,
``head``) and puts FLatten's focused linear attention in every block:

* ``attn.qkv`` / ``attn.proj`` as in ViT; ``attn.scale`` ``(1, 1, H*qk_dim)`` and ``attn.positional_encoding``
  ``(1, tokens, H*qk_dim)`` added to k over all tokens, the class token included;
* ``attn.dwc`` (a :class:`~amap.models.attention.HeadDWC`) runs on the values of the *patch* tokens only, laid out on
  their grid; the class token is kept out of it (its DWC contribution is zero).

Per-head widths (``qk_dim`` / ``v_dim``) are arguments of the attention layer, so a pruned layer is that class rebuilt
with smaller widths (:meth:`~amap.models.helpers.Rebuildable.rebuild`).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.layers import PatchEmbed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from ..errors import ModelError
from . import helpers
from .attention import FocusedLinearAttention
from .helpers import BlockOptions, ClassifierMixin, flatten_cfg, init_weights, register_variants

__all__ = ['DeiTFocusedLinearAttention', 'FLattenDeiTBlock', 'FLattenDeiT']

class DeiTFocusedLinearAttention(FocusedLinearAttention):
    """Focused linear attention over prefix (class) tokens and a grid of patch tokens.

    All tokens attend to all tokens through the focused kernel; the depthwise convolution on v sees the patch tokens
    only (on their ``grid_size`` grid), and the prefix tokens receive no DWC term. The arguments are those of
    :class:`~amap.models.attention.FocusedLinearAttention`, with one class token by default.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **kwargs)


class FLattenDeiTBlock(nn.Module):
    """Pre-norm transformer block with focused linear attention (timm ``Block`` key names).

    Args:
        dim: Channels.
        num_heads: Number of heads.
        grid_size: Patch-token grid ``(H, W)``.
        num_prefix_tokens: Tokens before the patch tokens.
        drop_path: Stochastic depth rate.
        opts: MLP, dropout (``drop`` after projections and in the MLP), norm and linear-attention settings.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: tuple[int, int], num_prefix_tokens: int = 1,
                 drop_path: float = 0., opts: BlockOptions | None = None) -> None:
        super().__init__()
        opts = opts or BlockOptions()
        self.norm1 = opts.norm_layer(dim)
        self.attn = DeiTFocusedLinearAttention(
            dim, num_heads=num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, **opts.attention())
        self.drop_path1 = helpers.drop_path(drop_path)
        self.norm2 = opts.norm_layer(dim)
        self.mlp = opts.mlp(dim)
        self.drop_path2 = helpers.drop_path(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        """Run the block on tokens ``(B, N, C)``."""
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class FLattenDeiT(ClassifierMixin, nn.Module):
    """FLatten-DeiT: a ViT with focused linear attention in every block (ours; no official code exists).

    Args:
        img_size: Input image size.
        patch_size: Patch size.
        in_chans: Input channels.
        num_classes: Classes of the head (0: no head).
        global_pool: ``'token'`` (class token) or ``'avg'`` (mean of the patch tokens).
        embed_dim: Width.
        depth: Number of blocks.
        num_heads: Number of heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: Add a bias to qkv projections.
        class_token: Prepend a learned class token (required by ``global_pool='token'``).
        drop_rate: Dropout before the head.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after projections and in the MLP.
        attn_drop_rate: Attention dropout (unused by linear attention; kept for timm-style arguments).
        drop_path_rate: Stochastic depth rate (linearly increasing over blocks).
        norm_layer: Normalization layer (default ``LayerNorm(eps=1e-6)`` as in timm's ViT).
        act_layer: MLP activation.
        focusing_factor: Focusing power of linear attention.
        kernel_size: DWC kernel size of linear attention.
    """

    def __init__(
            self,
            img_size: int | tuple[int, int] = 224,
            patch_size: int | tuple[int, int] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            class_token: bool = True,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Callable[..., nn.Module] | None = None,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            focusing_factor: float = 3,
            kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if global_pool not in ('token', 'avg'):
            raise ModelError(f"global_pool={global_pool!r} must be 'token' or 'avg'")
        if global_pool == 'token' and not class_token:
            raise ModelError("global_pool='token' needs class_token=True; use global_pool='avg' without it")
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        opts = BlockOptions(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=proj_drop_rate, attn_drop=attn_drop_rate,
                            act_layer=act_layer, norm_layer=norm_layer, focusing_factor=focusing_factor,
                            kernel_size=kernel_size)
        self.blocks = nn.Sequential(*[
            FLattenDeiTBlock(embed_dim, num_heads=num_heads, grid_size=grid, num_prefix_tokens=self.num_prefix_tokens,
                             drop_path=dpr[i], opts=opts)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay."""
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay (timm convention)."""
        return dict(stem=r'^cls_token|pos_embed|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes (0: no head)."""
        if global_pool is not None:
            if global_pool not in ('token', 'avg') or (global_pool == 'token' and self.cls_token is None):
                raise ModelError(f'global_pool={global_pool!r} is not available for this model')
            self.global_pool = global_pool
        super().reset_classifier(num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to normalized tokens ``(B, prefix + patches, embed_dim)``."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool (class token or patch-token mean) and apply the head (or return the pooled features)."""
        x = x[:, 0] if self.global_pool == 'token' else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _create_flatten_deit(variant: str, pretrained: bool = False, **kwargs: Any) -> FLattenDeiT:
    return build_model_with_cfg(FLattenDeiT, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return flatten_cfg('patch_embed.proj', **{'crop_pct': .875, 'license': 'apache-2.0', **kwargs})


default_cfgs = generate_default_cfgs({
    'flatten_deit_tiny': _cfg(),
    'flatten_deit_small': _cfg(),
    'flatten_deit_base': _cfg(),
    'flatten_deit_micro': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
    'flatten_deit_nano': _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0),
})

_IMAGENET = dict(img_size=224, patch_size=16, depth=12)
_SMALL_INPUT = dict(img_size=32, patch_size=4, mlp_ratio=2.)

# The registered variants: name -> (docstring, settings).
register_variants(__name__, _create_flatten_deit, {
    'flatten_deit_tiny': ('FLatten-DeiT-T: 224, patch 16, dim 192, depth 12, 3 heads. 6.19M parameters, 1.14 GMACs '
                          'with attention matmuls and DWC (paper: 6.1M, 1.1G, 74.1% ImageNet top-1).',
                          dict(_IMAGENET, embed_dim=192, num_heads=3)),
    'flatten_deit_small': ('FLatten-DeiT-S: 224, patch 16, dim 384, depth 12, 6 heads. 22.98M parameters.',
                           dict(_IMAGENET, embed_dim=384, num_heads=6)),
    'flatten_deit_base': ('FLatten-DeiT-B: 224, patch 16, dim 768, depth 12, 12 heads. 88.41M parameters.',
                          dict(_IMAGENET, embed_dim=768, num_heads=12)),
    'flatten_deit_micro': ('Small FLatten-DeiT for 32x32 inputs (ours): patch 4 (8x8 grid + class token), dim 192, '
                           'depth 6, 3 heads, MLP ratio 2. 1.89M parameters and 0.13 GMACs at 10 classes.',
                           dict(_SMALL_INPUT, embed_dim=192, depth=6, num_heads=3)),
    'flatten_deit_nano': ('Tiny FLatten-DeiT for fast tests on 32x32 inputs (ours): patch 4, dim 64, depth 4, 2 heads, '
                          'MLP ratio 2. 0.16M parameters at 10 classes.',
                          dict(_SMALL_INPUT, embed_dim=64, depth=4, num_heads=2)),
})
