"""Shapes come from the checkpoint, not from defaults: a 224-px / 1000-class checkpoint on 32-px digits, explicit
options that contradict it, a head kept or replaced on purpose, and the pretrained formats of Hugging Face and
torchvision on the command line."""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
import transformers

import amap
from amap.checkpoint import checkpoint_shapes
from amap.cli import main
from amap.prune.dropin import PrunedHFAttention
from amap.train.factory import build_model, create_model, describe_model
from amap.train.from_checkpoint import create_for_checkpoint

QUICK = ['--data', 'digits', '--target', '0.7', '--search-steps', '2', '--finetune-epochs', '0', '--no-latency',
         '--train-subset', '20', '--val-subset', '20', '--batch-size', '8', '--workers', '0', '--no-progress', '-q']
VIT = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', '{"depth": 1}']


@pytest.fixture(scope='module')
def imagenet_ckpt(tmp_path_factory):
    """A 224-px, 1000-class timm checkpoint (one block, random weights)."""
    path = tmp_path_factory.mktemp('ckpt') / 'vit224.pth'
    torch.manual_seed(0)
    torch.save(timm.create_model('vit_tiny_patch16_224', depth=1, num_classes=1000).state_dict(), path)
    return path


def _error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith('amap: error: ')]
    assert len(err) == 1
    return err[0]


def test_checkpoint_shapes_of_every_family():
    with torch.device('meta'):
        tv = torchvision.models.vit_b_16()
        deit = timm.create_model('deit_tiny_distilled_patch16_224', img_size=64, patch_size=8, num_classes=7)
    assert (checkpoint_shapes(tv.state_dict()).img_size, checkpoint_shapes(tv.state_dict()).num_classes) == (224, 1000)
    s = checkpoint_shapes(deit.state_dict())
    assert (s.img_size, s.patch_size, s.num_classes, s.tokens) == (64, 8, 7, 66)
    hf = transformers.DeiTForImageClassification(transformers.DeiTConfig(
        image_size=48, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        num_labels=5))
    s = checkpoint_shapes(hf.state_dict())
    assert (s.img_size, s.patch_size, s.num_classes) == (48, 16, 5)


def test_a_224px_1000_class_checkpoint_is_built_at_its_size_and_keeps_its_head(tmp_path, imagenet_ckpt, capsys):
    out = tmp_path / 'run'
    assert main(['prune', *VIT, '--checkpoint', str(imagenet_ckpt), *QUICK, '--out', str(out)]) == 0
    err = capsys.readouterr().err
    assert 'input size 224 px, read from --checkpoint' in err
    assert 'predicts 1000 classes and the data has 10' in err and '--reset-head' in err
    model = amap.load_pruned(out / 'model')
    assert model.pos_embed.shape == (1, 197, 192) and model.head.out_features == 1000
    # macs reads the run folder and the model folder; eval on the embedded data is an error naming --data
    for path in (out, out / 'model'):
        assert main(['macs', str(path), '--json']) == 0
        assert json.loads(capsys.readouterr().out)['input_size'] == [3, 224, 224]
        assert main(['eval', str(path), '-q']) == 2
        assert '--data' in _error(capsys)


@pytest.mark.parametrize('extra, words', [
    (['--img-size', '64'], ['--img-size 64', '224 px', 'pass --img-size 224']),
    (['--img-size', '32'], ['--img-size 32', '224 px', 'pass --img-size 224']),  # typed, though it is the default
    (['--num-classes', '10'], ['--num-classes 10', '1000 classes', '--reset-head']),
    (['--reset-head'], ['--reset-head needs --num-classes']),
])
def test_options_that_contradict_the_checkpoint_are_one_line_errors(tmp_path, imagenet_ckpt, capsys, extra, words):
    assert main(['prune', *VIT, '--checkpoint', str(imagenet_ckpt), *QUICK, *extra, '--out', str(tmp_path / 'r')]) == 2
    line = _error(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / 'r' / 'model').exists()


def test_a_train_run_is_pruned_at_the_size_it_was_trained_at(tmp_path, capsys):
    run = tmp_path / 'trained'
    assert main(['train', '--model', 'flatten_deit_nano', '--data', 'digits', '--img-size', '40', '--epochs', '1',
                 '--max-steps', '2', '--train-subset', '20', '--val-subset', '20', '--batch-size', '8', '--workers',
                 '0', '--out', str(run), '--no-progress', '-q']) == 0
    out = tmp_path / 'run'
    assert main(['prune', '--checkpoint', str(run), *QUICK, '--out', str(out)]) == 0  # no --img-size: the run's 40
    assert amap.count_macs(amap.load_pruned(out / 'model'), (3, 40, 40)).total > 0
    assert json.loads((out / 'report.json').read_text())['config']['data']['img_size'] == 40
    assert main(['prune', '--checkpoint', str(run), *QUICK, '--img-size', '32', '--out', str(tmp_path / 'r2')]) == 2
    assert 'pass --img-size 40' in _error(capsys)


