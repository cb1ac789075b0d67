"""The data configuration (:class:`DataConfig`), its names and choices, and its validation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ['DIGITS', 'AUGMENTS', 'DEFAULT_RANDAUGMENT', 'DataConfig', 'validate_config']

DIGITS = 'digits'
"""Name of the embedded default dataset (scikit-learn's digits)."""
AUGMENTS = ('none', 'basic', 'strong')
DEFAULT_RANDAUGMENT = 'rand-m9-mstd0.5-inc1'
_INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'lanczos', 'box', 'hamming')
_DATA_HINT = ("pass a folder in ImageNet layout (root/train/<class>/*, root/val/<class>/* or root/test/<class>/*) "
              f"or '{DIGITS}' for the embedded default")


@dataclass
class DataConfig:
    """Where the data comes from and how it is augmented and batched.

    Attributes:
        data: ``'digits'`` (embedded default) or a folder in ImageNet layout.
        img_size: Side of the square model input in pixels (``amap prune``: None, the size its checkpoint was made
            for).
        batch_size: Training batch size per process.
        eval_batch_size: Evaluation batch size per process (default: ``2 * batch_size``).
        num_workers: DataLoader worker processes (0 = load in the main process).
        augment: ``'none'``, ``'basic'`` (pad-crop for images <= 64 px, else random-resized-crop; plus h-flip) or
            ``'strong'`` (basic + RandAugment + random erasing).
        randaugment: timm RandAugment spec, e.g. ``'rand-m9-mstd0.5-inc1'``; overrides the spec of ``'strong'``
            and adds RandAugment to ``'basic'``.
        mixup: Mixup alpha (0 = off).
        cutmix: CutMix alpha (0 = off).
        label_smoothing: Label smoothing of the soft targets built by the mixup function.
        train_subset: Use a deterministic class-balanced subset of this many training images.
        val_subset: Use a deterministic class-balanced subset of this many evaluation images.
        interpolation: Resize interpolation (``'bicubic'``, ``'bilinear'``, ...).
        mean: Normalisation mean (default: ImageNet's).
        std: Normalisation std (default: ImageNet's).
        re_prob: Random-erasing probability of ``'strong'``.
    """
    data: str = DIGITS
    img_size: int | None = field(default=32, metadata={'min': 1})
    batch_size: int = field(default=128, metadata={'flags': ('--batch-size', '-b'), 'min': 1})
    eval_batch_size: int | None = field(default=None, metadata={'min': 1})
    num_workers: int = field(default=2, metadata={'flags': ('--workers', '-j'), 'min': 0})
    augment: str = field(default='basic', metadata={'choices': AUGMENTS})
    randaugment: str | None = field(default=None, metadata={'metavar': 'SPEC'})
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    train_subset: int | None = field(default=None, metadata={'min': 1})
    val_subset: int | None = field(default=None, metadata={'min': 1})
    interpolation: str = field(default='bicubic', metadata={'choices': _INTERPOLATIONS})
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    re_prob: float = 0.25


def validate_config(cfg: DataConfig) -> None:
    """Raise :class:`amap.errors.ConfigError` naming the first invalid field of ``cfg`` and the fix."""
    checks = [
        (cfg.img_size is not None and cfg.img_size >= 8, 'img_size',
         'must be >= 8 (null only in amap prune, where it means the size of the checkpoint)'),
        (cfg.batch_size >= 1, 'batch_size', 'must be >= 1'),
        (cfg.eval_batch_size is None or cfg.eval_batch_size >= 1, 'eval_batch_size', 'must be >= 1'),
        (cfg.num_workers >= 0, 'num_workers', 'must be >= 0'),
        (cfg.augment in AUGMENTS, 'augment', f'must be one of {AUGMENTS}'),
        (cfg.mixup >= 0, 'mixup', 'must be >= 0'),
        (cfg.cutmix >= 0, 'cutmix', 'must be >= 0'),
        (0 <= cfg.label_smoothing < 1, 'label_smoothing', 'must be in [0, 1)'),
        (cfg.interpolation in _INTERPOLATIONS, 'interpolation', f'must be one of {_INTERPOLATIONS}'),
        (cfg.randaugment is None or cfg.randaugment.startswith('rand'), 'randaugment',
         "must be a timm RandAugment spec such as 'rand-m9-mstd0.5-inc1'"),
        (cfg.randaugment is None or cfg.augment != 'none', 'randaugment', "needs augment='basic' or 'strong'"),
        (0 <= cfg.re_prob <= 1, 're_prob', 'must be in [0, 1]'),
    ]
    for ok, name, fix in checks:
        if not ok:
            raise ConfigError(f'data config {name}={getattr(cfg, name)!r} is invalid: {fix}')
