"""Conformance with the official FLatten Transformer (LeapLabTHU/FLatten-Transformer @ abdb115).

* every released model, registered in timm under its official name, has exactly the official state-dict keys and
  shapes (so official checkpoints load with strict=True) and the official parameter count;
* every reference case, built with :func:`amap.models.from_official` from its recorded constructor and arguments and
  loaded from an official-style checkpoint through :func:`amap.load_checkpoint`, reproduces the official logits;
* ``from_official`` accepts the official constructors' arguments and factory names, and rejects anything else clearly.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import reference_dir
from safetensors import safe_open
from torch import nn

import amap
from amap.errors import ModelError
from amap.models import from_official
from amap.models.official import official_names

SHAPES_FILE = reference_dir() / 'official_state_dict_shapes.json'
CASES = sorted((reference_dir() / 'cases').glob('*.safetensors'))


@functools.lru_cache(maxsize=1)
def _official_shapes() -> dict[str, dict[str, list[int]]]:
    return json.loads(SHAPES_FILE.read_text())


def _build(fn, *args, **kwargs) -> nn.Module:
    """Build on the meta device (no memory, no init cost); our models support it."""
    with torch.device('meta'):
        return fn(*args, **kwargs)


def test_fixtures_are_present():
    assert len(_official_shapes()) == 16, SHAPES_FILE
    assert {p.stem for p in CASES} == {'swin_llss', 'pvt_v1_llll', 'pvt_v2_llll', 'cswin_llss'}


# -- every released model: keys, shapes, parameter counts -------------------------------------------------------------

@pytest.mark.parametrize('name', list(_official_shapes()))
def test_state_dict_matches_official(name):
    expected = _official_shapes()[name]
    model = _build(timm.create_model, name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    assert not missing and not extra, (
        f'{name}: missing {missing[:5]} ({len(missing)}), extra {extra[:5]} ({len(extra)})')
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f'{name}: shape mismatches (ours, official) {dict(list(wrong.items())[:5])}'


# From the fixture README (official code): parameter counts in millions.
PARAMS_M = {
    'flatten_swin_tiny': 29.19,
    'flatten_pvt_tiny': 12.15,
    'flatten_pvt_v2_b1': 12.93,
    'FLatten_CSWin_64_24181_tiny_224': 21.20,
}


@pytest.mark.parametrize('name', list(PARAMS_M))
def test_parameter_count(name):
    model = _build(timm.create_model, name)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 1e6 - PARAMS_M[name]) < 0.01, f'{name}: {params / 1e6:.3f}M vs {PARAMS_M[name]}M'
    # and the manifest agrees: parameters = state dict minus the two regenerated buffers
    shapes = _official_shapes()[name]
    manifest = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(('relative_position_index', 'attn_mask')))
    assert params == manifest


# -- every reference case: official weights through our load path reproduce the official logits ---------------------

def _read_case(path: Path) -> tuple[str, dict, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    kwargs = json.loads(meta['kwargs'])
    sd = {k[len('model.'):]: v for k, v in tensors.items() if k.startswith('model.')}
    return meta['official_class'], kwargs, sd, tensors['input'], tensors['output']


def _case_kwargs(kwargs: dict) -> dict:
    """The recorded arguments are plain JSON (numbers, strings, lists; no norm_layer or other objects). Check that,
    so a future case with a non-JSON value (e.g. a serialised norm_layer) fails here instead of being mis-built."""
    def plain(v):
        return v is None or isinstance(v, (bool, int, float, str)) or (isinstance(v, list) and all(map(plain, v)))
    assert all(plain(v) for v in kwargs.values()), kwargs
    return kwargs


@pytest.mark.parametrize('path', CASES, ids=[p.stem for p in CASES])
def test_reference_case_reproduces_official_output(path, tmp_path):
    class_name, kwargs, sd, x, expected = _read_case(path)
    torch.manual_seed(0)
    model = from_official(class_name, **_case_kwargs(kwargs))
    assert type(model).__name__ == class_name

    ckpt = tmp_path / f'{path.stem}.pth'
    torch.save({'model': sd, 'epoch': 0, 'max_accuracy': 0.0}, ckpt)  # as the official save_checkpoint does
    result = amap.load_checkpoint(model, ckpt, strict=True)
    assert (result.missing_keys, result.unexpected_keys, result.ignored_keys) == ([], [], [])
    ours = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(ours[k], v), k

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# -- from_official: arguments, factories, errors ----------------------------------------------------------------------

# The keyword arguments of the official constructors (read from the official source at abdb115).
OFFICIAL_ARGS = {
    'FLattenSwinTransformer': [
        'img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depths', 'num_heads', 'window_size',
        'mlp_ratio', 'qkv_bias', 'qk_scale', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'norm_layer', 'ape',
        'patch_norm', 'use_checkpoint', 'focusing_factor', 'kernel_size', 'attn_type'],
    'PyramidVisionTransformer': [
        'img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dims', 'num_heads', 'mlp_ratios', 'qkv_bias',
        'qk_scale', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'norm_layer', 'depths', 'sr_ratios',
        'la_sr_ratios', 'num_stages', 'focusing_factor', 'kernel_size', 'attn_type'],
    'PyramidVisionTransformerV2': [
        'img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dims', 'num_heads', 'mlp_ratios', 'qkv_bias',
        'qk_scale', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'norm_layer', 'depths', 'sr_ratios',
        'la_sr_ratios', 'num_stages', 'linear', 'focusing_factor', 'kernel_size', 'attn_type'],
    'CSWinTransformer': [
        'img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth', 'split_size', 'la_split_size',
        'num_heads', 'mlp_ratio', 'qkv_bias', 'qk_scale', 'drop_rate', 'attn_drop_rate', 'drop_path_rate',
        'hybrid_backbone', 'norm_layer', 'use_chk', 'focusing_factor', 'kernel_size', 'attn_type'],
}
FINAL_NORM = {'FLattenSwinTransformer': 'norm', 'PyramidVisionTransformer': 'norm',
              'PyramidVisionTransformerV2': 'norm4', 'CSWinTransformer': 'norm'}


# CSWin's default la_split_size ('1-2-7-7') cannot run focused linear attention (our class says so when built):
# give it the released setting.
BASE = {'CSWinTransformer': dict(attn_type='LLSS', la_split_size='56-28-14-7')}


@pytest.mark.parametrize('class_name', list(OFFICIAL_ARGS))
def test_every_official_argument_is_accepted(class_name):
    """Passing every official argument at its official default builds the same model as passing none."""
    import inspect
    base = BASE.get(class_name, {})
    cls = type(_build(from_official, class_name, **base))
    params = inspect.signature(cls).parameters
    assert set(OFFICIAL_ARGS[class_name]) <= set(params), set(OFFICIAL_ARGS[class_name]) - set(params)
    defaults = {k: params[k].default for k in OFFICIAL_ARGS[class_name]}
    a, b = _build(from_official, class_name, **base), _build(from_official, class_name, **{**defaults, **base})
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


@pytest.mark.parametrize('class_name', list(OFFICIAL_ARGS))
def test_norm_layer_is_honoured(class_name):
    base = BASE.get(class_name, {})
    default = _build(from_official, class_name, **base)
    custom = _build(from_official, class_name, **base, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    assert default.get_submodule(FINAL_NORM[class_name]).eps == 1e-5  # the classes default to nn.LayerNorm
    assert custom.get_submodule(FINAL_NORM[class_name]).eps == 1e-6


def test_swin_options_change_the_structure_as_officially():
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
              num_classes=5, attn_type='LS')
    base = from_official('FLattenSwinTransformer', **kw).state_dict()
    opt = from_official('FLattenSwinTransformer', **kw, ape=True, patch_norm=False, in_chans=1).state_dict()
    assert 'absolute_pos_embed' in opt and 'absolute_pos_embed' not in base
    assert 'patch_embed.norm.weight' in base and 'patch_embed.norm.weight' not in opt
    assert opt['patch_embed.proj.weight'].shape[1] == 1


def test_pvt_v2_linear_option_builds_and_runs():
    """linear=True pools keys/values to 7x7: officially it runs where each stage's map / la_sr_ratio is 7."""
    model = from_official('PyramidVisionTransformerV2', img_size=224, patch_size=4, num_classes=3,
                          embed_dims=[8, 16, 24, 32], num_heads=[1, 2, 3, 4], depths=[1, 1, 1, 1], linear=True,
                          la_sr_ratios='8421', attn_type='LLLL').eval()
    assert model.state_dict()['block1.0.attn.positional_encoding'].shape == (1, 49, 8)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 3)


