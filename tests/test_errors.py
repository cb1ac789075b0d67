"""Bad input -> one clear line (CLI exit 2, a specific AmapError subclass in the API), before any work is wasted.

The checkpoint, dataset and model-name cases live beside their modules (test_checkpoint.py, test_data.py,
test_cli.py, models/test_conformance.py); this file holds the cross-cutting ones: image size, targets, config files
(unknown keys, mistyped values, unsafe YAML, output paths) and the value checks of :mod:`amap.utils.config`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from amap.cli import main
from amap.data import DataConfig
from amap.errors import ConfigError
from amap.pipeline import PipelineConfig, load_config
from amap.train import TrainConfig, train
from amap.utils.config import check_values, from_mapping


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory) -> Path:
    """A 1-epoch flatten_deit_nano run on 128 digits images (32 px)."""
    out = tmp_path_factory.mktemp('run')
    data = DataConfig(data='digits', batch_size=32, train_subset=128, val_subset=64, num_workers=0)
    train(TrainConfig(model='flatten_deit_nano', data=data, epochs=1, out_dir=str(out), eval_every=0,
                      progress=False))
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('amap: error: ')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def _prune(run_dir: Path, out: Path, *extra: str) -> list[str]:
    return ['prune', '--checkpoint', str(run_dir), '--data', 'digits', '--train-subset', '64', '--val-subset', '32',
            '--batch-size', '32', '--workers', '0', '--search-steps', '2', '--finetune-epochs', '0', '--no-latency',
            '--no-progress', '--out', str(out), *extra]


def test_eval_at_an_image_size_the_model_cannot_take(run_dir, capsys):
    assert main(['eval', str(run_dir), '--data', 'digits', '--img-size', '48', '--subset', '32', '--workers', '0',
                 '-q']) == 2
    line = _error(capsys)
    assert 'does not accept input 3x48x48' in line and line.endswith('use --img-size 32 (the size it was trained at)')


def test_prune_at_another_image_size_or_model_than_the_checkpoint(run_dir, tmp_path, capsys):
    assert main(_prune(run_dir, tmp_path / 'a', '--img-size', '48')) == 2
    assert _error(capsys).endswith(f'--img-size 48 does not match the 32 px --checkpoint {run_dir} was trained at; '
                                   'pass --img-size 32')
    assert main(_prune(run_dir, tmp_path / 'b', '--model', 'flatten_swin_nano')) == 2
    assert 'holds flatten_deit_nano; drop --model' in _error(capsys)


@pytest.mark.parametrize('target,expected', [
    ('0', 'target 0.0 must be a MAC ratio in (0, 1)'),
    ('-0.3', 'target -0.3 must be a MAC ratio in (0, 1)'),
    ('nan', 'target nan must be a MAC ratio'),
    ('1', 'target 1 is not a MAC ratio in (0, 1)'),
    ('1.5', 'target 1.5 is not a MAC ratio in (0, 1) (e.g. 0.7 for 70% of the MACs)'),
])
def test_targets_out_of_range(run_dir, tmp_path, capsys, target, expected):
    assert main(_prune(run_dir, tmp_path / 'out', '--target', target)) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / 'out' / 'search_state').exists()


def test_target_below_the_smallest_structure_names_the_minimum_before_searching(run_dir, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(_prune(run_dir, out, '--target', '0.01', '--search-steps', '500')) == 2
    line = _error(capsys)
    assert 'is below the smallest structure the constraints allow' in line
    minimum = float(line.split('raise --target to at least ')[1].split()[0])
    assert 0.01 < minimum < 0.5
    assert not (out / 'search_state').exists() and not (out / 'pruned_init').exists()  # failed before the search
    # the minimum it names is reachable
    assert main(_prune(run_dir, out, '--target', str(minimum), '--overwrite', '-q')) == 0


@pytest.mark.parametrize('text,message', [
    ('serch_steps: 3\n', r"c\.yaml: unknown key 'serch_steps'; did you mean 'search_steps'\?"),
    ('data:\n  batchsize: 3\n', r"\(data\): unknown key 'batchsize'; did you mean 'batch_size'\?"),
    ('prune:\n  simlarity: false\n', r"prune options: unknown key 'simlarity'; did you mean 'similarity'\?"),
    ('target: fast\n', r"c\.yaml: target must be a number, got 'fast'"),
    ('search_steps: 2.5\n', 'search_steps must be an integer or null, got 2.5'),
    ('prune:\n  head_balance: "no"\n', "head_balance must be true/false, got 'no'"),
    ('data: digits\n', 'data must be a mapping'),
])
def test_config_file_unknown_and_mistyped_keys(tmp_path, text, message):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_config_file_harmless_mismatches_are_converted(tmp_path):
    cfg = tmp_path / 'c.yaml'
    # PyYAML reads 1e-3 (no dot) as a string: accepted as the number it means; an int where a float goes too
    cfg.write_text('finetune_lr: 1e-3\ntarget: 0.5\nkd_alpha: 1\nprune:\n  kinds: [qk, v]\n')
    loaded = load_config(cfg)
    assert loaded.finetune_lr == 0.001 and loaded.kd_alpha == 1.0 and isinstance(loaded.kd_alpha, float)
    assert loaded.prune_config().kinds == ('qk', 'v')


def test_config_file_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / 'evil.yaml'
    cfg.write_text('target: !!python/object/apply:os.system ["touch PWNED"]\n')
    with pytest.raises(ConfigError, match='not valid YAML .*only plain YAML is accepted'):
        load_config(cfg)
    assert not (tmp_path / 'PWNED').exists()


@pytest.mark.parametrize('out', ['/tmp/elsewhere', '../up', 'runs/../../up', '~/home', ''])
def test_config_file_cannot_send_outputs_outside_the_current_folder(tmp_path, out):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text(f'out: "{out}"\n')
    with pytest.raises(ConfigError, match=r'c\.yaml: out '):
        load_config(cfg)
    # typed on the command line (an override), any folder is the user's choice
    assert load_config(cfg, out=str(tmp_path / 'anywhere')).out == str(tmp_path / 'anywhere')


def test_config_file_output_below_the_current_folder_is_fine(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('out: runs/exp1\n')
    assert load_config(cfg).out == 'runs/exp1'


def test_value_checks_convert_only_the_harmless_mismatches():
    assert check_values(DataConfig, {'img_size': 64, 'mean': [0.5, 0.5, 0.5], 'train_subset': None}, 'x') == {
        'img_size': 64, 'mean': (0.5, 0.5, 0.5), 'train_subset': None}
    # img_size may be null (amap prune: the checkpoint's size)
    for key, value, expected in [('img_size', True, 'img_size must be an integer or null, got True'),
                                 ('img_size', '32', "img_size must be an integer or null, got '32'"),
                                 ('mean', [0.5, 'a'], 'mean must be a list or null'),
                                 ('augment', 3, 'augment must be a string, got 3'),
                                 ('mixup', None, 'mixup must be a number, got None')]:
        with pytest.raises(ConfigError, match=expected.replace('(', r'\(').replace(')', r'\)')):
            check_values(DataConfig, {key: value}, 'data')
    cfg = from_mapping(TrainConfig, {'epochs': 2, 'lr': '3e-4', 'resume': 'runs/x', 'data': {'batch_size': 8}},
                       where='t')
    assert cfg.lr == 3e-4 and cfg.resume == 'runs/x' and cfg.data.batch_size == 8
    with pytest.raises(ConfigError, match=r"t: resume must be true/false or a string, got 3"):
        from_mapping(TrainConfig, {'resume': 3}, where='t')
    assert from_mapping(PipelineConfig, dataclasses.asdict(PipelineConfig()), where='p') == PipelineConfig()


def test_non_finite_loss_in_the_fine_tune_stops_with_the_step_and_keeps_the_last_checkpoint(run_dir, tmp_path,
                                                                                              capsys):
    """An exploding fine-tune learning rate: one line with the step and the fixes, exit 2, and the checkpoint
    written before the blow-up still loads with finite weights."""
    from amap.train import latest_train_state
    from amap.utils.io import read_safetensors

    out = tmp_path / 'out'
    assert main(_prune(run_dir, out, '--target', '0.6', '--finetune-epochs', '3', '--finetune-lr', '1e12',
                       '--checkpoint-every', '1', '-q')) == 2
    line = _error(capsys)
    assert 'non-finite loss' in line and 'at step ' in line and 'lower the learning rate' in line
    assert '--amp off' in line
    latest = latest_train_state(out / 'finetune')
    assert latest is not None
    tensors, _ = read_safetensors(latest / 'state.safetensors')
    assert tensors and all(bool(t.isfinite().all()) for t in tensors.values() if t.is_floating_point())
    assert not (out / 'model').exists()
