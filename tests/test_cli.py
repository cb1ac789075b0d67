"""The `amap` command: train/eval/macs/demo paths and one-line errors with exit status 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from amap.cli import main

FAST_TRAIN = ['--model', 'flatten_deit_nano', '--data', 'digits', '--batch-size', '32', '--train-subset', '128',
              '--val-subset', '64', '--max-steps', '4', '--workers', '0', '--no-progress', '-q']


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith('amap: error: ') and 'Traceback' not in err
    return lines[0]


def test_train_then_eval_our_checkpoint(tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['train', *FAST_TRAIN, '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'top-1' in printed and '4 steps' in printed
    meta = json.loads((out / 'model.json').read_text())
    assert meta['model'] == 'flatten_deit_nano' and meta['step'] == 4

    # a run folder or its model.safetensors; --model is optional for our checkpoints
    for ckpt in (['--checkpoint', str(out)], [str(out / 'model.safetensors')]):
        assert main(['eval', *ckpt, '--subset', '64', '--workers', '0', '--json', '-q']) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics['images'] == 64
        assert metrics['top1'] == pytest.approx(meta['metrics']['top1'])
        assert {'top1', 'top5', 'loss', 'images_per_s'} <= metrics.keys()

    # running again into the same folder needs --resume or --overwrite
    assert main(['train', *FAST_TRAIN, '--out', str(out)]) == 2
    assert 'pass --resume' in _one_error_line(capsys.readouterr().err)
    assert main(['train', *FAST_TRAIN[:-6], '--max-steps', '6', '--workers', '0', '-q', '--no-progress',
                 '--out', str(out), '--resume']) == 0
    assert json.loads((out / 'model.json').read_text())['step'] == 6


def test_eval_foreign_checkpoint(tmp_path, capsys):
    model = timm.create_model('flatten_deit_nano', num_classes=10)
    pth = tmp_path / 'official.pth'
    torch.save({'model': model.state_dict(), 'epoch': 3}, pth)
    assert main(['eval', '--checkpoint', str(pth), '--model', 'flatten_deit_nano', '--subset', '40', '--workers', '0',
                 '--json', '-q']) == 0
    assert json.loads(capsys.readouterr().out.strip())['images'] == 40
    # no --model: cannot know the architecture
    assert main(['eval', '--checkpoint', str(pth), '-q']) == 2
    assert '--model' in _one_error_line(capsys.readouterr().err)
    # another architecture: the loader's key report, on one line
    assert main(['eval', '--checkpoint', str(pth), '--model', 'flatten_swin_nano', '--workers', '0', '-q']) == 2
    assert 'missing' in _one_error_line(capsys.readouterr().err)


def test_macs(capsys):
    assert main(['macs', 'flatten_deit_nano', '--img-size', '32']) == 0
    table = capsys.readouterr().out
    assert 'flatten_deit_nano, input 3x32x32' in table and '**total**' in table
    assert main(['macs', 'flatten_deit_nano', '--json']) == 0
    report = json.loads(capsys.readouterr().out)
    default = timm.create_model('flatten_deit_nano')
    assert report['macs'] > 1e6 and report['params'] == sum(p.numel() for p in default.parameters())


@pytest.mark.parametrize('argv,expected', [
    (['train', '--data', 'MISSING', '--out', 'OUT'], 'does not exist'),
    (['train', '--model', 'flaten_deit_nano', '--out', 'OUT'], "unknown model 'flaten_deit_nano'; did you mean "
                                                               'flatten_deit_nano'),
    (['macs', 'vit_tiny'], 'did you mean vit_tiny_patch16_224'),
    (['eval', '--checkpoint', 'MISSING'], 'no such file'),
    (['eval', '--data', 'digits'], 'no checkpoint given'),
    (['train', '--model-kwargs', '{"depth": "x"}', '--max-steps', '1', '--out', 'OUT', '--workers', '0'],
     "model 'flatten_deit_nano'"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, capsys, argv, expected):
    argv = [a.replace('MISSING', str(tmp_path / 'missing')).replace('OUT', str(tmp_path / 'out')) for a in argv]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert expected in line, line
    assert not (tmp_path / 'out' / 'model.safetensors').exists()


def test_python_dash_m_amap_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run([sys.executable, '-m', 'amap', 'train', '--data', str(tmp_path / 'nope'), '--out',
                           str(tmp_path / 'o')], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert _one_error_line(proc.stderr).endswith("or 'digits' for the embedded default")


def test_demo_fast(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('AMAP_CACHE', str(tmp_path / 'cache'))
    out = tmp_path / 'demo'
    assert main(['demo', '--epochs', '1', '--out', str(out), '--workers', '0', '--no-progress', '-q']) == 0
    text = capsys.readouterr().out
    for key in ('parameters', 'MACs / image', 'top-1 (digits val)', 'training', str(out / 'model.safetensors')):
        assert key in text
    assert (out / 'model.safetensors').is_file()
    # the demo prunes to a latency target: 1.6x faster at batch 32, predicted and measured
    report = json.loads((out / 'prune' / 'report.json').read_text())['latency_target']
    assert report['batch'] == 32 and report['speedup_target'] == pytest.approx(1.6)
    assert 'predicted latency, batch 32' in text and 'measured latency, batch 32' in text
    assert 'read from the cache' not in text
    # a second demo run starts afresh in its own folder, and reuses the latency calibration of the first
    assert main(['demo', '--epochs', '1', '--out', str(out), '--workers', '0', '--no-progress', '-q']) == 0
    assert 'calibration read from the cache' in capsys.readouterr().out


def test_demo_checks_its_target_before_training(tmp_path, capsys):
    out = tmp_path / 'demo'
    assert main(['demo', '--speedup', '0.5', '--out', str(out), '--workers', '0', '--no-progress', '-q']) == 2
    assert 'speedup 0.5 must be above 1' in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    with pytest.raises(SystemExit) as exc:
        main(['demo', '--speedup', '1.6', '--target', '0.6'])
    assert exc.value.code == 2
    assert 'not allowed with' in _one_error_line(capsys.readouterr().err)
    assert main(['demo', '--target', '0.6', '--latency-batch', '8', '--out', str(out)]) == 2
    assert '--latency-batch' in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_argument_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(['train', '--model-kwargs', '[1, 2]'])
    assert exc.value.code == 2
    assert 'must be a JSON object' in _one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as exc:
        main(['macs'])
    assert exc.value.code == 2
    assert 'MODEL' in _one_error_line(capsys.readouterr().err)
