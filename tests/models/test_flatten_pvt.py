"""FLatten-PVT (v1) and FLatten-PVTv2: conformance with the official implementation and the width/hook contract."""
from __future__ import annotations

import inspect
import json

import pytest
import timm
import torch
from rebuild_helpers import rebuild_blocks, rebuild_modules
from safetensors import safe_open
from torch import nn

import amap  # noqa: F401  (registers the zoo)
from amap.errors import ModelError
from amap.models.flatten_pvt import (
    PvtAttention,
    PvtFocusedLinearAttention,
    PyramidVisionTransformer,
    stage_attention,
)
from amap.models.flatten_pvt_v2 import PyramidVisionTransformerV2

PVT_NAMES = ['flatten_pvt_tiny', 'flatten_pvt_small', 'flatten_pvt_medium', 'flatten_pvt_large']
PVT_V2_NAMES = [f'flatten_pvt_v2_b{i}' for i in range(6)]
CLASSES = {'PyramidVisionTransformer': PyramidVisionTransformer,
           'PyramidVisionTransformerV2': PyramidVisionTransformerV2}

# The official constructors' keyword arguments and defaults (models/flatten_pvt.py, flatten_pvt_v2.py @abdb115).
_OFFICIAL_V1 = dict(
    img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dims=[64, 128, 256, 512], num_heads=[1, 2, 4, 8],
    mlp_ratios=[4, 4, 4, 4], qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0., drop_path_rate=0.,
    norm_layer=nn.LayerNorm, depths=[3, 4, 6, 3], sr_ratios=[8, 4, 2, 1], la_sr_ratios='8421', num_stages=4,
    focusing_factor=3, kernel_size=5, attn_type='LLLL')
_OFFICIAL_V2 = {**_OFFICIAL_V1, 'linear': False}

# Small random-weight models for the numeric tests (the reference cases' sizes).
_SMALL = dict(img_size=64, patch_size=4, num_classes=10, embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8],
              mlp_ratios=[4, 4, 4, 4], qkv_bias=True, depths=[1, 1, 2, 1], la_sr_ratios='1111')


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturb every parameter (including the zero-initialised scale / positional encodings) so they all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------- official
@pytest.mark.parametrize('case', ['pvt_v1_llll', 'pvt_v2_llll'])
def test_reference_case_reproduces_official_output(flatten_reference, case):
    with safe_open(str(flatten_reference / 'cases' / f'{case}.safetensors'), 'pt') as f:
        meta = f.metadata()
        state = {k[len('model.'):]: f.get_tensor(k) for k in f.keys() if k.startswith('model.')}
        x, expected = f.get_tensor('input'), f.get_tensor('output')
    model = CLASSES[meta['official_class']](**json.loads(meta['kwargs'])).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', PVT_NAMES + PVT_V2_NAMES)
def test_released_model_matches_official_manifest(flatten_reference, name):
    manifest = json.loads((flatten_reference / 'official_state_dict_shapes.json').read_text())[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(manifest)  # same keys, same order
    assert shapes == manifest
    assert model.stage_attention == [('L', 1)] * 4  # released settings: attn_type LLLL, la_sr_ratios '1111'


@pytest.mark.parametrize('name, millions', [('flatten_pvt_tiny', 12.15), ('flatten_pvt_v2_b1', 12.93)])
def test_parameter_counts(name, millions):
    with torch.device('meta'):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.005)


@pytest.mark.parametrize('cls, expected', [(PyramidVisionTransformer, _OFFICIAL_V1),
                                           (PyramidVisionTransformerV2, _OFFICIAL_V2)])
def test_constructor_takes_official_arguments_and_defaults(cls, expected):
    params = inspect.signature(cls).parameters
    for name, default in expected.items():
        assert name in params, name
        got = params[name].default
        assert (list(got) if isinstance(got, tuple) else got) == default, name
    assert set(params) == set(expected)


