"""The pruned-model artifact: JSON + safetensors round trip in a fresh process, ONNX parity, clear errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import build

from amap.errors import CheckpointError
from amap.prune import load_pruned, save_pruned
from amap.prune.pruner import Pruner
from amap.prune.surgery import apply_surgery, describe_structure
from amap.prune.target import fit_to_target

ARCH = {  # the timm name + kwargs that BUILDERS use, for the artifact's base description
    'flatten_deit': ('flatten_deit_nano', {'num_classes': 10}),
    'flatten_swin': ('flatten_swin_nano', {'num_classes': 10}),
    'timm_deit': ('vit_tiny_patch16_224', {'img_size': 32, 'patch_size': 4, 'depth': 2, 'num_classes': 10}),
}


def _pruned(name: str, seed: int = 0):
    model = build(name)
    pruner = Pruner(model, (3, 32, 32))
    g = torch.Generator().manual_seed(seed)
    for ind in pruner.indicators.values():
        ind.m.data.copy_(torch.rand(ind.m.shape, generator=g))
        ind.reweight.data.copy_(0.5 + torch.rand(ind.m.shape, generator=g))
    fit_to_target(pruner, 0.6 * pruner.full_macs)
    structure = describe_structure(pruner)
    apply_surgery(pruner)
    return model.eval(), structure


@pytest.mark.parametrize('name', sorted(ARCH))
def test_round_trip_in_a_new_process(tmp_path, name):
    model, structure = _pruned(name)
    arch, kwargs = ARCH[name]
    save_pruned(model, tmp_path / 'art', architecture=arch, model_kwargs=kwargs, structure=structure)
    assert sorted(p.name for p in (tmp_path / 'art').iterdir()) == ['config.json', 'model.safetensors']
    config = json.loads((tmp_path / 'art' / 'config.json').read_text())
    assert config['architecture'] == arch and config['structure'] == json.loads(json.dumps(structure))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.save(x, tmp_path / 'x.pt')
    script = (
        'import sys, torch, amap\n'
        'm = amap.load_pruned(sys.argv[1])\n'
        'x = torch.load(sys.argv[2], weights_only=True)\n'
        'torch.save(m(x).detach(), sys.argv[3])\n')
    subprocess.run([sys.executable, '-c', script, str(tmp_path / 'art'), str(tmp_path / 'x.pt'),
                    str(tmp_path / 'y.pt')], check=True, timeout=300)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.load(tmp_path / 'y.pt', weights_only=True), expected, atol=1e-6, rtol=0)


def test_onnx_export_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    model, _ = _pruned('flatten_deit')
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = tmp_path / 'model.onnx'
    torch.onnx.export(model, (x,), str(path), input_names=['images'], output_names=['logits'],
                      dynamic_axes={'images': {0: 'batch'}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (x, x[:1]):
        (out,) = session.run(None, {'images': batch.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(batch), atol=1e-4, rtol=0)


def test_disagreeing_artifact_is_refused(tmp_path):
    model, structure = _pruned('flatten_deit')
    arch, kwargs = ARCH['flatten_deit']
    save_pruned(model, tmp_path / 'art', architecture=arch, model_kwargs=kwargs, structure=structure)
    config = json.loads((tmp_path / 'art' / 'config.json').read_text())
    config['structure'][0]['widths']['qk'] += 1  # config.json no longer matches the weights
    (tmp_path / 'art' / 'config.json').write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match='disagree'):
        load_pruned(tmp_path / 'art')
    with pytest.raises(CheckpointError, match='not found'):
        load_pruned(tmp_path / 'missing')


def test_save_replaces_atomically(tmp_path):
    model, structure = _pruned('flatten_deit')
    arch, kwargs = ARCH['flatten_deit']
    save_pruned(model, tmp_path / 'art', architecture=arch, model_kwargs=kwargs, structure=structure)
    save_pruned(model, tmp_path / 'art', architecture=arch, model_kwargs=kwargs, structure=structure)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['art']  # no temp or backup folder left behind


def test_save_pruned_straight_from_a_prune_result(tmp_path):
    import timm

    import amap

    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 7, (8,), generator=g))]
    result = amap.prune(timm.create_model('flatten_deit_nano', num_classes=7), loader, 0.6, criterion='magnitude',
                        calib_batches=1)
    amap.save_pruned(result, tmp_path / 'art')
    config = json.loads((tmp_path / 'art' / 'config.json').read_text())
    assert config['model_kwargs'] == {'num_classes': 7}
    assert config['extra']['ratio'] == pytest.approx(result.ratio)
    x = loader[0][0]
    with torch.no_grad():
        torch.testing.assert_close(amap.load_pruned(tmp_path / 'art')(x), result.model.eval()(x), atol=1e-6, rtol=0)
