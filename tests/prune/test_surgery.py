"""Surgery is exact, head-balanced and its MACs are those the pruner predicted, for every attention type."""
from __future__ import annotations

import pytest
import torch
from conftest import build

from amap.macs import count_macs
from amap.prune.pruner import Pruner
from amap.prune.surgery import apply_surgery
from amap.prune.target import fit_to_target


def _randomise(pruner: Pruner, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for ind in pruner.indicators.values():
        ind.m.data.copy_(torch.rand(ind.m.shape, generator=g))
        ind.reweight.data.copy_(0.5 + torch.rand(ind.m.shape, generator=g))


@pytest.mark.parametrize('target', [0.5, 0.7])
def test_surgery_exact_balanced_and_on_target(model_name, images, target):
    model = build(model_name)
    pruner = Pruner(model, (3, 32, 32))
    _randomise(pruner)
    full = pruner.full_macs
    assert full == count_macs(model, (3, 32, 32)).total
    fit_to_target(pruner, target * full)
    with torch.no_grad():
        masked = model(images)
    predicted = pruner.hard_macs()
    apply_surgery(pruner)
    with torch.no_grad():
        pruned = model(images)
    torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)
    counted = count_macs(model, (3, 32, 32)).total
    assert counted == pytest.approx(predicted, abs=0.5)
    assert counted <= target * full
    assert counted >= (target - 0.01) * full
    # head balance: every pruned module reshapes to (heads, width) with one width per kind
    for key, ind in pruner.indicators.items():
        counts = ind.hard_mask().sum(-1)
        assert bool((counts == counts[0]).all()), key
    # the model really is smaller: gates are gone and no parameter is pruned away only by a mask
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build(model_name).parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_fused_and_plain_attention_agree(images):
    from amap.prune.modules import PrunedAttention, PrunedWindowAttention

    torch.manual_seed(0)
    x = torch.randn(2, 17, 24)
    a = PrunedAttention(24, 3, qk_dim=5, v_dim=7, scale=8 ** -0.5, qkv_bias=True).eval()
    b = PrunedAttention(24, 3, qk_dim=5, v_dim=7, scale=8 ** -0.5, qkv_bias=True, fused_attn=False).eval()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), atol=1e-6, rtol=0)
    w1 = PrunedWindowAttention(24, 3, 5, 7, 8 ** -0.5, window_size=(4, 4)).eval()
    w2 = PrunedWindowAttention(24, 3, 5, 7, 8 ** -0.5, window_size=(4, 4), fused_attn=False).eval()
    with torch.no_grad():
        w1.relative_position_bias_table.normal_()
    w2.load_state_dict(w1.state_dict())
    xw = torch.randn(8, 16, 24)
    mask = torch.zeros(4, 16, 16)
    mask[1:, :8, 8:] = -100.0
    torch.testing.assert_close(w1(xw, mask), w2(xw, mask), atol=1e-5, rtol=0)


def test_pruned_softmax_keeps_original_scale(images):
    model = build('timm_deit')
    pruner = Pruner(model, (3, 32, 32))
    _randomise(pruner)
    fit_to_target(pruner, 0.5 * pruner.full_macs)
    apply_surgery(pruner)
    attn = model.blocks[0].attn
    assert attn.qk_dim < 64
    assert attn.scale == pytest.approx(64 ** -0.5)


def test_unshared_dwc_when_heads_keep_different_v_channels(images):
    from amap.models.attention import HeadDWC

    model = build('flatten_deit')
    pruner = Pruner(model, (3, 32, 32))
    _randomise(pruner, seed=3)
    fit_to_target(pruner, 0.6 * pruner.full_macs)
    with torch.no_grad():
        masked = model(images)
    apply_surgery(pruner)
    dwcs = [m for m in model.modules() if isinstance(m, HeadDWC)]
    assert any(not d.shared for d in dwcs)  # random scores: heads keep different v channels
    with torch.no_grad():
        torch.testing.assert_close(model(images), masked, atol=1e-5, rtol=0)


@pytest.mark.parametrize('multiple', [8, 16])
def test_channel_multiple_rounds_every_pruned_width(model_name, images, multiple):
    """With channel_multiple N every pruned width (heads x per-head count, MLP hidden) is a multiple of N or the
    full width; the target still holds and the cut is still exact and head-balanced."""
    from amap.prune.target import channel_step, min_macs

    model = build(model_name)
    pruner = Pruner(model, (3, 32, 32))
    _randomise(pruner)
    full = pruner.full_macs
    # the test models are tiny (widths of 16-64): coarse steps raise the smallest reachable structure
    target = max(0.6, min_macs(pruner, multiple) / full + 0.05)
    assert target < 0.9
    counts = fit_to_target(pruner, target * full, multiple=multiple)
    widths = {}
    for key, ind in pruner.indicators.items():
        c = counts[key]
        assert bool((c == c[0]).all()), key
        width = int(c.sum())
        assert width % multiple == 0 or int(c[0]) == ind.group.dim, (key, width)
        assert int(c[0]) % channel_step(ind.group.num_heads, multiple) == 0 or int(c[0]) == ind.group.dim
        widths[key] = width
    with torch.no_grad():
        masked = model(images)
    predicted = pruner.hard_macs()
    apply_surgery(pruner)
    with torch.no_grad():
        torch.testing.assert_close(model(images), masked, atol=1e-5, rtol=0)
    counted = count_macs(model, (3, 32, 32)).total
    assert counted == pytest.approx(predicted, abs=0.5) and counted <= target * full
    # coarser steps cost some precision, not much: the structure is filled back up close to the target
    assert counted >= (target - 0.15) * full
    assert any(widths[k] < ind.group.size for k, ind in pruner.indicators.items())


def test_channel_multiple_target_below_the_aligned_minimum_is_named():
    from amap.errors import ConfigError
    from amap.prune.target import min_macs

    pruner = Pruner(build('timm_deit'), (3, 32, 32))
    low1, low16 = min_macs(pruner), min_macs(pruner, 16)
    assert low16 > low1
    with pytest.raises(ConfigError, match='below the smallest structure'):
        fit_to_target(pruner, (low1 + low16) / 2, multiple=16)
    fit_to_target(pruner, (low1 + low16) / 2, multiple=1)  # reachable without the alignment
