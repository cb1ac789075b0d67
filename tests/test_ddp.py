"""Two gloo processes under torchrun: training completes, rank 0 alone writes, evaluation counts each image once,
resume is exact."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from amap.data import DIGITS, build_eval_loader
from amap.train import evaluate, latest_train_state, load_trained

REPO = Path(__file__).resolve().parents[1]


def _torchrun_train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'amap', 'train', '--model', 'flatten_deit_nano', '--data', DIGITS, '--train-subset', '256',
           '--batch-size', '32', '--workers', '0', '--log-every', '2', '--no-progress', '--device', 'cpu',
           '--mixup', '0.5', '--model-kwargs', '{"drop_path_rate": 0.1}', '--out', str(out), *extra]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_gloo_processes(tmp_path):
    out = tmp_path / 'run'
    proc = _torchrun_train(out, '--max-steps', '6')
    # only rank 0 prints the result line
    assert proc.stdout.count('top-1') == 1, proc.stdout

    records = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    starts = [r for r in records if r['event'] == 'start']
    assert len(starts) == 1 and starts[0]['world_size'] == 2  # one writer
    # 256 images / 2 ranks / 32 per batch = 4 updates per epoch: logs at steps 2, 4, 6, once each
    assert [r['step'] for r in records if r['event'] == 'train'] == [2, 4, 6]
    evals = [r for r in records if r['event'] == 'eval']
    assert [r['step'] for r in evals] == [4, 6]
    loader, _ = build_eval_loader(DIGITS, img_size=32, batch_size=128, num_workers=0)
    val_size = len(loader.dataset)
    assert val_size == 360
    assert all(r['images'] == val_size for r in evals)  # sharded without padding, reduced over both ranks

    # checkpoints: the epoch end (step 4) and the max_steps stop (step 6), each written once, no temp leftovers
    ckpts = out / 'checkpoints'
    assert sorted(p.name for p in ckpts.iterdir()) == ['latest.json', 'step_000000004', 'step_000000006']
    assert latest_train_state(out).name == 'step_000000006'
    state = json.loads((ckpts / 'step_000000006' / 'state.json').read_text())
    assert state['world_size'] == 2 and len(state['rng']) == 2  # both ranks' RNG states, gathered to rank 0

    # the reduced metrics equal a single-process evaluation of the saved model
    model = load_trained(out)
    single = evaluate(model, loader)
    assert single['images'] == val_size
    assert abs(single['top1'] - evals[-1]['top1']) < 1e-6
    assert abs(single['loss'] - evals[-1]['loss']) < 1e-4

    # resume under torchrun is exact too: stop after 3 updates (mid-epoch), resume to 6, same weights bit for bit
    other = tmp_path / 'interrupted'
    _torchrun_train(other, '--max-steps', '3')
    _torchrun_train(other, '--max-steps', '6', '--resume')
    a, b = load_file(str(out / 'model.safetensors')), load_file(str(other / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
