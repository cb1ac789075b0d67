"""What every FLatten family shares beyond attention: weight initialisation, the classifier head, the per-block
options, timm's default configuration and registration, and :class:`Rebuildable` (how a module is built again at other
widths).

The families' model classes mix in :class:`ClassifierMixin` (``get_classifier``, ``reset_classifier``, ``forward``),
hand their blocks one :class:`BlockOptions` and initialise with :func:`init_weights`; their ``default_cfgs`` come from
:func:`flatten_cfg` and their registered variants from :func:`register_variants`.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from ..errors import ModelError

__all__ = ['Rebuildable', 'init_weights', 'init_weights_with_conv', 'ClassifierMixin', 'BlockOptions', 'drop_path',
           'flatten_cfg', 'register_variants', 'block_attn_types', 'is_linear']


class Rebuildable:
    """Mixin recording the arguments a module was constructed with, so that the same class can be built again with
    some of them changed (:meth:`rebuild`), e.g. an attention layer at smaller per-head widths.

    Each subclass's ``__init__`` is wrapped: the outermost call stores its arguments, by name, in ``init_kwargs``.
    """

    init_kwargs: dict[str, Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get('__init__')
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self: Any, *args: Any, **kw: Any) -> None:
            if 'init_kwargs' not in self.__dict__:  # the outermost constructor: the one the caller called
                bound = signature.bind(self, *args, **kw)
                given = dict(bound.arguments)
                given.pop('self', None)
                extra = {n: given.pop(n) for n, p in signature.parameters.items()
                         if p.kind is inspect.Parameter.VAR_KEYWORD and n in given}
                object.__setattr__(self, 'init_kwargs', {**given, **next(iter(extra.values()), {})})
            init(self, *args, **kw)

        cls.__init__ = wrapped  # type: ignore[method-assign]

    def rebuild(self, **changes: Any) -> Any:
        """A new module of the same class built with this one's constructor arguments, ``changes`` applied (fresh
        weights)."""
        return type(self)(**{**self.init_kwargs, **changes})


def init_weights(m: nn.Module) -> None:
    """The official initialisation (``model.apply(init_weights)``): Linear weights ``trunc_normal(std=.02)`` and zero
    biases, norms to ones and zeros; other modules keep torch's defaults."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def init_weights_with_conv(m: nn.Module) -> None:
    """:func:`init_weights`, and convolutions ``normal(0, sqrt(2 / fan_out))`` with zero biases (PVTv2)."""
    init_weights(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ClassifierMixin:
    """timm's classifier interface for a model with ``num_features``, a Linear ``head`` (or Identity) and
    ``forward_features`` returning tokens ``(B, N, C)`` (mean-pooled by the default ``forward_head``)."""

    num_classes: int
    num_features: int
    head: nn.Module

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` classes (0: no head)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Mean-pool the tokens ``(B, N, C)`` and apply the head (or return the pooled features if ``pre_logits``)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.forward_head(self.forward_features(x))


@dataclasses.dataclass(frozen=True)
class BlockOptions:
    """The settings a FLatten model hands unchanged to every block (the official block arguments of these names).

    Attributes:
        mlp_ratio: MLP hidden width as a multiple of the block width.
        qkv_bias: Bias on the q/k/v projections.
        qk_scale: Softmax scale override (softmax attention only).
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on softmax attention weights.
        act_layer: MLP activation.
        norm_layer: Norm layer of the blocks (and of Swin's patch merging).
        focusing_factor: Focusing power of linear attention.
        kernel_size: Depthwise-conv kernel of linear attention.
    """

    mlp_ratio: float = 4.
    qkv_bias: bool = True
    qk_scale: float | None = None
    drop: float = 0.
    attn_drop: float = 0.
    act_layer: Callable[..., nn.Module] = nn.GELU
    norm_layer: Callable[..., nn.Module] = nn.LayerNorm
    focusing_factor: float = 3
    kernel_size: int = 5

    def attention(self, linear: bool = True) -> dict[str, Any]:
        """The attention modules' keyword arguments among these (``proj_drop`` is ``drop``); ``focusing_factor`` and
        ``kernel_size`` only for linear attention."""
        args: dict[str, Any] = dict(qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, attn_drop=self.attn_drop,
                                    proj_drop=self.drop)
        return dict(args, focusing_factor=self.focusing_factor, kernel_size=self.kernel_size) if linear else args

    def mlp(self, dim: int) -> Mlp:
        """timm's ``Mlp`` of a block of width ``dim``."""
        return Mlp(in_features=dim, hidden_features=int(dim * self.mlp_ratio), act_layer=self.act_layer, drop=self.drop)


def drop_path(rate: float) -> nn.Module:
    """Stochastic depth at ``rate`` (an identity at 0)."""
    return DropPath(rate) if rate > 0. else nn.Identity()


def flatten_cfg(first_conv: str, *, crop_pct: float = .9, license: str = 'mit', **kwargs: Any) -> dict[str, Any]:
    """A timm default configuration of a FLatten model (ImageNet at 224, bicubic, classifier ``head``)."""
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': crop_pct,
        'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv, 'classifier': 'head', 'license': license, **kwargs,
    }


def register_variants(module: str, create: Callable[..., nn.Module],
                      variants: Mapping[str, tuple[str, dict[str, Any]]]) -> None:
    """Register one timm entry point per variant in ``module`` (after its ``default_cfgs``).

    Each entry point is ``name(pretrained=False, **kwargs)``, documented by the variant's docstring, and returns
    ``create(name, pretrained, **{**settings, **kwargs})``: the variant's settings, overridden by the caller's.

    Args:
        module: ``__name__`` of the family module (the entry points become its attributes, as timm expects).
        create: The family's builder, ``create(variant, pretrained, **model_kwargs)``.
        variants: ``name -> (docstring, settings)``.
    """
    for name, (doc, settings) in variants.items():
        setattr(sys.modules[module], name, register_model(_entry_point(module, name, doc, create, settings)))


def _entry_point(module: str, name: str, doc: str, create: Callable[..., nn.Module],
                 settings: dict[str, Any]) -> Callable[..., nn.Module]:
    def entry_point(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create(name, pretrained, **{**settings, **kwargs})

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__module__ = module
    entry_point.__doc__ = doc
    return entry_point


def is_linear(attn_type: str) -> bool:
    """Whether a block's ``attn_type`` is ``'L'`` (focused linear attention) rather than ``'S'`` (softmax).

    Raises:
        ModelError: Any other value.
    """
    if attn_type not in ('L', 'S'):
        raise ModelError(f"attn_type={attn_type!r} of a block must be 'L' (focused linear) or 'S' (softmax)")
    return attn_type == 'L'


def block_attn_types(attn_type: str, depths: Sequence[int]) -> list[list[str]]:
    """Each block's attention, ``'L'`` (focused linear) or ``'S'`` (softmax), from the official ``attn_type``.

    Args:
        attn_type: One letter per stage, ``L``, ``S`` or ``M``; ``M`` mixes: the first ``n`` blocks of the stage are
            linear, the rest softmax, ``n`` being the number after the stage letters (``'LLMS3'``).
        depths: Blocks per stage.

    Returns:
        One list of letters per stage, one letter per block.

    Raises:
        ModelError: A letter other than L, S or M, too few letters, or ``M`` without a number.
    """
    num_stages = len(depths)
    letters, suffix = attn_type[:num_stages], attn_type[num_stages:]
    if len(letters) < num_stages or any(c not in 'LSM' for c in letters):
        raise ModelError(f'attn_type={attn_type!r} needs one letter L, S or M per stage ({num_stages} stages)')
    if 'M' in letters and not suffix.isdigit():
        raise ModelError(f"attn_type={attn_type!r}: a mixed stage 'M' needs the number of its linear blocks after the "
                         f"stage letters (e.g. 'LLMS3')")
    return [['L' if letter == 'L' or (letter == 'M' and i < int(suffix)) else 'S' for i in range(depth)]
            for letter, depth in zip(letters, depths)]

