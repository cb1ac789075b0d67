"""Model creation by name, with close-name suggestions for typos, and the inverse: a model's complete description.

Names are timm names (the FLatten zoo included), ``hf:<class>`` or ``hf:<config.json or save_pretrained folder>`` for
Hugging Face transformers image classifiers (``ViTForImageClassification``, ``DeiTForImageClassification``,
``SwinForImageClassification``; random weights built from the config, nothing downloaded), and ``torchvision:<builder
or class>`` (``torchvision:vit_b_16``, ``torchvision:swin_t``, ``torchvision:VisionTransformer`` with its arguments).
:func:`build_model` rebuilds a model from ``(name, kwargs)``; :func:`describe_model` reads that pair off a model, every
constructor argument that shapes it, and checks it by building the description on the meta device.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from ..errors import ModelError

__all__ = ['create_model', 'build_model', 'describe_model', 'is_model', 'native_img_size', 'unknown_model_message',
           'HF_PREFIX', 'TV_PREFIX']

HF_PREFIX = 'hf:'
TV_PREFIX = 'torchvision:'
HF_CLASSES = ('ViTForImageClassification', 'DeiTForImageClassification', 'SwinForImageClassification')
TV_CLASSES = ('VisionTransformer', 'SwinTransformer')
# config entries that name, date or label a checkpoint rather than shape the model
_HF_NOT_SHAPE = ('transformers_version', 'architectures', '_name_or_path', 'model_type', 'id2label', 'label2id',
                 'dtype', 'torch_dtype')


def is_model(name: str) -> bool:
    """Whether ``name`` can be built: a timm name or an ``hf:`` / ``torchvision:`` name (checked when built)."""
    return name.startswith((HF_PREFIX, TV_PREFIX)) or timm.is_model(name)


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
    if name.startswith(HF_PREFIX):
        return _hf_create(name[len(HF_PREFIX):], num_classes=num_classes, img_size=img_size,
                          model_kwargs=model_kwargs)
    if name.startswith(TV_PREFIX):
        return _tv_create(name[len(TV_PREFIX):], num_classes=num_classes, img_size=img_size,
                          model_kwargs=model_kwargs)
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


def build_model(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The model ``(name, kwargs)`` describes (random weights): :func:`describe_model`'s inverse.

    Raises:
        ModelError: unknown name or arguments the model does not accept.
    """
    kwargs = dict(kwargs)
    if name.startswith(HF_PREFIX):
        cls, base = _hf_spec(name[len(HF_PREFIX):])
        return _build(name, kwargs, lambda: cls(cls.config_class(**{**base, **kwargs})))
    if name.startswith(TV_PREFIX):
        return _build(name, kwargs, lambda: _tv_builder(name[len(TV_PREFIX):])(**kwargs))
    if not timm.is_model(name):
        raise ModelError(unknown_model_message(name))
    return _build(name, kwargs, lambda: timm.create_model(name, pretrained=False, **kwargs))


def _build(name: str, kwargs: dict[str, Any], make: Any) -> nn.Module:
    try:
        return make()
    except ModelError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, ArithmeticError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f'model {name!r} cannot be built with {_short(kwargs)}: {reason}; fix --model-kwargs') \
            from None


def _short(kwargs: Mapping[str, Any]) -> str:
    text = str(dict(kwargs))
    return text if len(text) <= 160 else text[:157] + '...'


# --------------------------------------------------------------------------------------------- Hugging Face
def _transformers():
    try:
        import transformers
    except ImportError:
        raise ModelError('hf: models need Hugging Face transformers; pip install "amap[hf]"') from None
    return transformers


