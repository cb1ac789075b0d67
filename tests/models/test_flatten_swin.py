"""FLatten-Swin: conformance with the official implementation, and the width / hook contract pruning relies on."""
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
from amap.models.flatten_swin import FLattenSwinTransformer, FocusedLinearAttention, WindowAttention

RELEASED = ['flatten_swin_tiny', 'flatten_swin_small', 'flatten_swin_base']
ALL_NAMES = [*RELEASED, 'flatten_swin_base_384', 'flatten_swin_micro', 'flatten_swin_nano']

# The official constructor's keyword arguments and defaults (models/flatten_swin.py @abdb115), read for the facts.
_OFFICIAL_DEFAULTS = dict(
    img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=[2, 2, 6, 2],
    num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4., qkv_bias=True, qk_scale=None, drop_rate=0.,
    attn_drop_rate=0., drop_path_rate=0.1, norm_layer=nn.LayerNorm, ape=False, patch_norm=True,
    use_checkpoint=False, focusing_factor=3, kernel_size=5, attn_type='LLLL')


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of a useful scale, including the zero-initialised scale/positional_encoding/bias tables."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm1.weight') or name.endswith('norm2.weight') or name.endswith('norm.weight'):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _qk_keep(num_heads: int, head_dim: int, keep: int, seed: int) -> torch.Tensor:
    """Indices (in the ``num_heads * head_dim`` q/k layout) of ``keep`` channels per head, different per head."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([h * head_dim + torch.randperm(head_dim, generator=g)[:keep].sort().values
                      for h in range(num_heads)])


class _ChannelMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_constructor_takes_the_official_arguments_and_defaults():
    params = inspect.signature(FLattenSwinTransformer).parameters
    for name, default in _OFFICIAL_DEFAULTS.items():
        assert name in params, name
        ours = params[name].default
        assert (list(ours) if isinstance(ours, tuple) else ours) == default, name


def test_reference_case_reproduces_official_output(flatten_reference):
    with safe_open(str(flatten_reference / 'cases' / 'swin_llss.safetensors'), 'pt') as f:
        meta = f.metadata()
        state = {k[len('model.'):]: f.get_tensor(k) for k in f.keys() if k.startswith('model.')}
        x, expected = f.get_tensor('input'), f.get_tensor('output')
    assert meta['official_class'] == 'FLattenSwinTransformer'
    model = FLattenSwinTransformer(**json.loads(meta['kwargs'])).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', RELEASED)
def test_released_model_matches_official_manifest(flatten_reference, name):
    manifest = json.loads((flatten_reference / 'official_state_dict_shapes.json').read_text())[name]
    with torch.device('meta'):
        model = timm.create_model(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest)  # same keys in the same order
    assert ours == manifest


def test_tiny_parameter_count():
    with torch.device('meta'):
        model = timm.create_model('flatten_swin_tiny')
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 29.19


def test_window_clamping_per_stage():
    with torch.device('meta'):
        m224 = timm.create_model('flatten_swin_tiny')
        m384 = timm.create_model('flatten_swin_base_384')
    # 224: linear stages global (56, 28); softmax stage 3 windows of 7 shifted by 3; stage 4 (7x7) unshifted.
    assert [b.window_size for layer in m224.layers for b in layer.blocks][:4] == [56, 56, 28, 28]
    assert [(b.window_size, b.shift_size) for b in m224.layers[2].blocks][:2] == [(7, 0), (7, 3)]
    assert [(b.window_size, b.shift_size) for b in m224.layers[3].blocks] == [(7, 0), (7, 0)]
    assert m224.layers[3].blocks[1].attn_mask is None
    # 384 (window 96): linear global at 96/48, softmax windows of 12 (shifted by 6 in stage 3), stage 4 is 12x12.
    sd = m384.state_dict()
    assert sd['layers.0.blocks.0.attn.positional_encoding'].shape == (1, 96 * 96, 128)
    assert sd['layers.1.blocks.1.attn.positional_encoding'].shape == (1, 48 * 48, 256)
    assert sd['layers.2.blocks.1.attn.relative_position_bias_table'].shape == (23 * 23, 16)
    assert sd['layers.2.blocks.1.attn_mask'].shape == (4, 144, 144)
    assert m384.layers[2].blocks[1].shift_size == 6
    assert 'layers.3.blocks.1.attn_mask' not in sd


def test_mixed_attn_type_splits_a_stage():
    model = FLattenSwinTransformer(img_size=32, patch_size=2, num_classes=3, embed_dim=16, depths=(1, 1, 4),
                                   num_heads=(1, 2, 4), window_size=16, attn_type='LLM2', drop_path_rate=0.)
    kinds = [type(b.attn) for b in model.layers[2].blocks]
    assert kinds == [FocusedLinearAttention, FocusedLinearAttention, WindowAttention, WindowAttention]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ModelError):
        FLattenSwinTransformer(attn_type='LLX')


def test_micro_variant_forward():
    model = timm.create_model('flatten_swin_micro').eval()
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 3e6
    kinds = [type(layer.blocks[0].attn) for layer in model.layers]
    assert kinds == [FocusedLinearAttention] * 2 + [WindowAttention] * 2
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_nano_variant_forward_and_overrides():
    model = timm.create_model('flatten_swin_nano').eval()
    assert 1e5 <= sum(p.numel() for p in model.parameters()) <= 3e5
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    other = timm.create_model('flatten_swin_nano', num_classes=7, img_size=64).eval()
    with torch.no_grad():
        assert other(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    # at 64 the 32x32 first stage gets 16x16 linear-attention windows, the 8x8 third stage shifted 4x4 softmax ones
    assert other.layers[0].blocks[0].window_size == 16
    assert other.layers[0].blocks[0].attn.positional_encoding.shape[1] == 16 * 16
    assert [(b.window_size, b.shift_size) for b in other.layers[2].blocks] == [(4, 0), (4, 2)]
    assert other.layers[2].blocks[1].attn_mask.shape == (4, 16, 16)


@pytest.mark.parametrize('name', ALL_NAMES)
def test_registered_models_have_no_stochastic_layers_by_default(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert not any(isinstance(m, timm.layers.DropPath) for m in model.modules())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_eval_is_deterministic():
    model = _randomize(timm.create_model('flatten_swin_nano'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_smaller_per_head_widths_build_and_run():
    widths = {'layers.0.blocks.0': dict(qk=4, v=6, mlp=10), 'layers.1.blocks.0': dict(qk=3, v=5, dwc_shared=False),
              'layers.2.blocks.0': dict(qk=7, v=2, mlp=20), 'layers.2.blocks.1': dict(qk=2, v=3)}
    model = rebuild_blocks(timm.create_model('flatten_swin_nano'), widths).eval()
    sd = model.state_dict()
    # stage 1: 24 channels, 2 heads; linear attention over the 16x16 map
    assert sd['layers.0.blocks.0.attn.qkv.weight'].shape == (2 * (2 * 4 + 6), 24)
    assert sd['layers.0.blocks.0.attn.proj.weight'].shape == (24, 2 * 6)
    assert sd['layers.0.blocks.0.attn.scale'].shape == (1, 1, 2 * 4)
    assert sd['layers.0.blocks.0.attn.positional_encoding'].shape == (1, 256, 2 * 4)
    assert sd['layers.0.blocks.0.attn.dwc.weight'].shape == (6, 1, 5, 5)
    assert sd['layers.0.blocks.0.mlp.fc1.weight'].shape == (10, 24)
    assert sd['layers.0.blocks.0.mlp.fc2.weight'].shape == (24, 10)
    # stage 2: 48 channels, 4 heads, un-shared DWC: one kernel per kept v channel of every head
    assert sd['layers.1.blocks.0.attn.qkv.weight'].shape == (4 * (2 * 3 + 5), 48)
    assert sd['layers.1.blocks.0.attn.dwc.weight'].shape == (4 * 5, 1, 5, 5)
    assert sd['layers.1.blocks.0.mlp.fc1.weight'].shape == (4 * 48, 48)
    # stage 3: softmax, 96 channels, 8 heads
    assert sd['layers.2.blocks.0.attn.qkv.weight'].shape == (8 * (2 * 7 + 2), 96)
    assert sd['layers.2.blocks.0.attn.proj.weight'].shape == (96, 8 * 2)
    assert sd['layers.2.blocks.1.attn.relative_position_bias_table'].shape == (7 * 7, 8)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_softmax_scale_stays_the_original_head_dim():
    attn = WindowAttention(64, window_size=(4, 4), num_heads=4, qk_dim=5, v_dim=3)
    assert attn.scale == 16 ** -0.5
    assert WindowAttention(64, window_size=(4, 4), num_heads=4, qk_scale=0.3, qk_dim=5).scale == 0.3
    model = rebuild_blocks(timm.create_model('flatten_swin_nano'), {'layers.2.blocks.0': dict(qk=3)})
    assert model.layers[2].blocks[0].attn.scale == 12 ** -0.5  # 96 channels / 8 heads

    # and it is the right scale: q/k channels removed from the weights == the same channels sliced away
    full = _randomize(WindowAttention(32, window_size=(4, 4), num_heads=2))
    keep = _qk_keep(2, 16, 5, seed=1)
    small = WindowAttention(32, window_size=(4, 4), num_heads=2, qk_dim=5).eval()
    mask = torch.zeros(32)
    mask[keep] = 1
    with torch.no_grad():
        full.qkv.weight[:64] *= torch.cat([mask, mask])[:, None]
        full.qkv.bias[:64] *= torch.cat([mask, mask])
        rows = torch.cat([keep, 32 + keep, torch.arange(64, 96)])
        small.qkv.weight.copy_(full.qkv.weight[rows])
        small.qkv.bias.copy_(full.qkv.bias[rows])
        small.proj.load_state_dict(full.proj.state_dict())
        small.relative_position_bias_table.copy_(full.relative_position_bias_table)
        x = torch.randn(3, 16, 32)
        torch.testing.assert_close(small(x), full(x), atol=1e-5, rtol=0)


def _slice_linear_attention_qk(full: FLattenSwinTransformer, keep: int) -> tuple[FLattenSwinTransformer, int]:
    """Gate ``keep`` q/k channels per head in every linear-attention block of ``full`` through ``qk_gate``, and
    return a model built with ``qk_dim=keep`` there whose weights are ``full``'s with the other channels sliced out."""
    plans = {}
    for i, layer in enumerate(full.layers):
        for j, blk in enumerate(layer.blocks):
            attn = blk.attn
            if isinstance(attn, FocusedLinearAttention):
                idx = _qk_keep(attn.num_heads, attn.head_dim, keep, seed=10 * i + j)
                mask = torch.zeros(attn.num_heads * attn.head_dim)
                mask[idx] = 1
                attn.qk_gate = _ChannelMask(mask)
                plans[f'layers.{i}.blocks.{j}.attn.'] = (idx, attn.num_heads * attn.head_dim)
    small = FLattenSwinTransformer(img_size=32, patch_size=2, num_classes=10, embed_dim=24, depths=(1, 1, 2),
                                   num_heads=(2, 4, 8), window_size=16, attn_type='LLS', drop_path_rate=0.)
    small = rebuild_modules(small, {prefix[:-1]: dict(qk=keep) for prefix in plans}).eval()
    state = {k: v for k, v in full.state_dict().items() if not k.endswith('qk_gate.mask')}
    for prefix, (idx, c) in plans.items():
        rows = torch.cat([idx, c + idx, torch.arange(2 * c, state[prefix + 'qkv.weight'].shape[0])])
        state[prefix + 'qkv.weight'] = state[prefix + 'qkv.weight'][rows]
        state[prefix + 'qkv.bias'] = state[prefix + 'qkv.bias'][rows]
        state[prefix + 'scale'] = state[prefix + 'scale'][..., idx]
        state[prefix + 'positional_encoding'] = state[prefix + 'positional_encoding'][..., idx]
    small.load_state_dict(state, strict=True)
    return small, len(plans)


