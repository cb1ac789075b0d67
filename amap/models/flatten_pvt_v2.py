"""FLatten-PVTv2: the Pyramid Vision Transformer v2 with focused linear attention.

Our own implementation of ``PyramidVisionTransformerV2`` of the official FLatten Transformer code (LeapLabTHU,
``models/flatten_pvt_v2.py``): same constructor arguments and defaults, same module tree and state-dict keys, same
arithmetic. Compared with v1 (:mod:`amap.models.flatten_pvt`, whose attention modules are reused): overlapping patch
embeddings (timm's ``OverlapPatchEmbed``), no absolute position embeddings, a depthwise 3x3 conv inside the MLP
(keys ``mlp.dwconv.dwconv.*``), a norm after every stage, and the ``linear`` option (PVTv2-Li: keys/values pooled to
7x7, ReLU in the MLP).

The registered factories build the released models (``attn_type='LLLL'``, ``la_sr_ratios='1111'``).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models.pvt_v2 import OverlapPatchEmbed
from torch import Tensor, nn

from . import helpers
from .flatten_pvt import RELEASED, PvtBlock, PyramidStages, stage_attention
from .helpers import BlockOptions, flatten_cfg, init_weights_with_conv

__all__ = ['PyramidVisionTransformerV2', 'PvtV2Block', 'DWConvMlp', 'DWConv']


class DWConv(nn.Module):
    """Depthwise 3x3 conv on tokens (the official wrapper, kept for its state-dict key ``dwconv.dwconv``).

    Args:
        dim: Channels.
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Convolve tokens ``(B, H * W, C)`` on their ``H x W`` grid."""
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).view(B, C, H, W))
        return x.flatten(2).transpose(1, 2)


class DWConvMlp(nn.Module):
    """PVTv2 MLP: ``fc1`` -> (ReLU if ``linear``) -> depthwise 3x3 conv -> activation -> ``fc2``.

    Args:
        in_features: Input width.
        hidden_features: Hidden width (default ``in_features``).
        out_features: Output width (default ``in_features``).
        act_layer: Activation.
        drop: Dropout after the activation and after ``fc2``.
        linear: PVTv2-Li: ReLU after ``fc1``.
    """

    def __init__(
            self,
            in_features: int,
            hidden_features: int | None = None,
            out_features: int | None = None,
            act_layer: Callable[..., nn.Module] = nn.GELU,
            drop: float = 0.,
            linear: bool = False,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)
        self.linear = linear
        if linear:
            self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """Run the MLP on tokens ``(B, H * W, C)``."""
        x = self.fc1(x)
        if self.linear:
            x = self.relu(x)
        x = self.act(self.dwconv(x, H, W))
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class PvtV2Block(PvtBlock):
    """PVTv2 transformer block: a :class:`~amap.models.flatten_pvt.PvtBlock` (same arguments) whose MLP is a
    :class:`DWConvMlp` (with ``linear``, PVTv2-Li: pooled keys/values and a ReLU in the MLP)."""

    def _make_mlp(self, dim: int, opts: BlockOptions, linear: bool) -> nn.Module:
        return DWConvMlp(in_features=dim, hidden_features=int(dim * opts.mlp_ratio), act_layer=opts.act_layer,
                         drop=opts.drop, linear=linear)

    def _run_mlp(self, x: Tensor, H: int, W: int) -> Tensor:
        return self.mlp(x, H, W)


class PyramidVisionTransformerV2(PyramidStages):
    """FLatten-PVTv2: four stages of overlapping patch embedding + PVTv2 blocks + norm; mean-pooled tokens go to the
    ``head``.

    The constructor takes exactly the official arguments (same names and defaults).
    ``patch_size`` is accepted but unused, as in the official model (stage 1 is a 7x7/4 conv, later stages 3x3/2).

    The arguments it shares with :class:`~amap.models.flatten_pvt.PyramidVisionTransformer` mean the same; these differ:

    Args:
        img_size: Input size (sets only the linear-attention ``positional_encoding`` lengths; no position embeddings).
        patch_size: Unused (official signature).
        norm_layer: Norm of the blocks and of the stage norms.
        linear: PVTv2-Li everywhere (keys/values pooled to 7x7, ReLU in the MLP).
    """

    block_cls = PvtV2Block

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
            linear: bool = False,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_type: str | None = 'LLLL',
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        opts = BlockOptions(qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                            norm_layer=norm_layer, focusing_factor=focusing_factor, kernel_size=kernel_size)
        self._build_stages(img_size, patch_size, in_chans, embed_dims, num_heads, mlp_ratios, depths, num_stages,
                           drop_path_rate, stage_attention(attn_type, la_sr_ratios, sr_ratios, num_stages), opts,
                           linear=linear)
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights_with_conv)

    def _embedding(self, stage: int, stage_size: tuple[int, int], patch_size: int, in_chans: int,
                   embed_dim: int) -> tuple[nn.Module, int]:
        stride = 4 if stage == 0 else 2
        patch_embed = OverlapPatchEmbed(patch_size=7 if stage == 0 else 3, stride=stride, in_chans=in_chans,
                                        embed_dim=embed_dim)
        return patch_embed, (stage_size[0] // stride) * (stage_size[1] // stride)

    def _add_stage(self, stage: int, patch_embed: nn.Module, blocks: nn.ModuleList, num_patches: int, dim: int,
                   opts: BlockOptions) -> None:
        setattr(self, f'patch_embed{stage + 1}', patch_embed)
        setattr(self, f'block{stage + 1}', blocks)
        setattr(self, f'norm{stage + 1}', opts.norm_layer(dim))

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (as in the official model)."""
        return {'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4', 'cls_token'}

    def _embed(self, stage: int, x: Tensor) -> tuple[Tensor, int, int]:
        x = getattr(self, f'patch_embed{stage + 1}')(x)  # (B, H, W, C), normalised
        height, width = x.shape[1:3]
        return x.flatten(1, 2), height, width

    def _stage_out(self, stage: int, x: Tensor) -> Tensor:
        return getattr(self, f'norm{stage + 1}')(x)