FACTORIES = [n for n in official_names() if n not in OFFICIAL_ARGS]


@pytest.mark.parametrize('name', FACTORIES)
def test_official_factory_names(name):
    model = _build(from_official, name, num_classes=7, drop_path_rate=0.1, attn_type='LLSS' if 'CSWin' in name
                   else 'LLLL')
    assert model.num_classes == 7
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    if name in _official_shapes():  # same layout as the registered model, with the overridden head
        expected = dict(_official_shapes()[name])
        for k in ('head.weight', 'head.bias'):
            expected[k] = [7, *expected[k][1:]]
        assert ours == expected
    if name.startswith('flatten_pvt'):  # the official PVT factories set LayerNorm(eps=1e-6)
        assert model.get_submodule('norm4' if 'v2' in name else 'norm').eps == 1e-6


def test_unknown_class_name_suggests_the_closest():
    with pytest.raises(ModelError, match=r"unknown official model 'FlattenSwinTransformer'; did you mean "
                                         r"'FLattenSwinTransformer'\? \(supported classes: FLattenSwinTransformer, "
                                         r"PyramidVisionTransformer, PyramidVisionTransformerV2, CSWinTransformer;"):
        from_official('FlattenSwinTransformer')
    with pytest.raises(ModelError, match=r"did you mean 'FLatten_CSWin_64_24181_tiny_224'"):
        from_official('flatten_cswin_64_24181_tiny_224')
    with pytest.raises(ModelError, match=r"unknown official model 'resnet50' \(supported"):
        from_official('resnet50')