def _hf_spec(spec: str) -> tuple[type, dict[str, Any]]:
    """The transformers class and base config entries of ``hf:<spec>`` (a class name, a config.json, or a folder
    written by ``save_pretrained``)."""
    from ..utils.io import read_json
    transformers = _transformers()
    base: dict[str, Any] = {}
    path = Path(spec)
    if spec.endswith('.json') or path.is_dir() or path.exists():
        file = path / 'config.json' if path.is_dir() else path
        if not file.is_file():
            raise ModelError(f'--model hf:{spec}: no config.json there; pass a transformers config.json, the folder '
                             f'save_pretrained wrote, or a class name ({", ".join(HF_CLASSES)})')
        doc = read_json(file)
        archs = doc.get('architectures') if isinstance(doc, dict) else None
        if not archs:
            raise ModelError(f'{file}: the config names no architecture ("architectures"); pass --model hf:<class>')
        spec, base = archs[0], _hf_shape_config(doc)
    cls = getattr(transformers, spec, None)
    if spec not in HF_CLASSES or cls is None:
        close = difflib.get_close_matches(spec, HF_CLASSES, n=1, cutoff=0.5)
        hint = f'did you mean {close[0]}?' if close else f'AMAP prunes {", ".join(HF_CLASSES)}'
        raise ModelError(f'unknown Hugging Face model hf:{spec}; {hint}')
    return cls, base