def test_qk_gate_zeroing_equals_slicing_the_channels_out():
    full = _randomize(timm.create_model('flatten_swin_nano'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = full(x)
        small, n_gated = _slice_linear_attention_qk(full, keep=5)
        gated = full(x)
        sliced = small(x)
    assert n_gated == 2
    assert small.layers[0].blocks[0].attn.scale.shape == (1, 1, 2 * 5)
    assert (gated - reference).abs().max() > 1e-3  # the gate really removed something
    torch.testing.assert_close(sliced, gated, atol=1e-5, rtol=0)


def test_unshared_dwc_with_copied_kernels_equals_shared():
    shared = _randomize(timm.create_model('flatten_swin_nano'))
    unshared = timm.create_model('flatten_swin_nano')
    linear = [name for name, m in unshared.named_modules() if isinstance(m, FocusedLinearAttention)]
    unshared = rebuild_modules(unshared, {name: dict(dwc_shared=False) for name in linear}).eval()
    state = shared.state_dict()
    for key in [k for k in state if '.attn.dwc.' in k]:
        heads = shared.get_submodule(key.rsplit('.', 2)[0]).num_heads
        state[key] = state[key].repeat(heads, *([1] * (state[key].dim() - 1)))
    unshared.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unshared(x), shared(x), atol=1e-5, rtol=0)


def test_unknown_official_style_kwargs_are_accepted():
    model = FLattenSwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                                   window_size=16, attn_type='LL', num_classes=4, some_yacs_leftover=1)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
