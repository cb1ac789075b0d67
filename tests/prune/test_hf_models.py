"""Hugging Face transformers (ViT, DeiT, Swin) and torchvision (VisionTransformer, Swin) models, as users hold them:
exact gates and surgery, the MAC target, head balance, the artifact in a fresh process and ONNX."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
import transformers
from conftest import build as build_small
from torch.utils.data import DataLoader, TensorDataset

import amap
from amap.export import export_onnx
from amap.macs import count_macs
from amap.prune.adapters import find_adapters
from amap.prune.dropin import PrunedHFAttention, PrunedMultiheadAttention, PrunedShiftedWindowAttention
from amap.prune.pruner import Pruner
from amap.prune.surgery import apply_surgery
from amap.prune.target import fit_to_target
from amap.utils.outputs import logits_of

_VIT = {'image_size': 32, 'patch_size': 8, 'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
        'intermediate_size': 64, 'num_labels': 10}
_SWIN = {'patch_size': 2, 'embed_dim': 16, 'depths': [2, 2], 'num_heads': [2, 4], 'num_classes': 10}

FAMILIES = {
    'hf_vit': lambda: transformers.ViTForImageClassification(transformers.ViTConfig(**_VIT)),
    'hf_deit': lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(**_VIT)),
    'hf_swin': lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)),
    'tv_vit': lambda: torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
    'tv_swin': lambda: torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=10),
}
PRUNED = {'hf_vit': PrunedHFAttention, 'hf_deit': PrunedHFAttention, 'hf_swin': PrunedHFAttention,
          'tv_vit': PrunedMultiheadAttention, 'tv_swin': PrunedShiftedWindowAttention}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    return build_small(name, seed, FAMILIES)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_every_attention_and_mlp_is_found_and_gates_are_exact(family, images):
    model = build(family)
    with torch.no_grad():
        original = logits_of(model(images))
    pruner = Pruner(model, (3, 32, 32))
    blocks = 2 if family.endswith('vit') or family.endswith('deit') else 4
    kinds = sorted(g.kind for a in pruner.adapters for g in a.groups())
    assert kinds == sorted(['qk', 'v', 'mlp'] * blocks)
    with torch.no_grad():  # every channel kept, reweights one: the gated model is the original
        torch.testing.assert_close(logits_of(model(images)), original, atol=1e-5, rtol=0)


@pytest.mark.parametrize('target', [0.5, 0.7])
def test_surgery_exact_balanced_and_on_target(family, images, target):
    model = build(family)
    pruner = Pruner(model, (3, 32, 32))
    g = torch.Generator().manual_seed(0)
    for ind in pruner.indicators.values():
        ind.m.data.copy_(torch.rand(ind.m.shape, generator=g))
        ind.reweight.data.copy_(0.5 + torch.rand(ind.m.shape, generator=g))
    full = pruner.full_macs
    assert full == count_macs(model, (3, 32, 32)).total
    fit_to_target(pruner, target * full)
    with torch.no_grad():
        masked = logits_of(model(images))
    predicted = pruner.hard_macs()
    apply_surgery(pruner)
    with torch.no_grad():
        cut = logits_of(model(images))
    torch.testing.assert_close(cut, masked, atol=1e-5, rtol=0)
    counted = count_macs(model, (3, 32, 32)).total
    assert counted == pytest.approx(predicted, abs=0.5)
    assert (target - 0.01) * full <= counted <= target * full
    for key, ind in pruner.indicators.items():
        counts = ind.hard_mask().sum(-1)
        assert bool((counts == counts[0]).all()), key
    attention = [m for m in model.modules() if isinstance(m, PRUNED[family])]
    assert len(attention) == (2 if family.endswith(('vit', 'deit')) else 4)
    assert any(m.qk_dim < 16 or m.v_dim < 16 for m in attention)
    assert type(model) is type(build(family))  # the library's own class, attention replaced in place


_RELOAD = '''
import sys, torch, amap
from amap.utils.outputs import logits_of
folder = sys.argv[1]
model = amap.load_pruned(folder)
x, y = torch.load(folder + '.x.pt'), torch.load(folder + '.y.pt')
with torch.no_grad():
    print(float((logits_of(model(x)) - y).abs().max()))
'''


def test_prune_save_reload_in_a_new_process_and_onnx(family, tmp_path, images):
    model = build(family)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)),
                         torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3)))
    result = amap.prune(model, DataLoader(data, batch_size=8), 0.6, search_steps=2, calib_batches=1)
    assert 0.59 <= result.ratio <= 0.6
    for rec in result.structure:  # every head of a layer keeps the same channel count
        for kind, idx in rec['indices'].items():
            assert len({len(h) for h in idx}) == 1, (rec['module'], kind)
    folder = tmp_path / 'pruned'
    amap.save_pruned(result, folder)
    with torch.no_grad():
        expected = logits_of(result.model.eval()(images))
    torch.save(images, f'{folder}.x.pt')
    torch.save(expected, f'{folder}.y.pt')
    out = subprocess.run([sys.executable, '-c', _RELOAD, str(folder)], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) <= 1e-6
    _, diff = export_onnx(folder, tmp_path / 'model.onnx')
    assert diff is not None and diff < 1e-4


def test_non_default_timm_model_round_trips(tmp_path, images):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=4, num_classes=10, depth=2).eval()
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    result = amap.prune(model, DataLoader(data, batch_size=8), 0.5, search_steps=1, calib_batches=1,
                        base={'architecture': 'deit_tiny_patch16_224', 'model_kwargs': {'depth': 2}})
    assert result.base['model_kwargs'] == {'depth': 2, 'num_classes': 10, 'img_size': 32, 'patch_size': 4,
                                           'in_chans': 3}
    amap.save_pruned(result, tmp_path / 'p')
    with torch.no_grad():
        torch.testing.assert_close(amap.load_pruned(tmp_path / 'p')(images), result.model.eval()(images),
                                   atol=1e-6, rtol=0)


def test_an_undescribable_model_is_refused_at_save_not_written_broken(tmp_path, caplog):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=4, num_classes=10, depth=2).eval()
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    with caplog.at_level('WARNING'):  # depth is not readable off a timm model: said before the search
        result = amap.prune(model, DataLoader(data, batch_size=8), 0.5, search_steps=1, calib_batches=1)
    assert 'will not be saveable' in caplog.text and 'blocks.10.attn' in caplog.text  # the blocks it lacks
    with pytest.raises(amap.AmapError, match='pass architecture= and model_kwargs='):
        amap.save_pruned(result, tmp_path / 'p')
    assert not (tmp_path / 'p').exists()


def test_drop_in_modules_are_called_like_the_ones_they_replace(images):
    model = build('tv_vit')
    names = [a.name for a in find_adapters(model) if isinstance(a.module, torch.nn.MultiheadAttention)]
    assert names == ['encoder.layers.encoder_layer_0.self_attention', 'encoder.layers.encoder_layer_1.self_attention']
    mha = model.get_submodule(names[0])
    x = torch.randn(2, 17, 32)
    new = PrunedMultiheadAttention(32, 2, 16, 16, scale=16 ** -0.5).eval()
    new.load_state_dict(mha.state_dict())  # same parameter names and shapes at full width
    with torch.no_grad():
        torch.testing.assert_close(new(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0],
                                   atol=1e-5, rtol=0)
