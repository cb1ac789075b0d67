"""FLatten-CSWin: the CSWin Transformer with focused linear attention (FLatten Transformer, Han et al., ICCV 2023).

Our own implementation of the official ``CSWinTransformer`` of LeapLabTHU/FLatten-Transformer
(``models/flatten_cswin.py``): same constructor arguments and defaults, same module tree and state-dict keys
(``stage1_conv_embed``, ``stage1`` .. ``stage4``, ``merge1`` .. ``merge3``, ``norm``, ``head``), same arithmetic, so an
official checkpoint loads with ``strict=True`` and gives the same logits.

Each block projects the tokens once (``qkv``, ``proj`` live in the block) and splits q, k and v by channel halves into
two branches of cross-shaped stripes: branch 0 attends within vertical stripes of width ``split_size``, branch 1 within
horizontal stripes; a block whose resolution equals its split size, and every block of the last stage, has one branch
over the whole map. Every branch adds LePE (a depthwise 3x3 conv ``get_v`` on v, applied per stripe).

``attn_type`` picks the attention per stage: ``'L'`` focused linear attention (stripe width from ``la_split_size``),
``'S'`` softmax attention (stripe width from ``split_size``), ``'M'`` mixed, with the first ``int(attn_type[4:])``
blocks of that stage linear and the rest softmax (e.g. ``'LLMS4'``). The released models use ``'LLSS'`` with
``la_split_size`` equal to the stage resolutions (``'56-28-14-7'`` at 224), so stages 1-2 attend globally.

Quirks of the official focused linear attention that we reproduce: the stripes are reshaped back to ``(B, L, ...)``
before the attention, so the linear attention always spans all tokens of the map; the positional encoding spans the
tokens of one stripe; the depthwise conv on v reshapes v to one stripe. That last reshape only works when one stripe
covers the whole map, so the official model cannot run focused linear attention on narrower stripes; we raise a
:class:`~amap.errors.ModelError` at construction for such arguments (and for any other geometry the official model
cannot run) instead of failing inside the forward pass.

Per-head widths are decoupled for pruned models: ``qk_dim`` (q/k channels per head) and ``v_dim`` (v channels per head)
default to the original head width; ``qkv`` then has ``[q | k | v]`` rows, each part split into the branch halves by
heads, ``proj`` reads ``heads * v_dim`` channels, and LePE and the depthwise conv act on v channels. The softmax scale
stays ``head_dim ** -0.5`` of the original head width. A pruned block is :class:`CSWinBlock` rebuilt with smaller
widths (:meth:`~amap.models.helpers.Rebuildable.rebuild`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs
from torch import Tensor, nn

from ..errors import ModelError
from . import attention, helpers
from .helpers import BlockOptions, ClassifierMixin, Rebuildable, block_attn_types, flatten_cfg, init_weights

__all__ = [
    'CSWinTransformer', 'CSWinBlock', 'LePEAttention', 'FocusedLinearAttention', 'MergeBlock',
]



def _to_stripes(x: Tensor, resolution: int, h_sp: int, w_sp: int) -> Tensor:
    """Cut tokens ``(B, H*W, C)`` (row-major square map) into stripes ``(B * n_stripes, h_sp * w_sp, C)``."""
    B, _, C = x.shape
    x = x.reshape(B, resolution // h_sp, h_sp, resolution // w_sp, w_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h_sp * w_sp, C)


def _from_stripes(x: Tensor, resolution: int, h_sp: int, w_sp: int) -> Tensor:
    """Inverse of :func:`_to_stripes`: ``(B * n_stripes, h_sp * w_sp, C)`` back to ``(B, H*W, C)``."""
    C = x.shape[-1]
    x = x.reshape(-1, resolution // h_sp, resolution // w_sp, h_sp, w_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, resolution * resolution, C)


def _stripe_shape(resolution: int, split_size: int, idx: int) -> tuple[int, int]:
    """Stripe height and width: ``idx`` -1 is the whole map, 0 vertical stripes, 1 horizontal stripes."""
    if idx == -1:
        return resolution, resolution
    if idx == 0:
        return resolution, split_size
    if idx == 1:
        return split_size, resolution
    raise ModelError(f'CSWin attention idx must be -1, 0 or 1, got {idx}')


def _lepe(v: Tensor, get_v: nn.Conv2d, h_sp: int, w_sp: int) -> Tensor:
    """LePE: the depthwise conv ``get_v`` on v stripes ``(B', n, C)``, zero-padded at stripe borders; ``(B', C, n)``."""
    Bs, n, C = v.shape
    return get_v(v.transpose(1, 2).reshape(Bs, C, h_sp, w_sp)).reshape(Bs, C, n)


class LePEAttention(nn.Module):
    """Softmax attention within CSWin stripes, plus the locally-enhanced positional encoding (LePE) on v.

    Args:
        dim: Channels of this branch at the original width (``num_heads * head_dim``).
        resolution: Side of the square token map.
        idx: -1 for one stripe covering the map, 0 for vertical stripes, 1 for horizontal stripes.
        split_size: Stripe width (ignored when ``idx`` is -1).
        num_heads: Heads of this branch.
        qk_dim: q/k channels per head (default ``dim // num_heads``).
        v_dim: v channels per head (default ``dim // num_heads``).
        attn_drop: Dropout on the attention weights.
        qk_scale: Softmax scale; default ``head_dim ** -0.5`` of the original head width, whatever ``qk_dim`` is.
    """

    def __init__(
            self,
            dim: int,
            resolution: int,
            idx: int,
            split_size: int = 7,
            num_heads: int = 8,
            qk_dim: int | None = None,
            v_dim: int | None = None,
            attn_drop: float = 0.,
            qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        head_dim = dim // num_heads
        self.dim = dim
        self.resolution = resolution
        self.split_size = split_size
        self.num_heads = num_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim
        self.scale = qk_scale or head_dim ** -0.5
        self.H_sp, self.W_sp = _stripe_shape(resolution, split_size, idx)
        v_channels = num_heads * self.v_dim
        self.get_v = nn.Conv2d(v_channels, v_channels, kernel_size=3, stride=1, padding=1, groups=v_channels)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attend within stripes.

        Args:
            q: Queries ``(B, H*W, num_heads * qk_dim)``.
            k: Keys ``(B, H*W, num_heads * qk_dim)``.
            v: Values ``(B, H*W, num_heads * v_dim)``.

        Returns:
            ``(B, H*W, num_heads * v_dim)``.
        """
        res, h_sp, w_sp, heads = self.resolution, self.H_sp, self.W_sp, self.num_heads
        n = h_sp * w_sp
        q = _to_stripes(q, res, h_sp, w_sp).reshape(-1, n, heads, self.qk_dim).transpose(1, 2)
        k = _to_stripes(k, res, h_sp, w_sp).reshape(-1, n, heads, self.qk_dim).transpose(1, 2)
        v = _to_stripes(v, res, h_sp, w_sp)
        lepe = _lepe(v, self.get_v, h_sp, w_sp).reshape(-1, heads, self.v_dim, n).transpose(-2, -1)
        v = v.reshape(-1, n, heads, self.v_dim).transpose(1, 2)

        q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v) + lepe
        x = x.transpose(1, 2).reshape(-1, n, heads * self.v_dim)
        return _from_stripes(x, res, h_sp, w_sp)


class FocusedLinearAttention(attention.FocusedLinearAttention):
    """Focused linear attention over the whole token map, plus LePE, as in FLatten-CSWin: the shared layer without
    projections (the block projects), with ``get_v``; ``forward`` takes q, k and v.

    Only one stripe covering the map is supported: the official module cannot run on narrower stripes (its
    depthwise-conv reshape fails), so CSWin blocks build this module only where the official one runs.

    Args:
        dim: Channels of this branch at the original width (``num_heads * head_dim``).
        resolution: Side of the square token map.
        num_heads: Heads.
        **kwargs: ``qk_dim``, ``v_dim``, ``focusing_factor``, ``kernel_size``, ``dwc_shared`` of
            :class:`~amap.models.attention.FocusedLinearAttention`.
    """

    def __init__(self, dim: int, resolution: int, num_heads: int = 8, **kwargs: Any) -> None:
        super().__init__(dim, num_heads=num_heads, grid_size=(resolution, resolution), qkv_layout=None, lepe=True,
                         **kwargs)
        self.resolution = resolution
        self.H_sp = self.W_sp = resolution

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        """Attend over the whole map: q, k ``(B, H*W, num_heads * qk_dim)``, v ``(B, H*W, num_heads * v_dim)`` to
        ``(B, H*W, num_heads * v_dim)`` (one stripe covering the map: the stripe layout is the token layout)."""
        return self.attend(q, k, v, self.resolution, self.resolution)


class CSWinBlock(Rebuildable, nn.Module):
    """CSWin block: ``qkv`` projection, one or two branches of stripe attention, ``proj``, MLP; pre-norm residuals.

    Attributes for tools (what :mod:`amap.prune.adapters` reads): ``qkv`` (rows ``[q | k | v]``, each head-major over
    both branches), ``proj``, ``attn_type``, ``branch_num``, ``branch_heads``, ``qk_dim``, ``v_dim`` and ``attns``
    (one module per branch, each with ``H_sp``, ``W_sp`` and LePE's ``get_v``; linear ones are
    :class:`~amap.models.attention.FocusedLinearAttention` s).

    Args:
        dim: Token channels.
        reso: Side of the square token map.
        num_heads: Heads of the block (each of two branches gets ``num_heads // 2``).
        split_size: Stripe width.
        drop_path: Stochastic depth rate.
        last_stage: One branch over the whole map (also chosen when ``reso == split_size``).
        attn_type: ``'L'`` focused linear attention or ``'S'`` softmax attention.
        qk_dim: q/k channels per head (default: the original head width).
        v_dim: v channels per head (default: the original head width).
        dwc_shared: Share linear attention's depthwise conv across heads (the official layout).
        opts: MLP, dropout (``drop`` in the MLP, ``attn_drop`` on softmax weights), norm and attention settings; by
            default those of the official block (no qkv bias).
    """

    def __init__(self, dim: int, reso: int, num_heads: int, split_size: int = 7, drop_path: float = 0.,
                 last_stage: bool = False, attn_type: str = 'L', qk_dim: int | None = None, v_dim: int | None = None,
                 dwc_shared: bool = True, opts: BlockOptions | None = None) -> None:
        super().__init__()
        opts = opts or BlockOptions(qkv_bias=False)
        linear = helpers.is_linear(attn_type)
        self.dim = dim
        self.num_heads = num_heads
        self.patches_resolution = reso
        self.split_size = split_size
        self.mlp_ratio = opts.mlp_ratio
        self.attn_type = attn_type
        self.branch_num = 1 if last_stage or reso == split_size else 2
        branch_dim = dim // self.branch_num
        branch_heads = num_heads // self.branch_num
        if branch_heads < 1 or branch_dim % branch_heads or dim % self.branch_num:
            raise ModelError(
                f'CSWin block of dim {dim} cannot split into {self.branch_num} branch(es) of {branch_heads} head(s); '
                f'choose num_heads dividing dim (and even, with two branches)')
        if self.branch_num == 2 and (split_size < 1 or split_size > reso or reso % split_size):
            raise ModelError(
                f'CSWin stripes of width {split_size} do not tile the {reso}x{reso} token map; '
                f'choose a split size that divides {reso}')
        if self.branch_num == 2 and linear:
            raise ModelError(
                f'focused linear attention needs one stripe over the whole {reso}x{reso} map, but split size '
                f'{split_size} gives narrower stripes (the official model cannot run them either); '
                f'set its la_split_size entry to {reso}')
        head_dim = branch_dim // branch_heads
        self.branch_heads = branch_heads
        self.qk_dim = qk_dim or head_dim
        self.v_dim = v_dim or head_dim

        heads_total = self.branch_num * branch_heads
        self.qkv = nn.Linear(dim, heads_total * (2 * self.qk_dim + self.v_dim), bias=opts.qkv_bias)
        self.norm1 = opts.norm_layer(dim)
        self.proj = nn.Linear(heads_total * self.v_dim, dim)
        idxs = [-1] if self.branch_num == 1 else [0, 1]
        if linear:
            self.attns = nn.ModuleList([
                FocusedLinearAttention(
                    branch_dim, resolution=reso, num_heads=branch_heads, qk_dim=self.qk_dim, v_dim=self.v_dim,
                    focusing_factor=opts.focusing_factor, kernel_size=opts.kernel_size, dwc_shared=dwc_shared)
                for _ in idxs])
        else:
            self.attns = nn.ModuleList([
                LePEAttention(
                    branch_dim, resolution=reso, idx=idx, split_size=split_size, num_heads=branch_heads,
                    qk_dim=self.qk_dim, v_dim=self.v_dim, attn_drop=opts.attn_drop, qk_scale=opts.qk_scale)
                for idx in idxs])
        self.drop_path = helpers.drop_path(drop_path)
        self.mlp = opts.mlp(dim)
        self.norm2 = opts.norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        """Run the block on tokens ``(B, reso * reso, dim)``."""
        qkv = self.qkv(self.norm1(x))
        qk_part = self.branch_num * self.branch_heads * self.qk_dim
        q, k, v = qkv.split([qk_part, qk_part, qkv.shape[-1] - 2 * qk_part], dim=-1)
        if self.branch_num == 2:
            q, k, v = (t.chunk(2, dim=-1) for t in (q, k, v))
            attended = torch.cat([attn(q[i], k[i], v[i]) for i, attn in enumerate(self.attns)], dim=-1)
        else:
            attended = self.attns[0](q, k, v)
        x = x + self.drop_path(self.proj(attended))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class MergeBlock(nn.Module):
    """Stride-2 3x3 conv that halves the token map and changes the width, then a norm.

    Args:
        dim: Input channels.
        dim_out: Output channels.
        norm_layer: Normalisation layer.
    """

    def __init__(self, dim: int, dim_out: int, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, 2, 1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens ``(B, H*W, dim)`` of a square map to ``(B, ceil(H/2)**2, dim_out)``."""
        B, L, C = x.shape
        side = int(L ** 0.5 + 0.5)  # square maps only (the stem checks the input size)
        x = self.conv(x.transpose(1, 2).reshape(B, C, side, side))
        return self.norm(x.flatten(2).transpose(1, 2))


class _MapToTokens(nn.Module):
    """``(B, C, H, W)`` to ``(B, H*W, C)`` (the parameter-free middle of the convolutional stem)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).transpose(1, 2)


def _stage_resolutions(img_size: int) -> list[int]:
    """Token-map sides of the 4 stages: the official model assumes ``img_size // 4``, ``// 8``, ...; the stem and
    merge convolutions must agree (a :class:`~amap.errors.ModelError` names the first stage where they do not)."""
    resolutions = [img_size // (4 * 2 ** s) for s in range(4)]
    actual = (img_size + 2 * 2 - 7) // 4 + 1
    for s in range(4):
        if actual != resolutions[s] or actual < 1:
            raise ModelError(
                f'img_size {img_size} gives a {actual}x{actual} token map in stage {s + 1} where the model '
                f'expects img_size // {4 * 2 ** s} = {resolutions[s]}; use a multiple of 32 such as 224')
        actual = (actual - 1) // 2 + 1
    return resolutions


class CSWinTransformer(ClassifierMixin, nn.Module):
    """FLatten-CSWin Transformer, with the official constructor's arguments and defaults.

    Note that the official defaults (``la_split_size='1-2-7-7'`` with ``attn_type='LLLL'``) describe a model the
    official code cannot run; the released models use ``attn_type='LLSS'`` and ``la_split_size`` equal to the stage
    resolutions. Use the registered factories (``flatten_cswin_tiny`` ...) for those.

    Args:
        img_size: Input side (square images; an int or a square pair).
        patch_size: Unused (the stem is a fixed 7x7 stride-4 conv), kept for the official signature.
        in_chans: Input channels.
        num_classes: Classes of the head (0 for no head).
        embed_dim: Width of stage 1 (doubled at every merge).
        depth: Blocks per stage.
        split_size: Stripe width per stage for softmax attention.
        la_split_size: Stripe width per stage for linear attention, dash-separated (``'56-28-14-7'``).
        num_heads: Heads per stage.
        mlp_ratio: MLP hidden width as a multiple of the stage width.
        qkv_bias: Bias on the qkv projections.
        qk_scale: Softmax scale override.
        drop_rate: Dropout in the MLPs.
        attn_drop_rate: Dropout on softmax attention weights.
        drop_path_rate: Stochastic depth rate, linearly increasing over all blocks.
        hybrid_backbone: Unused, kept for the official signature.
        norm_layer: Normalisation of the blocks and of the final features.
        use_chk: Gradient checkpointing of every block (see also :meth:`set_grad_checkpointing`).
        focusing_factor: Focusing power of linear attention.
        kernel_size: Depthwise-conv kernel of linear attention.
        attn_type: Per stage ``'L'`` (linear), ``'S'`` (softmax) or ``'M'`` (mixed: the first ``int(attn_type[4:])``
            blocks of the stage linear, the rest softmax).
    """

    def __init__(
            self,
            img_size: int | Sequence[int] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depth: Sequence[int] = (2, 2, 6, 2),
            split_size: Sequence[int] = (1, 2, 7, 7),
            la_split_size: str = '1-2-7-7',
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: float | None = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            hybrid_backbone: Any = None,
            norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
            use_chk: bool = False,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_type: str = 'LLLL',
    ) -> None:
        super().__init__()
        img_h, img_w = to_2tuple(img_size)
        if img_h != img_w:
            raise ModelError(f'CSWin needs square images, got img_size {img_size}')
        img_size = int(img_h)
        la_splits = [int(s) for s in str(la_split_size).split('-')]
        if len(la_splits) < 4 or len(depth) != 4 or len(split_size) < 4 or len(num_heads) < 4:
            raise ModelError('CSWin needs 4 stages: depth, num_heads, split_size and la_split_size must give 4 values')
        num_blocks = sum(depth)
        resolutions = _stage_resolutions(img_size)

        self.img_size = img_size
        self.resolutions = resolutions
        self.use_chk = use_chk
        self.grad_checkpointing = use_chk
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim

        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, 4, 2),
            _MapToTokens(),
            nn.LayerNorm(embed_dim),
        )
        dpr = torch.linspace(0, drop_path_rate, num_blocks, device="cpu").tolist()
        opts = BlockOptions(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                            attn_drop=attn_drop_rate, norm_layer=norm_layer, focusing_factor=focusing_factor,
                            kernel_size=kernel_size)
        curr_dim = embed_dim
        first = 0
        for s, attn_types in enumerate(block_attn_types(attn_type, depth)):
            blocks = []
            for i in range(depth[s]):
                split = la_splits[s] if attn_types[i] == 'L' else split_size[s]
                try:
                    block = CSWinBlock(
                        dim=curr_dim, reso=resolutions[s], num_heads=num_heads[s], split_size=split,
                        drop_path=dpr[first + i], last_stage=s == 3, attn_type=attn_types[i], opts=opts)
                except ModelError as e:
                    raise ModelError(f'stage{s + 1} block {i}: {e}') from None
                blocks.append(block)
            first += depth[s]
            self.add_module(f'stage{s + 1}', nn.ModuleList(blocks))
            if s < 3:
                self.add_module(f'merge{s + 1}', MergeBlock(curr_dim, curr_dim * 2))
                curr_dim *= 2
        self.num_features = curr_dim
        self.norm = norm_layer(curr_dim)
        self.head = nn.Linear(curr_dim, num_classes) if num_classes > 0 else nn.Identity()

        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names excluded from weight decay beyond timm's 1-d rule: none (as in the official training)."""
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing of every block."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes (0 for none); pooling is always the mean."""
        super().reset_classifier(num_classes)
        self.head.apply(init_weights)
        self.head.to(next(self.parameters()).device)

    def stages(self) -> list[nn.ModuleList]:
        """The four stages' block lists, in order."""
        return [self.stage1, self.stage2, self.stage3, self.stage4]

    def forward_features(self, x: Tensor) -> Tensor:
        """Image ``(B, in_chans, img_size, img_size)`` to normalised final tokens ``(B, L, num_features)``."""
        x = self.stage1_conv_embed[0](x)
        expected = self.resolutions[0]
        if x.shape[-2:] != (expected, expected):
            raise ModelError(
                f'input of {tuple(x.shape[-2:])} stem pixels does not fit a model built for img_size {self.img_size}')
        x = self.stage1_conv_embed[2](self.stage1_conv_embed[1](x))
        merges = [None, self.merge1, self.merge2, self.merge3]
        for merge, blocks in zip(merges, self.stages()):
            if merge is not None:
                x = merge(x)
            for blk in blocks:
                if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                    x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
                else:
                    x = blk(x)
        return self.norm(x)