def _hf_shape_config(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a transformers config that shape the model (``num_labels`` instead of the label names)."""
    out = {k: v for k, v in doc.items() if k not in _HF_NOT_SHAPE}
    labels = doc.get('id2label')
    if isinstance(labels, Mapping) and 'num_labels' not in out:
        out['num_labels'] = len(labels)
    return out


def _hf_create(spec: str, *, num_classes: int, img_size: int | None,
               model_kwargs: Mapping[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    cls, base = _hf_spec(spec)
    kwargs = {**base, 'num_labels': num_classes}
    if img_size is not None:
        kwargs['image_size'] = img_size
    kwargs.update(model_kwargs or {})
    name = HF_PREFIX + spec
    return _build(name, kwargs, lambda: cls(cls.config_class(**kwargs))), kwargs


# ----------------------------------------------------------------------------------------------- torchvision
def _tv_builder(spec: str) -> Any:
    import torchvision.models as tvm
    if spec in TV_CLASSES:
        return getattr(tvm, spec)
    if spec in tvm.list_models(module=tvm):
        return lambda **kw: tvm.get_model(spec, weights=None, **kw)
    close = difflib.get_close_matches(spec, [*TV_CLASSES, *tvm.list_models(module=tvm)], n=3, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}?' if close else 'see torchvision.models.list_models()'
    raise ModelError(f'unknown torchvision model torchvision:{spec}; {hint}')


def _tv_create(spec: str, *, num_classes: int, img_size: int | None,
               model_kwargs: Mapping[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    builder = _tv_builder(spec)
    kwargs: dict[str, Any] = {'num_classes': num_classes}
    if img_size is not None and (spec == 'VisionTransformer' or spec.startswith('vit_')):
        kwargs['image_size'] = img_size  # Swin takes any size
    kwargs.update(model_kwargs or {})
    return _build(TV_PREFIX + spec, kwargs, lambda: builder(**kwargs)), kwargs


def _tv_describe(model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """The constructor arguments of a torchvision ``VisionTransformer`` / ``SwinTransformer``, read off the model."""
    import torchvision.models as tvm
    from torchvision.models.swin_transformer import ShiftedWindowAttention
    if type(model) is tvm.VisionTransformer and isinstance(model.conv_proj, nn.Conv2d):
        layers = list(model.encoder.layers)
        return TV_PREFIX + 'VisionTransformer', {
            'image_size': model.image_size, 'patch_size': model.patch_size, 'num_layers': len(layers),
            'num_heads': layers[0].num_heads, 'hidden_dim': model.hidden_dim, 'mlp_dim': model.mlp_dim,
            'dropout': model.dropout, 'attention_dropout': model.attention_dropout, 'num_classes': model.num_classes,
            'representation_size': model.representation_size}
    if type(model) is tvm.SwinTransformer:
        stages = [stage for stage in model.features[1::2]]
        blocks = [block for stage in stages for block in stage]
        if not blocks or not all(type(b.attn) is ShiftedWindowAttention for b in blocks):
            return None  # Swin V2: not described (its attention is not pruned either)
        embed = model.features[0][0]
        first = blocks[0]
        return TV_PREFIX + 'SwinTransformer', {
            'patch_size': list(embed.kernel_size), 'embed_dim': embed.out_channels,
            'depths': [len(stage) for stage in stages], 'num_heads': [stage[0].attn.num_heads for stage in stages],
            'window_size': list(first.attn.window_size),
            'mlp_ratio': first.mlp[0].out_features / first.mlp[0].in_features,
            'dropout': first.attn.dropout, 'attention_dropout': first.attn.attention_dropout,
            'stochastic_depth_prob': blocks[-1].stochastic_depth.p, 'num_classes': model.head.out_features}
    return None


# ------------------------------------------------------------------------------------------------ description
def describe_model(model: nn.Module, name: str | None = None,
                   kwargs: Mapping[str, Any] | None = None) -> tuple[str | None, dict[str, Any], list[str]]:
    """``(name, kwargs, mismatches)``: what :func:`build_model` needs to rebuild ``model``'s architecture.

    Hugging Face models are described by their class and config, torchvision ViT / Swin by every constructor
    argument read off the model, timm models by their registry name, the given ``kwargs`` and, where the model has
    them, ``img_size`` / ``patch_size`` / ``in_chans`` of its patch embedding. The description is checked by building
    it on the meta device: ``mismatches`` lists the parameters and buffers whose shapes it does not reproduce (empty
    when it is complete).

    Args:
        model: The (unpruned) model.
        name: The name it was created with (default: read off the model).
        kwargs: The arguments it was created with (completed from the model).
    """
    given = dict(kwargs or {})
    if type(model).__module__.startswith('transformers.'):
        config = model.config.to_diff_dict()
        name, given = HF_PREFIX + type(model).__name__, {**_hf_shape_config(config),
                                                          'num_labels': model.config.num_labels}
    elif type(model).__module__.startswith('torchvision.'):
        described = _tv_describe(model)
        if described is not None:
            name, given = described[0], {**given, **described[1]}
    else:
        name = name or (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
        if name and isinstance(getattr(model, 'num_classes', None), int):
            given.setdefault('num_classes', model.num_classes)
    if not name:
        return None, given, ['(architecture unknown)']
    bad = _mismatches(model, name, given)
    if bad and not name.startswith((HF_PREFIX, TV_PREFIX)):
        more = {k: v for k, v in _timm_shape_args(model).items() if k not in given}
        if more and not _mismatches(model, name, {**given, **more}):
            given, bad = {**given, **more}, []
    return name, given, bad


def _timm_shape_args(model: nn.Module) -> dict[str, Any]:
    """``img_size``, ``patch_size`` and ``in_chans`` of a timm model's patch embedding (where it has one)."""
    embed = getattr(model, 'patch_embed', None)
    out: dict[str, Any] = {}
    for key, attr in (('img_size', 'img_size'), ('patch_size', 'patch_size')):
        value = getattr(embed, attr, None)
        if isinstance(value, (tuple, list)) and len(value) == 2:
            out[key] = int(value[0]) if value[0] == value[1] else [int(v) for v in value]
        elif isinstance(value, int):
            out[key] = value
    proj = getattr(embed, 'proj', None)
    if isinstance(proj, nn.Conv2d):
        out['in_chans'] = proj.in_channels
    return out


def _mismatches(model: nn.Module, name: str, kwargs: Mapping[str, Any]) -> list[str]:
    """Parameters and buffers of ``model`` whose shapes ``build_model(name, kwargs)`` does not reproduce."""
    try:
        with torch.device('meta'):
            built = build_model(name, kwargs)
    except ModelError as e:
        return [f'(cannot build: {e})']
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    other = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    return sorted(k for k in own.keys() | other.keys() if own.get(k) != other.get(k))


def native_img_size(model: nn.Module) -> int | None:
    """The input side a Hugging Face or torchvision ViT was built for (``config.image_size`` / ``image_size``);
    None for others (timm models carry theirs in ``pretrained_cfg``)."""
    for size in (getattr(getattr(model, 'config', None), 'image_size', None), getattr(model, 'image_size', None)):
        if isinstance(size, int):
            return size
        if isinstance(size, (tuple, list)) and size and isinstance(size[-1], int):
            return size[-1]
    return None