@pytest.mark.parametrize('name', ['flatten_pvt_tiny', 'flatten_pvt_v2_b0'])
def test_released_model_runs_at_224(name):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ attention per stage
def test_stage_attention_translates_official_strings():
    assert stage_attention('LLSS', '8421', [8, 4, 2, 1], 4) == [('L', 8), ('L', 4), ('S', 2), ('S', 1)]
    assert stage_attention(None, '1111', [8, 4, 2, 1], 4) == [('L', 1)] * 4
    assert stage_attention('SLSL', 2222, [4, 2, 2, 1], 4) == [('S', 4), ('L', 2), ('S', 2), ('L', 2)]
    with pytest.raises(ModelError, match='attn_type'):
        stage_attention('LLXL', '1111', [8, 4, 2, 1], 4)
    with pytest.raises(ModelError, match='per stage'):
        stage_attention('LL', '1111', [8, 4, 2, 1], 4)


@pytest.mark.parametrize('cls', [PyramidVisionTransformer, PyramidVisionTransformerV2])
@pytest.mark.parametrize('attn_type, la_sr_ratios', [('LLLL', '8421'), ('LLSS', '4211'), ('SLSL', '2222')])
def test_non_default_attention_builds_and_runs(cls, attn_type, la_sr_ratios):
    torch.manual_seed(0)
    kwargs = dict(_SMALL, attn_type=attn_type, la_sr_ratios=la_sr_ratios)
    model = _randomise(cls(**kwargs))
    stages = stage_attention(attn_type, la_sr_ratios, [8, 4, 2, 1], 4)
    for i, (letter, sr) in enumerate(stages):
        attn = getattr(model, f'block{i + 1}')[0].attn
        assert isinstance(attn, PvtFocusedLinearAttention if letter == 'L' else PvtAttention)
        assert attn.sr_ratio == sr and hasattr(attn, 'sr') == (sr > 1)
        if letter == 'L':  # the official length: stage tokens at img_size // sr_ratio ** 2
            assert attn.positional_encoding.shape[1] == (64 // 4 // 2 ** i) ** 2 // sr ** 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        again = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert torch.equal(out, again)
    clone = cls(**kwargs).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(clone(x), out)


def test_pvt_v2_linear_pooled_reduction_runs():
    # linear=True pools keys/values to 7x7: with la_sr_ratios '8421' at 224 every stage's positional_encoding has 49
    kwargs = dict(_SMALL, img_size=224, depths=[1, 1, 1, 1], la_sr_ratios='8421', linear=True)
    model = _randomise(PyramidVisionTransformerV2(**kwargs))
    assert all(getattr(model, f'block{i}')[0].attn.positional_encoding.shape[1] == 49 for i in range(1, 5))
    assert isinstance(model.block1[0].mlp.relu, nn.ReLU)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_pvt_v1_position_embedding_resized_for_other_input_sizes():
    model = _randomise(PyramidVisionTransformer(**dict(_SMALL, attn_type='SSSS')))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 80))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- widths and hooks
