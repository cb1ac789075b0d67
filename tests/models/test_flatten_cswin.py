"""FLatten-CSWin: conformance with the official model (keys, shapes, numerics) and the per-head width design."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from rebuild_helpers import rebuild_blocks
from safetensors import safe_open
from torch import nn

import amap.models  # noqa: F401  (registers the models)
from amap.errors import ModelError
from amap.models.flatten_cswin import CSWinTransformer, FocusedLinearAttention, LePEAttention

RELEASED = ['FLatten_CSWin_64_24181_tiny_224', 'FLatten_CSWin_64_24322_small_224', 'FLatten_CSWin_96_36292_base_224']
ALIASES = dict(zip(['flatten_cswin_tiny', 'flatten_cswin_small', 'flatten_cswin_base'], RELEASED))

# a small model whose stages 1-2 use two branches of narrow softmax stripes (never released; official layout rules)
STRIPES = dict(img_size=64, embed_dim=16, depth=[1, 1, 2, 1], num_heads=[2, 2, 4, 8], la_split_size='16-8-4-2',
               split_size=[1, 2, 2, 2], attn_type='SSSS', num_classes=7)
# a small model like the released ones: global linear attention in stages 1-2, softmax stripes in stage 3
SMALL_LLSS = dict(STRIPES, attn_type='LLSS')


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised focusing scale and positional encoding, the biases and qkv values that matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('.scale') or name.endswith('positional_encoding'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith('qkv.weight'):  # peaked attention, so that q/k channels matter
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif name.endswith('bias'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """These models are tiny: one intra-op thread avoids oversubscribing the cores (pytest -n 2 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def manifest(flatten_reference):
    return json.loads((flatten_reference / 'official_state_dict_shapes.json').read_text())


def test_reference_case_matches_official_output(flatten_reference):
    path = flatten_reference / 'cases' / 'cswin_llss.safetensors'
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
        state = {k[len('model.'):]: f.get_tensor(k) for k in f.keys() if k.startswith('model.')}
        x, expected = f.get_tensor('input'), f.get_tensor('output')
    assert meta['official_class'] == 'CSWinTransformer'
    model = CSWinTransformer(**json.loads(meta['kwargs'])).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', RELEASED)
def test_released_state_dict_matches_manifest(name, manifest):
    with torch.device('meta'):
        model = timm.create_model(name)
    shapes = _shapes(model)
    assert list(shapes) == list(manifest[name])  # same keys, in the official order
    assert shapes == manifest[name]


def test_aliases_and_param_count():
    with torch.device('meta'):
        tiny = timm.create_model('FLatten_CSWin_64_24181_tiny_224')
        for alias, name in ALIASES.items():
            assert _shapes(timm.create_model(alias)) == _shapes(timm.create_model(name))
    n_params = sum(p.numel() for p in tiny.parameters())
    assert abs(n_params / 21.20e6 - 1) < 0.005, n_params


def test_base_384_config():
    for name in ['FLatten_CSWin_96_36292_base_384', 'flatten_cswin_base_384']:
        with torch.device('meta'):
            model = timm.create_model(name)
        assert model.pretrained_cfg['input_size'] == (3, 384, 384)
        # cfgs/flatten_cswin_b_384.yaml: linear attention over the whole 96x96 and 48x48 maps
        assert model.stage1[0].attns[0].positional_encoding.shape == (1, 96 * 96, 96)
        assert model.stage2[0].attns[0].positional_encoding.shape == (1, 48 * 48, 192)
        # softmax stripes of 12 on the 24x24 map of stage 3 (two branches), one branch in stage 4
        attns = model.stage3[0].attns
        assert [(a.H_sp, a.W_sp) for a in attns] == [(24, 12), (12, 24)]
        assert [(a.H_sp, a.W_sp) for a in model.stage4[0].attns] == [(12, 12)]


def test_branch_and_attention_choice_follow_official_rules():
    model = CSWinTransformer(**dict(SMALL_LLSS, depth=[1, 3, 2, 1], attn_type='LMSS2', split_size=[4, 8, 2, 2]))
    # stage 1 'L' with la split 16 == resolution 16: one global branch of linear attention
    assert [type(a) for a in model.stage1[0].attns] == [FocusedLinearAttention]
    # stage 2 'M' with 2 linear blocks: blocks 0-1 linear, block 2 softmax; softmax split 8 == resolution -> 1 branch
    assert [type(b.attns[0]) for b in model.stage2] == [FocusedLinearAttention] * 2 + [LePEAttention]
    assert len(model.stage2[2].attns) == 1
    # stage 3 'S' with split 2 on a 4x4 map: two half-width branches of vertical / horizontal stripes
    attns = model.stage3[0].attns
    assert [(a.H_sp, a.W_sp, a.num_heads, a.dim) for a in attns] == [(4, 2, 2, 32), (2, 4, 2, 32)]
    # the last stage always has one branch over the whole map
    assert [(a.H_sp, a.W_sp) for a in model.stage4[0].attns] == [(2, 2)]


def _naive_stripe_attention(attn: LePEAttention, q, k, v):
    """Per-stripe softmax attention + LePE written out with explicit loops over the stripes."""
    B, L, _ = q.shape
    res, hs, ws, heads = attn.resolution, attn.H_sp, attn.W_sp, attn.num_heads
    maps = [t.reshape(B, res, res, -1) for t in (q, k, v)]
    out = torch.zeros(B, res, res, heads * attn.v_dim)
    for r0 in range(0, res, hs):
        for c0 in range(0, res, ws):
            qs, ks, vs = (m[:, r0:r0 + hs, c0:c0 + ws].reshape(B, hs * ws, heads, -1).transpose(1, 2) for m in maps)
            a = torch.softmax(qs @ ks.transpose(-2, -1) * attn.scale, dim=-1)
            x = (a @ vs).transpose(1, 2).reshape(B, hs, ws, -1)
            v_img = maps[2][:, r0:r0 + hs, c0:c0 + ws].permute(0, 3, 1, 2)
            lepe = F.conv2d(v_img, attn.get_v.weight, attn.get_v.bias, padding=1, groups=v_img.shape[1])
            out[:, r0:r0 + hs, c0:c0 + ws] = x + lepe.permute(0, 2, 3, 1)
    return out.reshape(B, L, -1)


@pytest.mark.parametrize('idx', [0, 1])
def test_stripe_attention_matches_naive_loop(idx):
    torch.manual_seed(idx)
    attn = _perturb(LePEAttention(16, resolution=8, idx=idx, split_size=2, num_heads=2)).eval()
    q, k, v = (torch.randn(2, 64, 16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v), _naive_stripe_attention(attn, q, k, v), atol=1e-5, rtol=1e-5)


def test_non_released_narrow_stripes_build_and_run_deterministically():
    torch.manual_seed(0)
    model = _perturb(CSWinTransformer(**STRIPES)).eval()
    assert [len(b.attns) for b in model.stage1] == [2] and model.stage1[0].attns[0].W_sp == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out1, out2 = model(x), model(x)
    assert out1.shape == (2, 7) and torch.isfinite(out1).all()
    assert torch.equal(out1, out2)
    # the same seed builds the same model
    torch.manual_seed(0)
    again = _perturb(CSWinTransformer(**STRIPES)).eval()
    with torch.no_grad():
        assert torch.equal(again(x), out1)


def test_pruned_widths_build_and_run():
    widths = {'stage1.0': {'qk': 3, 'v': 5, 'mlp': 20, 'dwc_shared': False}, 'stage2.0': {'qk': 2},
              'stage3.0': {'v': 4, 'mlp': 33}, 'stage3.1': {'qk': 6, 'v': 7}}
    model = _perturb(rebuild_blocks(CSWinTransformer(**SMALL_LLSS), widths, attn='')).eval()
    b1, b3 = model.stage1[0], model.stage3[0]
    # stage 1: 2 heads of qk 3 / v 5, un-shared depthwise conv (one kernel per kept v channel of every head)
    assert b1.qkv.weight.shape == (2 * (2 * 3 + 5), 16) and b1.proj.weight.shape == (16, 2 * 5)
    assert b1.attns[0].scale.shape == (1, 1, 6) and b1.attns[0].positional_encoding.shape == (1, 256, 6)
    assert b1.attns[0].get_v.weight.shape == (10, 1, 3, 3) and b1.attns[0].dwc.weight.shape == (10, 1, 5, 5)
    assert b1.mlp.fc1.weight.shape == (20, 16)
    # stage 3: two branches of 2 heads, q/k keep the original head width 16, v 4 per head
    assert b3.qkv.weight.shape == (4 * (2 * 16 + 4), 64) and b3.proj.weight.shape == (64, 16)
    assert [a.get_v.weight.shape[0] for a in b3.attns] == [8, 8]
    assert model.stage3[1].attns[0].scale == 16 ** -0.5  # original head width, though qk_dim is 6
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert b1.attns[0].scale.grad is not None and torch.isfinite(b1.attns[0].scale.grad).all()


class _ChannelMask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer('mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def test_zeroed_qk_channels_equal_sliced_model():
    """Gating q/k channels to zero (linear attention: qk_gate; softmax: the qkv rows) equals slicing them out."""
    torch.manual_seed(0)
    full = _perturb(CSWinTransformer(**SMALL_LLSS)).eval()
    # stage1.0: linear attention, 2 heads of 8, drop channel 5 of every head; stage3.0: softmax, 4 heads of 16
    # in two branches, drop channel 3 of every head
    drops = {'stage1.0': (2, 8, 5), 'stage3.0': (4, 16, 3)}
    sliced = rebuild_blocks(CSWinTransformer(**SMALL_LLSS), {'stage1.0': {'qk': 7}, 'stage3.0': {'qk': 15}}, attn='')
    sliced.eval()

    state = full.state_dict()
    for block, (heads, hd, ch) in drops.items():
        keep = torch.tensor([h * hd + j for h in range(heads) for j in range(hd) if j != ch])
        qk = heads * hd
        rows = torch.cat([keep, keep + qk, torch.arange(2 * qk, 3 * qk)])
        for p in ('weight', 'bias'):
            state[f'{block}.qkv.{p}'] = state[f'{block}.qkv.{p}'][rows]
    for p in ('scale', 'positional_encoding'):
        key = f'stage1.0.attns.0.{p}'
        state[key] = state[key][..., torch.tensor([h * 8 + j for h in range(2) for j in range(8) if j != 5])]
    sliced.load_state_dict(state, strict=True)

    # float64: the check is that gating equals slicing exactly; in float32 the summation order alone differs by up to
    # 3e-5 on AVX-512 kernels, through four stages of focusing functions
    full, sliced = full.double(), sliced.double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():  # compare final features (O(1)), more sensitive than the small logits
        before = full.forward_features(x)
    mask = torch.ones(16, dtype=torch.float64)
    mask[[5, 13]] = 0
    full.stage1[0].attns[0].qk_gate = _ChannelMask(mask)
    with torch.no_grad():
        qkv = full.stage3[0].qkv
        dropped = [h * 16 + 3 for h in range(4)]
        for offset in (0, 64):
            qkv.weight[[d + offset for d in dropped]] = 0
            qkv.bias[[d + offset for d in dropped]] = 0
    with torch.no_grad():
        gated, cut = full.forward_features(x), sliced.forward_features(x)
    torch.testing.assert_close(gated, cut, atol=1e-9, rtol=1e-9)
    assert (gated - before).abs().max() > 1e-2  # the dropped channels did matter


def test_unshared_dwc_with_copied_kernels_equals_shared():
    torch.manual_seed(1)
    shared = _perturb(CSWinTransformer(**SMALL_LLSS)).eval()
    widths = {'stage1.0': {'dwc_shared': False}, 'stage2.0': {'dwc_shared': False}}
    unshared = rebuild_blocks(CSWinTransformer(**SMALL_LLSS), widths, attn='').eval()
    state = shared.state_dict()
    for block, heads in (('stage1.0', 2), ('stage2.0', 2)):
        for p in ('weight', 'bias'):
            key = f'{block}.attns.0.dwc.{p}'
            state[key] = state[key].repeat(heads, *[1] * (state[key].dim() - 1))
    unshared.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = shared.forward_features(x)
        torch.testing.assert_close(unshared.forward_features(x), ref, atol=1e-5, rtol=1e-5)
        unshared.stage1[0].attns[0].dwc.weight[:5].mul_(2)  # some kernels of head 0 only: must differ now
        assert (unshared.forward_features(x) - ref).abs().max() > 1e-3


def test_gradient_checkpointing_gives_same_output_and_grads():
    torch.manual_seed(0)
    model = _perturb(CSWinTransformer(**SMALL_LLSS)).train()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    ref.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize('kwargs, message', [
    ({}, 'la_split_size'),  # the official defaults: linear attention on stripes of width 1
    (dict(SMALL_LLSS, la_split_size='8-8-4-2'), 'la_split_size entry to 16'),
    (dict(STRIPES, split_size=[3, 2, 2, 2]), 'divides 16'),
    (dict(STRIPES, img_size=100), 'img_size 100'),
    (dict(STRIPES, attn_type='LLXS'), 'attn_type'),
])
def test_bad_arguments_raise_model_error(kwargs, message):
    with pytest.raises(ModelError, match=message):
        CSWinTransformer(**kwargs)


def test_wrong_input_size_raises_model_error():
    model = CSWinTransformer(**STRIPES)
    with pytest.raises(ModelError, match='img_size 64'):
        model(torch.randn(1, 3, 96, 96))
