"""Training loop, checkpoints and exact resume (amap.train, amap.utils.io)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from amap.data import DataConfig, build_eval_loader
from amap.errors import AmapError, CheckpointError, ConfigError, Interrupted, ModelError
from amap.train import (
    TrainConfig,
    TrainState,
    create_model,
    evaluate,
    latest_train_state,
    load_train_state,
    load_trained,
    train,
)
from amap.utils.io import atomic_write_json, read_json


class Killed(Exception):
    """Stands for SIGKILL: raised from the update callback, nothing after it runs."""


def _tiny_cfg(out: Path, **kw) -> TrainConfig:
    """flatten_deit_nano on 192 digits images: 6 updates per epoch; mixup/cutmix, smoothing and drop-path on so that
    every source of trainer-side randomness is exercised."""
    data = DataConfig(data='digits', batch_size=32, train_subset=192, val_subset=100, num_workers=kw.pop('workers', 0),
                      mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    base = dict(model='flatten_deit_nano', model_kwargs={'drop_path_rate': 0.1, 'drop_rate': 0.1}, data=data,
                epochs=3, lr=2e-3, warmup_epochs=0.5, clip_grad=1.0, out_dir=str(out), log_every=2, progress=False,
                seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / 'model.safetensors'))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f'{k} differs (max |diff| {(a[k] - b[k]).abs().max().item():.3g})'


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory) -> tuple[Path, object]:
    """An uninterrupted 18-step run (3 epochs x 6 updates)."""
    out = tmp_path_factory.mktemp('ref')
    result = train(_tiny_cfg(out, checkpoint_every=4))
    assert result.steps == 18
    return out, result


@pytest.mark.parametrize('kill_at,workers', [(10, 1), (7, 0)])
def test_resume_after_kill_gives_the_same_weights(tmp_path, reference_run, kill_at, workers):
    """Killed right after step 10 (latest checkpoint: step 8, in the middle of epoch 2, a worker process loads the
    data) or after step 7 (latest: the epoch-end checkpoint at step 6, data loaded in-process); resuming ends
    bit-identical to the uninterrupted run (which loaded its data in-process)."""
    ref_dir, ref = reference_run

    def kill(state: TrainState) -> None:
        if state.step == kill_at:
            raise Killed

    with pytest.raises(Killed):
        train(_tiny_cfg(tmp_path, checkpoint_every=4, workers=workers), on_update=kill)
    # what a SIGKILL during a write leaves behind: a temp folder and a temp file (ignored, then cleaned up)
    (tmp_path / 'checkpoints' / '.step_000000012.x1y2.tmp').mkdir()
    (tmp_path / '.model.safetensors.abc.tmp').write_bytes(b'partial')
    latest = latest_train_state(tmp_path)
    expected = 8 if kill_at == 10 else 6
    assert latest is not None and latest.name == f'step_{expected:09d}'
    stopped = read_json(latest / 'state.json')
    assert stopped['step'] == expected and stopped['batch_in_epoch'] == (2 if kill_at == 10 else 0)
    at_kill = {k[len('model.'):]: v for k, v in load_file(str(latest / 'state.safetensors')).items()
               if k.startswith('model.')}

    resumed = train(_tiny_cfg(tmp_path, checkpoint_every=4, resume=True, workers=workers))
    assert resumed.resumed_from == expected and resumed.steps == 18
    _assert_same(_weights(ref_dir), _weights(tmp_path))
    assert resumed.metrics['top1'] == ref.metrics['top1']
    # the comparison is not vacuous: the weights moved after the checkpoint we resumed from
    assert not torch.equal(at_kill['head.weight'], _weights(tmp_path)['head.weight'])
    assert not [p for p in tmp_path.rglob('*.tmp')]
    records = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    events = [r['event'] for r in records]
    assert events.count('start') == 1 and events.count('resume') == 1
    # each segment says where it ran (the config's 'auto' resolved), so a run resumed on another device is traceable
    segments = [r for r in records if r['event'] in ('start', 'resume')]
    assert [(r['device'], r['amp_dtype']) for r in segments] == [('cpu', None)] * 2


def test_sigint_checkpoints_at_the_step_and_resume_is_exact(tmp_path, reference_run):
    """A real SIGINT in the middle of epoch 2: the run finishes the update, writes a checkpoint at that very step
    (not the periodic one), raises Interrupted naming it, and --resume ends bit-identical to the uninterrupted run."""
    ref_dir, _ = reference_run

    def interrupt(state: TrainState) -> None:
        if state.step == 9:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    with pytest.raises(Interrupted, match=r'SIGINT at step 9: checkpoint saved in .*checkpoints; continue with '
                                          r'--resume') as exc:
        train(_tiny_cfg(tmp_path, checkpoint_every=4), on_update=interrupt)
    assert exc.value.step == 9
    latest = latest_train_state(tmp_path)
    assert latest is not None and latest.name == 'step_000000009'
    assert read_json(latest / 'state.json')['batch_in_epoch'] == 3
    events = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert events[-1]['event'] == 'interrupted' and events[-1]['signal'] == 'SIGINT'
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    resumed = train(_tiny_cfg(tmp_path, checkpoint_every=4, resume=True))
    assert resumed.resumed_from == 9 and resumed.steps == 18
    _assert_same(_weights(ref_dir), _weights(tmp_path))


def test_cli_sigint_exits_130_with_one_line_and_resumes(tmp_path):
    """Ctrl-C on `amap train`: exit code 130, one line naming the checkpoint, no traceback; --resume finishes."""
    args = [sys.executable, '-m', 'amap', 'train', '--data', 'digits', '--train-subset', '192', '--val-subset', '64',
            '--batch-size', '32', '--epochs', '40', '--workers', '0', '--threads', '1', '--no-progress',
            '--checkpoint-every', '1000', '--out', str(tmp_path)]
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / 'model.safetensors').exists():  # written at the end of epoch 1
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith('amap:')]
    assert len(lines) == 1 and 'Traceback' not in err, err
    assert lines[0].startswith('amap: interrupted: SIGINT at step ') and 'continue with --resume' in lines[0]
    step = int(lines[0].split('at step ')[1].split(':')[0])
    assert 6 <= step < 240
    latest = latest_train_state(tmp_path)
    assert latest is not None and read_json(latest / 'state.json')['step'] == step
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and '--resume' in again.stderr  # an interrupted run is never silently restarted
    done = subprocess.run(args + ['--resume'], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert read_json(latest_train_state(tmp_path) / 'state.json')['step'] == 240


def test_resume_from_max_steps_stop(tmp_path, reference_run):
    """A run stopped by max_steps in the middle of an epoch continues to the same end."""
    ref_dir, _ = reference_run
    first = train(_tiny_cfg(tmp_path, max_steps=9))
    assert first.steps == 9 and (tmp_path / 'model.safetensors').is_file()
    assert not torch.equal(_weights(tmp_path)['head.weight'], _weights(ref_dir)['head.weight'])
    train(_tiny_cfg(tmp_path, resume=True))
    _assert_same(_weights(ref_dir), _weights(tmp_path))


def test_checkpoint_files_are_safetensors_and_json(reference_run):
    out, result = reference_run
    files = [p for p in out.rglob('*') if p.is_file()]
    suffixes = {p.suffix for p in files}
    assert suffixes <= {'.safetensors', '.json', '.jsonl'}, suffixes  # no .pth / pickle, no temp leftovers
    for p in files:
        head = p.read_bytes()[:2]
        assert head != b'\x80\x04' and head[:1] != b'\x80', f'{p} looks like a pickle'
        if p.suffix == '.safetensors':
            with safe_open(str(p), framework='pt') as f:
                assert len(list(f.keys())) > 0
        elif p.suffix == '.json':
            json.loads(p.read_text())
        else:
            records = [json.loads(line) for line in p.read_text().splitlines()]
            assert {'train', 'eval'} <= {r['event'] for r in records}
    # model.json is the same description as the safetensors header; the model rebuilds from it
    with safe_open(str(out / 'model.safetensors'), framework='pt') as f:
        header = json.loads(f.metadata()['amap'])
    meta = json.loads((out / 'model.json').read_text())
    assert header == meta
    assert meta['model'] == 'flatten_deit_nano' and meta['num_classes'] == 10 and meta['img_size'] == 32
    assert meta['step'] == 18 and meta['epoch'] == 3 and len(meta['mean']) == 3
    # two step folders kept, latest.json names the newest
    steps = sorted(p.name for p in (out / 'checkpoints').iterdir() if p.is_dir())
    assert steps == ['step_000000016', 'step_000000018']
    assert read_json(out / 'checkpoints' / 'latest.json')['dir'] == 'step_000000018'
    # the optimizer state is in the safetensors file (Adam moments of every parameter)
    tensors = load_file(str(out / 'checkpoints' / 'step_000000018' / 'state.safetensors'))
    n_params = sum(1 for _ in result.model.parameters())
    assert sum(k.endswith('.exp_avg_sq') for k in tensors) == n_params
    model = load_trained(out)
    loader, _ = build_eval_loader('digits', img_size=32, batch_size=64, num_workers=0, subset=100)
    again = evaluate(model, loader)
    assert again['top1'] == pytest.approx(result.metrics['top1']) and again['images'] == 100


def test_latest_pointer_recovery(tmp_path, reference_run):
    """A broken latest.json falls back to the newest complete folder; a torn folder is skipped; a mixed pair is
    refused."""
    import shutil
    ref_dir, _ = reference_run
    ckpts = tmp_path / 'checkpoints'
    shutil.copytree(ref_dir / 'checkpoints', ckpts)
    (ckpts / 'latest.json').write_text('{"step": 18, "di')  # torn pointer
    assert latest_train_state(tmp_path).name == 'step_000000018'
    (ckpts / 'step_000000018' / 'state.safetensors').unlink()  # torn folder
    assert latest_train_state(tmp_path).name == 'step_000000016'
    # state.json of one save next to the tensors of another: refused
    shutil.copy(ref_dir / 'checkpoints' / 'step_000000018' / 'state.json', ckpts / 'step_000000016' / 'state.json')
    model, _ = create_model('flatten_deit_nano', num_classes=10, img_size=32)
    state = TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointError, match='do not belong together'):
        load_train_state(ckpts / 'step_000000016', state)
    atomic_write_json(ckpts / 'latest.json', {'step': 16, 'dir': 'step_000000016'})
    assert latest_train_state(tmp_path).name == 'step_000000016'


def test_out_dir_and_resume_guards(tmp_path, reference_run):
    ref_dir, _ = reference_run
    with pytest.raises(ConfigError, match='already holds a training run'):
        train(_tiny_cfg(ref_dir))
    with pytest.raises(ConfigError, match='data.batch_size=32, not 64'):
        cfg = _tiny_cfg(ref_dir, resume=True)
        cfg.data.batch_size = 64
        train(cfg)
    with pytest.raises(ConfigError, match='no such run'):
        train(_tiny_cfg(tmp_path / 'x', resume=str(tmp_path / 'nowhere')))
    with pytest.raises(ConfigError, match='epochs'):
        train(_tiny_cfg(tmp_path, epochs=0))
    with pytest.raises(ModelError, match='did you mean flatten_deit_nano'):
        train(_tiny_cfg(tmp_path, model='flaten_deit_nano'))
    with pytest.raises(ConfigError, match='amp'):
        train(_tiny_cfg(tmp_path, amp='fast', device='cpu'))
    with pytest.raises(CheckpointError):
        load_trained(tmp_path)


def test_non_finite_loss_stops_with_the_step(tmp_path):
    """An exploding learning rate: the run stops at the first non-finite loss, naming the step and the fixes."""
    with pytest.raises(AmapError, match=r'non-finite loss \S+ at step [1-9]\d*; lower the learning rate'):
        train(_tiny_cfg(tmp_path, lr=1e12, warmup_epochs=0, max_steps=12, clip_grad=None))


def test_evaluate_reduces_exact_counts():
    """top-1/top-5/loss against a hand computation on a model whose outputs are known."""
    torch.manual_seed(0)
    logits = torch.randn(50, 10)
    targets = torch.randint(0, 10, (50,))
    images = torch.arange(50, dtype=torch.float32)[:, None]

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits[x[:, 0].long()] + self.w

    loader = [(images[i:i + 16], targets[i:i + 16]) for i in range(0, 50, 16)]
    m = evaluate(Lookup(), loader)
    assert m['images'] == 50
    assert m['top1'] == pytest.approx(100 * (logits.argmax(1) == targets).float().mean().item())
    top5 = (logits.topk(5, 1).indices == targets[:, None]).any(1).float().mean().item()
    assert m['top5'] == pytest.approx(100 * top5)
    assert m['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)


def test_few_hundred_steps_on_cifar10_beat_chance(tmp_path, cifar10):
    """256 updates (4 epochs x 64 batches of 64) of flatten_deit_nano (0.16 M params) on 4096 CIFAR-10 images.

    Measured: 33.5% top-1 on 1000 test images (chance: 10%) in ~50 s on one core (3 epochs/192 updates: 32.1%,
    300 updates: 33.3%); the 25% threshold leaves a wide margin for thread-count and platform differences.
    """
    data = DataConfig(data=str(cifar10), batch_size=64, train_subset=4096, val_subset=1000, num_workers=0)
    start = time.perf_counter()
    result = train(TrainConfig(model='flatten_deit_nano', data=data, epochs=4, lr=3e-3, warmup_epochs=0.5,
                               eval_every=0, out_dir=str(tmp_path), log_every=50, progress=False))
    seconds = time.perf_counter() - start
    assert result.steps == 256
    assert result.metrics['images'] == 1000
    assert result.metrics['top1'] >= 25.0, f"top-1 {result.metrics['top1']:.1f}% after {result.steps} steps"
    print(f"cifar10 subset: top-1 {result.metrics['top1']:.2f}% after {result.steps} steps in {seconds:.0f} s")


def test_config_from_dict_rejects_unknown_keys():
    cfg = TrainConfig.from_dict({'model': 'flatten_deit_nano', 'epochs': 2,
                                 'data': {'data': 'digits', 'batch_size': 8}})
    assert isinstance(cfg.data, DataConfig) and cfg.data.batch_size == 8
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # round trip through JSON values
    with pytest.raises(ConfigError, match="unknown key 'epoch'; did you mean 'epochs'"):
        TrainConfig.from_dict({'epoch': 3})
    with pytest.raises(ConfigError, match=r"train config \(data\): unknown key 'batchsize'; did you mean 'batch_size'"):
        TrainConfig.from_dict({'data': {'batchsize': 3}})


def test_amp_on_the_cpu_is_bfloat16_without_loss_scaling():
    """amp='on' on the CPU: bfloat16 autocast (matmuls run in bfloat16) and a disabled GradScaler."""
    from amap.train import amp_enabled, autocast, make_scaler
    cpu = torch.device('cpu')
    assert amp_enabled('on', cpu) and not amp_enabled('auto', cpu) and not amp_enabled('off', cpu)
    with autocast(cpu, True):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert not make_scaler(cpu, True).is_enabled()