def _default_la_split_size(img_size: int | Sequence[int]) -> str:
    side = int(to_2tuple(img_size)[0])
    return '-'.join(str(side // (4 * 2 ** s)) for s in range(4))


def _create_cswin(variant: str, pretrained: bool = False, **kwargs: Any) -> CSWinTransformer:
    """Build a FLatten-CSWin through timm; ``la_split_size`` defaults to the stage resolutions (global linear
    attention, as in the official configs: '56-28-14-7' at 224, '96-48-24-12' at 384)."""
    kwargs.setdefault('la_split_size', _default_la_split_size(kwargs.get('img_size', 224)))
    return build_model_with_cfg(CSWinTransformer, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return flatten_cfg('stage1_conv_embed.0', **kwargs)


default_cfgs = generate_default_cfgs({
    **{name: _cfg() for name in ('FLatten_CSWin_64_24181_tiny_224', 'FLatten_CSWin_64_24322_small_224',
                                 'FLatten_CSWin_96_36292_base_224', 'flatten_cswin_tiny', 'flatten_cswin_small',
                                 'flatten_cswin_base')},
    **{name: _cfg(input_size=(3, 384, 384), crop_pct=1.0)
       for name in ('FLatten_CSWin_96_36292_base_384', 'flatten_cswin_base_384')},
})

# official factories + cfgs/flatten_cswin_*.yaml (attn_type 'LLSS'; la_split_size from img_size, see _create_cswin)
_TINY = dict(img_size=224, patch_size=4, embed_dim=64, depth=[2, 4, 18, 1], split_size=[1, 2, 7, 7],
             num_heads=[2, 4, 8, 16], mlp_ratio=4., attn_type='LLSS')
_BASE = dict(_TINY, embed_dim=96, depth=[3, 6, 29, 2], num_heads=[4, 8, 16, 32])
_OFFICIAL: dict[str, tuple[str, dict[str, Any]]] = {
    'FLatten_CSWin_64_24181_tiny_224': (
        'FLatten-CSWin-T @ 224 (21.2M parameters, 4.3 GMACs; 83.1% ImageNet top-1 in the paper).', _TINY),
    'FLatten_CSWin_64_24322_small_224': ('FLatten-CSWin-S @ 224.', dict(_TINY, depth=[2, 4, 32, 2])),
    'FLatten_CSWin_96_36292_base_224': ('FLatten-CSWin-B @ 224.', _BASE),
    'FLatten_CSWin_96_36292_base_384': (
        "FLatten-CSWin-B @ 384 (softmax stripes of 12, linear la_split_size '96-48-24-12').",
        dict(_BASE, img_size=384, split_size=[1, 2, 12, 12])),
}
_ALIASES = dict(zip(('flatten_cswin_tiny', 'flatten_cswin_small', 'flatten_cswin_base', 'flatten_cswin_base_384'),
                    _OFFICIAL))

helpers.register_variants(__name__, _create_cswin, {
    **_OFFICIAL, **{alias: (f'Alias of ``{name}``.', _OFFICIAL[name][1]) for alias, name in _ALIASES.items()}})
