"""FLatten-DeiT (ours): size against the paper, timm ViT key names, class token out of the DWC, width/hook contract."""
from __future__ import annotations

import pytest
import timm
import torch
from rebuild_helpers import rebuild_blocks
from torch import nn

import amap  # noqa: F401  (registers the zoo)
from amap.errors import ModelError
from amap.models.flatten_deit import DeiTFocusedLinearAttention, FLattenDeiT

ALL_NAMES = ['flatten_deit_tiny', 'flatten_deit_small', 'flatten_deit_base', 'flatten_deit_micro', 'flatten_deit_nano']
FLATTEN_EXTRA = ('attn.scale', 'attn.positional_encoding', 'attn.dwc.weight', 'attn.dwc.bias')


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights of a useful scale, including the zero-initialised scale and positional_encoding."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('norm1.weight') or name.endswith('norm2.weight') or name == 'norm.weight':
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


class _ChannelMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_tiny_size_is_the_papers():
    with torch.device('meta'):
        model = timm.create_model('flatten_deit_tiny')
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 6.1e6 - 1) < 0.03, params


@pytest.mark.parametrize('name,timm_name', [('flatten_deit_tiny', 'deit_tiny_patch16_224'),
                                            ('flatten_deit_base', 'deit_base_patch16_224')])
def test_keys_are_timm_vit_keys_plus_flatten_parameters(name, timm_name):
    with torch.device('meta'):
        ours = {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
        theirs = {k: v.shape for k, v in timm.create_model(timm_name).state_dict().items()}
    extra = {k for k in ours if k.endswith(FLATTEN_EXTRA)}
    assert len(extra) == 12 * len(FLATTEN_EXTRA)
    assert {k: v for k, v in ours.items() if k not in extra} == theirs  # a timm DeiT checkpoint fills the rest
    dim, heads = ours['cls_token'][-1], (3 if name.endswith('tiny') else 12)
    assert ours['blocks.0.attn.positional_encoding'] == (1, 197, dim)  # all tokens, class token included
    assert ours['blocks.0.attn.scale'] == (1, 1, dim)
    assert ours['blocks.0.attn.dwc.weight'] == (dim // heads, 1, 5, 5)  # shared by the heads


def test_class_token_is_kept_out_of_the_dwc():
    attn = _randomize(DeiTFocusedLinearAttention(32, num_heads=2, grid_size=(4, 4)))
    seen = []
    attn.dwc.register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, out.shape)))
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        before = attn(x)
        assert seen[0] == ((2, 2, 16, 16), (2, 16, 32))  # only the 16 patch tokens go through the DWC
        attn.dwc.weight.add_(torch.randn_like(attn.dwc.weight))
        attn.dwc.bias.add_(1.0)
        after = attn(x)
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=1e-6, rtol=0)  # class token: no DWC term
    assert (after[:, 1:] - before[:, 1:]).abs().min() > 0  # every patch token has one


@pytest.mark.parametrize('name,params', [('flatten_deit_micro', (1e6, 3e6)), ('flatten_deit_nano', (1e5, 3e5))])
def test_small_variants_forward(name, params):
    model = timm.create_model(name).eval()
    assert params[0] <= sum(p.numel() for p in model.parameters()) <= params[1]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_num_classes_and_img_size_overrides():
    model = timm.create_model('flatten_deit_nano', num_classes=7, img_size=48).eval()
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 64)
    assert model.blocks[0].attn.positional_encoding.shape == (1, 1 + 12 * 12, 64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)


def test_avg_pool_without_class_token():
    model = timm.create_model('flatten_deit_nano', class_token=False, global_pool='avg').eval()
    assert model.cls_token is None
    assert model.blocks[0].attn.positional_encoding.shape == (1, 64, 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ModelError):
        timm.create_model('flatten_deit_nano', class_token=False, global_pool='token')