def test_reset_head_replaces_the_head_on_purpose(tmp_path, imagenet_ckpt, capsys):
    out = tmp_path / 'run'
    assert main(['prune', *VIT, '--checkpoint', str(imagenet_ckpt), *QUICK, '--num-classes', '10', '--reset-head',
                 '--out', str(out)]) == 0
    assert 'replaced the 1000-class head' in capsys.readouterr().err
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['model_kwargs']['num_classes'] == 10
    model = amap.load_pruned(out / 'model')
    assert model.head.out_features == 10 and model.pos_embed.shape[1] == 197


def test_patch_size_is_read_from_the_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / 'deit32.pth'
    torch.save(timm.create_model('deit_tiny_patch16_224', img_size=32, patch_size=4, depth=1,
                                 num_classes=10).state_dict(), ckpt)
    out = tmp_path / 'run'
    assert main(['prune', '--model', 'deit_tiny_patch16_224', '--model-kwargs', '{"depth": 1}', '--checkpoint',
                 str(ckpt), *QUICK, '--out', str(out)]) == 0
    assert 'patch size 4, read from --checkpoint' in capsys.readouterr().err
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['model_kwargs']['patch_size'] == 4
    assert amap.load_pruned(out / 'model').pos_embed.shape == (1, 65, 192)


def test_hugging_face_pretrained_folder_on_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=10))
    hf.save_pretrained(tmp_path / 'hf')  # the library's own format: config.json + model.safetensors
    spec, weights = f'hf:{tmp_path / "hf" / "config.json"}', tmp_path / 'hf' / 'model.safetensors'
    loaded, _ = create_for_checkpoint(spec, weights, data_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x).logits, hf.eval()(x).logits, atol=0, rtol=0)
    out = tmp_path / 'run'
    assert main(['prune', '--model', spec, '--checkpoint', str(weights), *QUICK, '--out', str(out)]) == 0
    config = json.loads((out / 'model' / 'config.json').read_text())
    assert config['architecture'] == 'hf:ViTForImageClassification'  # no path: rebuilds anywhere
    model = amap.load_pruned(out / 'model')
    assert type(model) is transformers.ViTForImageClassification
    assert sum(isinstance(m, PrunedHFAttention) for m in model.modules()) == 2


def test_torchvision_checkpoint_on_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    kwargs = {'patch_size': 8, 'num_layers': 2, 'num_heads': 2, 'hidden_dim': 32, 'mlp_dim': 64}
    tv = torchvision.models.VisionTransformer(image_size=32, num_classes=10, **kwargs)
    torch.save(tv.state_dict(), tmp_path / 'tv.pth')
    out = tmp_path / 'run'
    assert main(['prune', '--model', 'torchvision:VisionTransformer', '--model-kwargs', json.dumps(kwargs),
                 '--checkpoint', str(tmp_path / 'tv.pth'), *QUICK, '--out', str(out)]) == 0
    model = amap.load_pruned(out / 'model')
    assert type(model) is torchvision.models.VisionTransformer and model.image_size == 32


def test_named_library_models_build_and_describe_themselves():
    model, _ = create_model('torchvision:vit_b_16', num_classes=10, img_size=32)
    name, kwargs, bad = describe_model(model)
    assert name == 'torchvision:VisionTransformer' and kwargs['image_size'] == 32 and kwargs['num_layers'] == 12
    assert bad == []
    model, _ = create_model('torchvision:swin_t', num_classes=10)
    assert describe_model(model)[2] == []
    model, kwargs = create_model('hf:DeiTForImageClassification', num_classes=3, img_size=32, model_kwargs={
        'patch_size': 8, 'hidden_size': 32, 'num_hidden_layers': 1, 'num_attention_heads': 2, 'intermediate_size': 64})
    name, described, bad = describe_model(model)
    assert name == 'hf:DeiTForImageClassification' and bad == []
    rebuilt = build_model(name, described)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name, message', [
    ('hf:VitForImageClassification', 'did you mean ViTForImageClassification'),
    ('torchvision:vit_b_15', 'did you mean'),
])
def test_unknown_library_names_are_one_line_errors(name, message):
    with pytest.raises(amap.AmapError, match=message):
        create_model(name, num_classes=10)


def test_eval_of_a_1000_class_checkpoint_on_the_embedded_data_names_data(imagenet_ckpt, capsys):
    assert main(['eval', *VIT, '--checkpoint', str(imagenet_ckpt), '--subset', '8', '--workers', '0', '-q']) == 2
    err = capsys.readouterr().err
    assert 'predicts 1000 classes and the data has 10' in err  # built at 224 px with its own head, said
    line = [e for e in err.splitlines() if e.startswith('amap: error: ')]
    assert len(line) == 1 and 'pass --data' in line[0] and '1000 classes' in line[0]


def test_macs_of_library_models_at_their_own_size(capsys):
    tiny = {'patch_size': 8, 'hidden_size': 32, 'num_hidden_layers': 1, 'num_attention_heads': 2,
            'intermediate_size': 64, 'image_size': 64}
    assert main(['macs', 'hf:ViTForImageClassification', '--model-kwargs', json.dumps(tiny), '--json']) == 0
    assert json.loads(capsys.readouterr().out)['input_size'] == [3, 64, 64]
