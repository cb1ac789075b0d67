"""timm transforms for training and evaluation, with the small-image rules (see :mod:`amap.data`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms

from .config import DEFAULT_RANDAUGMENT

__all__ = ['SMALL_IMAGE', 'build_transform']

SMALL_IMAGE = 64
"""Images of at most this many pixels (``img_size``) use pad-crop training and plain-resize evaluation."""


def _pil_interp(name: str) -> int:
    from timm.data.transforms import str_to_pil_interp
    return str_to_pil_interp(name)


def build_transform(
        *,
        img_size: int,
        is_training: bool,
        augment: str = 'basic',
        randaugment: str | None = None,
        interpolation: str = 'bicubic',
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        re_prob: float = 0.25,
) -> transforms.Compose:
    """timm transforms for training or evaluation (see the module docstring for the small-image rules).

    Args:
        img_size: Output side in pixels.
        is_training: Training (random) or evaluation (deterministic) transform.
        augment: ``'none'``, ``'basic'`` or ``'strong'``.
        randaugment: RandAugment spec overriding the default of ``'strong'`` (adds RandAugment to ``'basic'``).
        interpolation: Resize interpolation.
        mean: Normalisation mean.
        std: Normalisation std.
        re_prob: Random-erasing probability of ``'strong'``.

    Returns:
        A ``Compose`` mapping a PIL image to a normalised ``(3, img_size, img_size)`` float tensor.
    """
    mean, std = tuple(mean), tuple(std)
    small = img_size <= SMALL_IMAGE
    if not is_training or augment == 'none':  # 'none' trains on exactly what evaluation sees
        if small:  # plain resize: no centre-crop shrinkage of tiny images
            return create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std,
                                    crop_pct=1.0, crop_mode='squash')
        return create_transform(img_size, is_training=False, interpolation=interpolation, mean=mean, std=std)
    spec = randaugment or (DEFAULT_RANDAUGMENT if augment == 'strong' else None)
    primary, secondary, final = create_transform(
        img_size, is_training=True, hflip=0.5, color_jitter=None, auto_augment=spec, interpolation=interpolation,
        mean=mean, std=std, re_prob=re_prob if augment == 'strong' else 0.0, re_mode='pixel', separate=True)
    if small:  # pad-crop instead of random-resized-crop
        primary = transforms.Compose([
            transforms.Resize((img_size, img_size), interpolation=_torch_interp(interpolation)),
            transforms.RandomCrop(img_size, padding=img_size // 8),
            transforms.RandomHorizontalFlip(p=0.5),
        ])
    _patch_augment_ops(secondary.transforms)
    return transforms.Compose([*primary.transforms, *secondary.transforms, *final.transforms])


def _posterize_safe(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize op, keeping its meaning for 0 bits (a black image) which Pillow >= 11 rejects."""
    from timm.data import auto_augment
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _patch_augment_ops(tfs: Sequence[Any]) -> None:
    """Make timm's AutoAugment/RandAugment posterize ops safe at magnitude 10 (0 bits crashes a run otherwise)."""
    from timm.data import auto_augment
    for t in tfs:
        for op in getattr(t, 'ops', ()):
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize_safe


def _torch_interp(name: str) -> Any:
    from timm.data.transforms import str_to_interp_mode
    return str_to_interp_mode(name)