@pytest.mark.parametrize('cls', [PyramidVisionTransformer, PyramidVisionTransformerV2])
def test_smaller_widths_build_and_run(cls):
    names = ['block1.0', 'block2.0', 'block3.0', 'block3.1', 'block4.0']
    widths = [dict(qk=4, v=8, mlp=20), dict(qk=3, v=5, dwc_shared=False), dict(qk=2, v=7, mlp=33), dict(qk=16, v=1),
              dict(v=3, mlp=100)]

    def build() -> nn.Module:
        return rebuild_blocks(cls(**dict(_SMALL, attn_type='LLLS')), dict(zip(names, widths)))

    model = _randomise(build())
    blocks = [blk for i in range(4) for blk in getattr(model, f'block{i + 1}')]
    got = []
    for blk, w, heads in zip(blocks, widths, [1, 2, 4, 4, 8]):
        attn, dim = blk.attn, blk.norm1.normalized_shape[0]
        dq, dv = w.get('qk', dim // heads), w.get('v', dim // heads)
        assert attn.q.weight.shape == (heads * dq, dim)
        assert attn.kv.weight.shape == (heads * (dq + dv), dim)
        assert attn.proj.weight.shape == (dim, heads * dv)
        assert blk.mlp.fc1.out_features == w.get('mlp', 4 * dim)
        if isinstance(attn, PvtFocusedLinearAttention):
            assert attn.scale.shape == (1, 1, heads * dq)
            assert attn.positional_encoding.shape[-1] == heads * dq
            shared = w.get('dwc_shared', True)
            assert attn.dwc.weight.shape[0] == (dv if shared else heads * dv)
        got.append(dict(qk_dim=attn.qk_dim, v_dim=attn.v_dim, mlp_hidden=blk.mlp.fc1.out_features,
                        **({'dwc_shared': attn.dwc.shared} if isinstance(attn, PvtFocusedLinearAttention) else {})))
    expected = [dict(qk_dim=4, v_dim=8, mlp_hidden=20, dwc_shared=True),
                dict(qk_dim=3, v_dim=5, mlp_hidden=128, dwc_shared=False),
                dict(qk_dim=2, v_dim=7, mlp_hidden=33, dwc_shared=True),
                dict(qk_dim=16, v_dim=1, mlp_hidden=256, dwc_shared=True),
                dict(qk_dim=16, v_dim=3, mlp_hidden=100)]  # last stage is softmax: no DWC
    assert got == expected
    rebuilt = build()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


class _ChannelMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@pytest.mark.parametrize('cls', [PyramidVisionTransformer, PyramidVisionTransformerV2])
def test_qk_gate_zeroing_equals_slicing_the_channels(cls):
    """A qk_gate that zeroes channels computes exactly the model with those q/k channels cut out."""
    kwargs = dict(_SMALL, la_sr_ratios='2111')  # also through the spatial-reduction path
    torch.manual_seed(0)
    full = _randomise(cls(**kwargs))
    keep_per_head = 2
    g = torch.Generator().manual_seed(1)
    keeps, widths = [], []
    for i in range(4):
        for blk in getattr(full, f'block{i + 1}'):
            attn = blk.attn
            heads, dq = attn.num_heads, attn.qk_dim
            keep = torch.cat([h * dq + torch.randperm(dq, generator=g)[:keep_per_head].sort().values
                              for h in range(heads)])  # different channels in every head
            mask = torch.zeros(heads * dq)
            mask[keep] = 1
            attn.qk_gate = _ChannelMask(mask)
            keeps.append(keep)
            widths.append({'qk': keep_per_head})
    blk_names = [f'block{i + 1}.{j}' for i in range(4) for j in range(kwargs['depths'][i])]
    sliced = rebuild_modules(cls(**kwargs), {f'{n}.attn': w for n, w in zip(blk_names, widths)}).eval()
    state = full.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith('qk_gate.mask')}
    for name, keep in zip(blk_names, keeps):
        p = f'{name}.attn.'
        qk_channels = state[p + 'q.weight'].shape[0]
        kv_rows = torch.cat([keep, torch.arange(qk_channels, state[p + 'kv.weight'].shape[0])])
        state[p + 'q.weight'], state[p + 'q.bias'] = state[p + 'q.weight'][keep], state[p + 'q.bias'][keep]
        state[p + 'kv.weight'], state[p + 'kv.bias'] = state[p + 'kv.weight'][kv_rows], state[p + 'kv.bias'][kv_rows]
        state[p + 'scale'] = state[p + 'scale'][..., keep]
        state[p + 'positional_encoding'] = state[p + 'positional_encoding'][..., keep]
    sliced.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        gated, cut = full(x), sliced(x)
        plain = cls(**kwargs).eval()
        plain.load_state_dict({k: v for k, v in full.state_dict().items() if 'qk_gate' not in k})
        ungated = plain(x)
    torch.testing.assert_close(cut, gated, atol=1e-5, rtol=0)
    assert (ungated - gated).abs().max() > 1e-3  # the gate really removed something


