"""Build our FLatten models from the official constructor names and arguments.

Users bring configurations of the official repository (LeapLabTHU/FLatten-Transformer): a class name with the
arguments of its constructor (what ``models/build.py`` passes, or what a case file records), or one of the official
factory functions (``flatten_pvt_tiny``, ``FLatten_CSWin_64_24181_tiny_224``, ...). Our classes accept exactly the
official constructors' keyword arguments and produce the same state-dict keys, so an official checkpoint loads into
the result with ``strict=True``.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from ..errors import ModelError

__all__ = ['from_official', 'official_names']

# Official class name -> the module of ours that defines a class of the same name.
_CLASSES: dict[str, str] = {
    'FLattenSwinTransformer': 'amap.models.flatten_swin',
    'PyramidVisionTransformer': 'amap.models.flatten_pvt',
    'PyramidVisionTransformerV2': 'amap.models.flatten_pvt_v2',
    'CSWinTransformer': 'amap.models.flatten_cswin',
}

# Official factory functions (models/flatten_pvt.py, flatten_pvt_v2.py, flatten_cswin.py) -> the class they build.
# Each is registered in timm under the same name; the official Swin models have no factory (build.py calls the class).
_FACTORIES: dict[str, str] = {
    **{f'flatten_pvt_{s}': 'PyramidVisionTransformer' for s in ('tiny', 'small', 'medium', 'large')},
    **{f'flatten_pvt_v2_b{i}': 'PyramidVisionTransformerV2' for i in range(6)},
    **dict.fromkeys(('FLatten_CSWin_64_24181_tiny_224', 'FLatten_CSWin_64_24322_small_224',
                     'FLatten_CSWin_96_36292_base_224', 'FLatten_CSWin_96_36292_base_384'), 'CSWinTransformer'),
}


def official_names() -> list[str]:
    """The official class and factory names :func:`from_official` accepts."""
    return [*_CLASSES, *_FACTORIES]


def _model_class(class_name: str) -> type[nn.Module]:
    return getattr(importlib.import_module(_CLASSES[class_name]), class_name)


def _accepted(cls: type[nn.Module]) -> list[str]:
    """The keyword arguments of ``cls``'s constructor (its named parameters; ``**kwargs`` is not an invitation)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(cls).parameters.values() if p.kind in kinds]


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if not close:  # case slips ('flatten_cswin_64_...') are the usual mistake
        lowered = {c.lower(): c for c in choices}
        close = [lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.5)]
    return f'; did you mean {close[0]!r}?' if close else ''


def from_official(class_name: str, **kwargs: Any) -> nn.Module:
    """Build our model from an official FLatten constructor (or factory) name and its keyword arguments.

    Args:
        class_name: ``'FLattenSwinTransformer'``, ``'PyramidVisionTransformer'``, ``'PyramidVisionTransformerV2'`` or
            ``'CSWinTransformer'`` (the constructor is called with ``kwargs``), or an official factory name such as
            ``'flatten_pvt_tiny'``, ``'flatten_pvt_v2_b1'`` or ``'FLatten_CSWin_64_24181_tiny_224'`` (built with
            ``timm.create_model`` and ``kwargs`` as overrides of the factory's settings).
        **kwargs: Any keyword argument the official constructor accepts (``img_size``, ``depths``, ``attn_type``,
            ``la_sr_ratios``, ``norm_layer``, ...), with the official meaning and defaults.

    Returns:
        The model, randomly initialised, in training mode; load official weights with
        :func:`amap.load_checkpoint`.

    Raises:
        ModelError: Unknown class or factory name (with the closest supported name), a keyword the constructor does
            not accept (listing the accepted ones), ``pretrained=True`` (nothing is downloaded), or argument values
            the constructor rejects.
    """
    if class_name in _CLASSES:
        cls, factory = _model_class(class_name), None
    elif class_name in _FACTORIES:
        cls, factory = _model_class(_FACTORIES[class_name]), class_name
    else:
        raise ModelError(
            f'unknown official model {class_name!r}{_suggest(class_name, official_names())} '
            f'(supported classes: {", ".join(_CLASSES)}; factories: {", ".join(_FACTORIES)})')

    accepted = _accepted(cls)
    if factory is not None:
        if kwargs.pop('pretrained', False):
            raise ModelError(
                f'from_official({class_name!r}, pretrained=True): nothing is downloaded; build it without pretrained '
                f'and load the official weights with amap.load_checkpoint(model, path)')
        accepted = [a for a in accepted if a != 'pretrained']
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        name = unknown[0]
        raise ModelError(
            f'{class_name} does not accept the argument {name!r}{_suggest(name, accepted)} '
            f'(accepted: {", ".join(accepted)})')

    try:
        if factory is None:
            return cls(**kwargs)
        import timm
        if not timm.is_model(factory):
            raise ModelError(f'official factory {factory!r} is not registered in timm; import amap first')
        return timm.create_model(factory, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        shown = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
        reason = ' '.join(str(e).split())[:300]
        raise ModelError(f'{class_name}({shown}) cannot be built: {reason}; check these arguments') from e