@pytest.mark.parametrize('name', ALL_NAMES)
def test_registered_models_have_no_stochastic_layers_by_default(name):
    with torch.device('meta'):
        model = timm.create_model(name)
    assert not any(isinstance(m, timm.layers.DropPath) for m in model.modules())
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))


def test_eval_is_deterministic():
    model = _randomize(timm.create_model('flatten_deit_nano'))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_smaller_per_head_widths_build_and_run():
    widths = [dict(qk=4, v=6, mlp=10), dict(qk=3, v=5, dwc_shared=False), {}, dict(v=1)]
    model = rebuild_blocks(timm.create_model('flatten_deit_nano'), {f'blocks.{i}': w for i, w in enumerate(widths)})
    model.eval()
    sd = model.state_dict()
    assert sd['blocks.0.attn.qkv.weight'].shape == (2 * (2 * 4 + 6), 64)
    assert sd['blocks.0.attn.proj.weight'].shape == (64, 2 * 6)
    assert sd['blocks.0.attn.scale'].shape == (1, 1, 2 * 4)
    assert sd['blocks.0.attn.positional_encoding'].shape == (1, 65, 2 * 4)
    assert sd['blocks.0.attn.dwc.weight'].shape == (6, 1, 5, 5)
    assert sd['blocks.0.mlp.fc1.weight'].shape == (10, 64)
    assert sd['blocks.0.mlp.fc2.weight'].shape == (64, 10)
    assert sd['blocks.1.attn.dwc.weight'].shape == (2 * 5, 1, 5, 5)
    assert sd['blocks.2.attn.qkv.weight'].shape == (3 * 64, 64)
    assert sd['blocks.3.attn.qkv.weight'].shape == (2 * (2 * 32 + 1), 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_qk_gate_zeroing_equals_slicing_the_channels_out():
    full = _randomize(timm.create_model('flatten_deit_nano'))
    x = torch.randn(2, 3, 32, 32)
    keep, heads, head_dim = 9, 2, 32
    with torch.no_grad():
        reference = full(x)
        state = dict(full.state_dict())
        g = torch.Generator().manual_seed(3)
        for i, blk in enumerate(full.blocks):
            idx = torch.cat([h * head_dim + torch.randperm(head_dim, generator=g)[:keep].sort().values
                             for h in range(heads)])
            mask = torch.zeros(heads * head_dim)
            mask[idx] = 1
            blk.attn.qk_gate = _ChannelMask(mask)
            p, c = f'blocks.{i}.attn.', heads * head_dim
            rows = torch.cat([idx, c + idx, torch.arange(2 * c, 3 * c)])
            state[p + 'qkv.weight'] = state[p + 'qkv.weight'][rows]
            state[p + 'qkv.bias'] = state[p + 'qkv.bias'][rows]
            state[p + 'scale'] = state[p + 'scale'][..., idx]
            state[p + 'positional_encoding'] = state[p + 'positional_encoding'][..., idx]
        small = rebuild_blocks(timm.create_model('flatten_deit_nano'), {f'blocks.{i}': dict(qk=keep) for i in range(4)})
        small.eval()
        small.load_state_dict(state, strict=True)
        gated = full(x)
        sliced = small(x)
    assert (gated - reference).abs().max() > 1e-3  # the gate really removed something
    torch.testing.assert_close(sliced, gated, atol=1e-5, rtol=0)


def test_unshared_dwc_with_copied_kernels_equals_shared():
    shared = _randomize(timm.create_model('flatten_deit_nano'))
    unshared = rebuild_blocks(timm.create_model('flatten_deit_nano'),
                              {f'blocks.{i}': dict(dwc_shared=False) for i in range(4)}).eval()
    state = shared.state_dict()
    for key in [k for k in state if '.attn.dwc.' in k]:
        state[key] = state[key].repeat(2, *([1] * (state[key].dim() - 1)))
    unshared.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unshared(x), shared(x), atol=1e-5, rtol=0)


def test_tiny_forward_at_224():
    model = FLattenDeiT(embed_dim=192, depth=12, num_heads=3, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 5)