def test_softmax_attention_keeps_original_scale_so_cutting_qk_channels_is_exact():
    torch.manual_seed(0)
    dim, heads, keep = 64, 4, torch.tensor([0, 3, 5, 16, 17, 30, 40, 41, 42, 60, 61, 63])
    full = PvtAttention(dim, num_heads=heads, qkv_bias=True, sr_ratio=2).eval()
    cut = PvtAttention(dim, num_heads=heads, qkv_bias=True, sr_ratio=2, qk_dim=3).eval()
    assert cut.scale == full.scale == (dim // heads) ** -0.5
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        drop = torch.ones(dim, dtype=torch.bool)
        drop[keep] = False
        full.q.weight[drop] = 0
        full.q.bias[drop] = 0
        state = full.state_dict()
        kv_rows = torch.cat([keep, torch.arange(dim, 2 * dim)])
        state['q.weight'], state['q.bias'] = state['q.weight'][keep], state['q.bias'][keep]
        state['kv.weight'], state['kv.bias'] = state['kv.weight'][kv_rows], state['kv.bias'][kv_rows]
        cut.load_state_dict(state, strict=True)
        x = torch.randn(2, 64, dim)
        torch.testing.assert_close(cut(x, 8, 8), full(x, 8, 8), atol=1e-6, rtol=0)


def test_unshared_dwc_with_copied_kernels_is_exact():
    torch.manual_seed(0)
    kwargs = dict(dim=32, num_patches=64, num_heads=4, qkv_bias=True, sr_ratio=2)
    shared = PvtFocusedLinearAttention(**kwargs).eval()
    unshared = PvtFocusedLinearAttention(**kwargs, dwc_shared=False).eval()
    with torch.no_grad():
        for p in shared.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        state = shared.state_dict()
        state['dwc.weight'] = state['dwc.weight'].repeat(4, 1, 1, 1)
        state['dwc.bias'] = state['dwc.bias'].repeat(4)
        unshared.load_state_dict(state, strict=True)
        x = torch.randn(2, 64, 32)
        torch.testing.assert_close(unshared(x, 8, 8), shared(x, 8, 8), atol=1e-6, rtol=0)


def test_focused_linear_attention_with_spatial_reduction_follows_the_official_recipe():
    """Spec check of the sr_ratio > 1 path, written from the method description (amap-method.md section 9) and the
    official module's order of operations: keys/values from a strided conv + LayerNorm; v is interpolated back to the
    N query tokens by 1-D linear interpolation over the flattened token sequence before the shared DWC."""
    torch.manual_seed(0)
    B, dim, heads, H, W, sr, p = 2, 32, 4, 8, 8, 2, 3
    attn = PvtFocusedLinearAttention(dim, H * W, num_heads=heads, qkv_bias=True, sr_ratio=sr).eval()
    with torch.no_grad():
        for prm in attn.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
        x = torch.randn(B, H * W, dim)
        N, d = H * W, dim // heads

        def phi(t):
            t = (torch.relu(t) + 1e-6) / nn.functional.softplus(attn.scale)
            return t ** p / (t ** p).norm(dim=-1, keepdim=True) * t.norm(dim=-1, keepdim=True)

        red = attn.sr(x.transpose(1, 2).reshape(B, dim, H, W)).flatten(2).transpose(1, 2)
        kv = attn.kv(attn.norm(red))
        n = kv.shape[1]
        q, k, v = phi(attn.q(x)), phi(kv[..., :dim] + attn.positional_encoding), kv[..., dim:]
        out = torch.empty(B, N, dim)
        for h in range(heads):
            qh, kh, vh = (t[..., h * d:(h + 1) * d] for t in (q, k, v))
            z = 1 / (qh @ kh.mean(dim=1, keepdim=True).transpose(1, 2) + 1e-6)
            out[..., h * d:(h + 1) * d] = qh @ (kh.transpose(1, 2) @ vh / n) * z
            v_full = nn.functional.interpolate(vh.transpose(1, 2), size=N, mode='linear')  # (B, d, N)
            out[..., h * d:(h + 1) * d] += attn.dwc._conv_forward(
                v_full.reshape(B, d, H, W), attn.dwc.weight, attn.dwc.bias).flatten(2).transpose(1, 2)
        expected = attn.proj(out)
        torch.testing.assert_close(attn(x, H, W), expected, atol=1e-5, rtol=0)