def test_unknown_argument_names_it_and_the_accepted_ones():
    import inspect
    with pytest.raises(ModelError) as info:
        from_official('PyramidVisionTransformer', embed_dim=64)
    msg = str(info.value)
    assert msg.startswith("PyramidVisionTransformer does not accept the argument 'embed_dim'; did you mean "
                          "'embed_dims'? (accepted: img_size, patch_size, ")
    cls = type(_build(from_official, 'PyramidVisionTransformer'))
    accepted = [n for n in inspect.signature(cls).parameters if n not in ('args', 'kwargs')]
    assert msg.endswith(f'(accepted: {", ".join(accepted)})')  # derived from the signature, not a hand-kept list
    with pytest.raises(ModelError, match=r"FLatten_CSWin_64_24181_tiny_224 does not accept the argument 'depths'; "
                                         r"did you mean 'depth'\?"):
        from_official('FLatten_CSWin_64_24181_tiny_224', depths=[1, 1, 1, 1])
    with pytest.raises(ModelError, match=r'pretrained=True\): nothing is downloaded; .*amap\.load_checkpoint'):
        from_official('flatten_pvt_v2_b0', pretrained=True)


def test_invalid_argument_values_are_model_errors(monkeypatch):
    with pytest.raises(ModelError, match=r"attn_type='LXQ'"):
        from_official('FLattenSwinTransformer', img_size=32, patch_size=2, embed_dim=16, depths=[1, 1],
                      num_heads=[1, 2], window_size=4, attn_type='LXQ')

    class Rejecting(nn.Module):  # a constructor that rejects a value with a plain ValueError
        def __init__(self, img_size: int = 224):
            raise ValueError(f'img_size {img_size} is not a multiple\nof the patch size')

    import amap.models.flatten_swin as family
    monkeypatch.setattr(family, 'FLattenSwinTransformer', Rejecting)
    with pytest.raises(ModelError) as info:
        from_official('FLattenSwinTransformer', img_size=30)
    assert str(info.value) == ('FLattenSwinTransformer(img_size=30) cannot be built: img_size 30 is not a multiple of '
                               'the patch size; check these arguments')
