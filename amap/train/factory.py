"""Model creation by timm name, with close-name suggestions for typos."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import timm
import torch.nn as nn

from ..errors import ModelError

__all__ = ['create_model', 'unknown_model_message']


def unknown_model_message(name: str) -> str:
    """``unknown model 'x'; did you mean ...?`` with close names from timm's registry."""
    names = timm.list_models()
    close = [n for n in names if n.startswith(name)][:3]  # a prefix: 'vit_tiny' -> 'vit_tiny_patch16_224', ...
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    close = close[:4]
    hint = f'did you mean {", ".join(close)}?' if close else "list the names with timm.list_models('*pattern*')"
    return f'unknown model {name!r}; {hint}'


def create_model(
        name: str,
        *,
        num_classes: int,
        img_size: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Create a randomly initialised timm model (never downloads weights).

    ``img_size`` is passed to the factory only when it differs from the model's default input size (so models that
    do not take it, e.g. CNNs, still work at their native size).

    Args:
        name: Model name in timm's registry.
        num_classes: Classifier outputs.
        img_size: Input side in pixels.
        model_kwargs: Extra factory arguments (override ``num_classes``/``img_size``).

    Returns:
        ``(model, create_kwargs)``; ``timm.create_model(name, **create_kwargs)`` rebuilds the same architecture.

    Raises:
        ModelError: unknown name (with close-name suggestions) or arguments the model does not accept.
    """
    if not timm.is_model(name):
        raise ModelError(unknown_model_message(name))
    kwargs: dict[str, Any] = {'num_classes': num_classes}
    if img_size is not None:
        cfg = timm.models.get_pretrained_cfg(name)
        default = getattr(cfg, 'input_size', None) if cfg is not None else None
        if default is None or tuple(default[-2:]) != (img_size, img_size):
            kwargs['img_size'] = img_size
    kwargs.update(model_kwargs or {})
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ModelError(f'model {name!r} does not accept the arguments {kwargs} ({e}); fix --model-kwargs or '
                         f'--img-size') from None
    except (ValueError, AssertionError, RuntimeError) as e:
        raise ModelError(f'model {name!r} cannot be built with {kwargs}: {e}') from None
    return model, kwargs