default_cfgs = generate_default_cfgs({
    f'flatten_pvt_v2_b{i}': flatten_cfg('patch_embed1.proj', crop_pct=0.875, license='apache-2.0') for i in range(6)})


def _create_flatten_pvt_v2(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformerV2:
    """A registered FLatten-PVTv2: FLatten-PVT's released settings (official factories + ``cfgs/*.yaml``), overridden
    by ``kwargs`` (the variant's, then the caller's)."""
    return build_model_with_cfg(PyramidVisionTransformerV2, variant, pretrained, **{**RELEASED, **kwargs})


def _variant(depths: tuple[int, ...], mlp_ratios: tuple[int, ...] = (8, 8, 4, 4),
             embed_dims: tuple[int, ...] = (64, 128, 320, 512)) -> dict[str, Any]:
    return dict(depths=depths, mlp_ratios=mlp_ratios, embed_dims=embed_dims)


# The registered variants: name -> (docstring, settings).
helpers.register_variants(__name__, _create_flatten_pvt_v2, {
    'flatten_pvt_v2_b0': ('FLatten-PVTv2-B0.', _variant((2, 2, 2, 2), embed_dims=(32, 64, 160, 256))),
    'flatten_pvt_v2_b1': ('FLatten-PVTv2-B1 (12.9M params, 2.2 GMACs at 224).', _variant((2, 2, 2, 2))),
    'flatten_pvt_v2_b2': ('FLatten-PVTv2-B2 (4.3 GMACs at 224).', _variant((3, 4, 6, 3))),
    'flatten_pvt_v2_b3': ('FLatten-PVTv2-B3.', _variant((3, 4, 18, 3))),
    'flatten_pvt_v2_b4': ('FLatten-PVTv2-B4.', _variant((3, 8, 27, 3))),
    'flatten_pvt_v2_b5': ('FLatten-PVTv2-B5.', _variant((3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4))),
})
