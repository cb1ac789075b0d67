"""Smoke tests of benchmarks/speed.py and benchmarks/cost.py: each runs as a user runs it (a subprocess, --quick,
cut down to one small model) and must write JSON + Markdown with the fields the benchmark tables are built from.

Timings are never asserted against each other (these machines swing 2-3x); only that they were measured, are
positive and finite, and that the derived numbers (ratios, overheads) are consistent with them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path, *args: str) -> dict:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), '--quick', '--out', str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix('.md').is_file()
    assert not list(out.parent.glob('.*.tmp')), 'a temp file of the atomic write was left behind'
    return json.loads(out.read_text())


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_meta(meta: dict) -> None:
    machine = meta['machine']
    assert machine['torch_threads'] == 1
    assert len(machine['loadavg_start']) == 3 and len(meta['loadavg_end']) == 3
    assert machine['cpu'] and machine['torch'] and machine['date']
    assert meta['complete'] is True and meta['quick'] is True and meta['command'].startswith('python benchmarks/')


def test_speed_quick(tmp_path):
    out = tmp_path / 'speed.json'
    data = _run('speed.py', out, '--models', 'flatten_deit_micro', '--targets', '0.5', '--batches', '1', '4')
    _check_meta(data['meta'])
    assert data['failed'] == []
    (row,) = data['rows']
    assert row['model'] == 'flatten_deit_micro' and row['input'] == [3, 32, 32]
    variants = row['variants']
    assert set(variants) == {'unpruned', '50%'}
    assert variants['unpruned']['mac_ratio'] == 1.0
    assert 0.45 <= variants['50%']['mac_ratio'] <= 0.5 + 1e-9  # the target guarantee: at most the target
    assert variants['50%']['macs'] < variants['unpruned']['macs']
    assert variants['50%']['params'] < variants['unpruned']['params']
    assert all(d < 1e-3 for d in row['ort_max_abs_diff'].values())  # the timed ONNX model is the pruned model
    assert {(t['batch'], t['backend']) for t in row['timings']} == {(1, 'eager'), (1, 'ort'), (4, 'eager'), (4, 'ort')}
    for t in row['timings']:
        assert t['rounds'] >= 3 and t['loadavg_1min']
        unpruned, pruned = t['variants']['unpruned'], t['variants']['50%']
        assert unpruned['latency_ratio'] == 1.0 and unpruned['goal_met'] is None
        for v in (unpruned, pruned):
            assert _positive(v['latency_ms']) and len(v['samples_ms']) == t['rounds']
            assert _positive(v['cpu_ms']) and len(v['cpu_samples_ms']) == t['rounds']
            assert v['throughput_ips'] == pytest.approx(t['batch'] / (v['latency_ms'] / 1e3))
            assert v['speedup'] == pytest.approx(1 / v['latency_ratio'])
            assert v['cpu_speedup'] == pytest.approx(1 / v['cpu_ratio'])
        assert _positive(pruned['latency_ratio']) and _positive(pruned['cpu_ratio'])
        assert pruned['goal_met'] == (pruned['cpu_ratio'] <= 1.1 * variants['50%']['mac_ratio'])
        assert pruned['goal_met_wall'] == (pruned['latency_ratio'] <= 1.1 * variants['50%']['mac_ratio'])
    md = out.with_suffix('.md').read_text()
    assert '| flatten_deit_micro | 50% MACs |' in md and 'thread' in md and 'load average' in md


def test_cost_quick(tmp_path):
    out = tmp_path / 'cost.json'
    data = _run('cost.py', out, '--models', 'flatten_deit_micro', '--batch', '8', '--rounds', '2',
                '--calib-batches', '1')
    _check_meta(data['meta'])
    assert data['failed'] == []
    (row,) = data['rows']
    assert row['model'] == 'flatten_deit_micro' and row['batch'] == 8
    steps = row['steps']
    modes = steps['modes']
    assert set(modes) == {'plain', 'plain_kd', 'search_no_kd', 'search'}
    assert modes['plain']['overhead_vs_plain'] == 0.0 and modes['plain']['overhead_vs_plain_wall'] == 0.0
    for m in modes.values():
        assert _positive(m['ms']) and len(m['samples_ms']) == steps['rounds'] == 2
        assert _positive(m['cpu_ms']) and len(m['cpu_samples_ms']) == 2
        assert _positive(m['state_mb']) and _positive(m['step_peak_mb'])
        assert m['total_peak_mb'] == pytest.approx(m['state_mb'] + m['step_peak_mb'], abs=0.02)
    # persistent state: a teacher adds a copy of the weights; the search adds indicators, reweights and their Adam state
    assert modes['plain_kd']['state_mb'] > modes['plain']['state_mb']
    assert modes['search']['state_mb'] > modes['plain_kd']['state_mb']
    assert steps['goal_met'] == (modes['search']['overhead_vs_plain'] < 0.15)
    assert steps['goal_met_without_kd'] == (modes['search_no_kd']['overhead_vs_plain'] < 0.15)
    cal = row['calibration']
    assert cal['calib_images'] == 8
    assert set(cal['phases']) == {'pruner', 'attn_init', 'similarity', 'eval_forward'}
    assert all(_positive(p['seconds']) and _positive(p['cpu_seconds']) for p in cal['phases'].values())
    for total, key in (('total_seconds', 'seconds'), ('total_cpu_seconds', 'cpu_seconds')):
        assert cal[total] == pytest.approx(sum(cal['phases'][k][key] for k in ('pruner', 'attn_init', 'similarity')))
    md = out.with_suffix('.md').read_text()
    assert '| flatten_deit_micro | 8 |' in md and 'Calibration' in md and 'profiler' in md


def test_gate_gradients_quick(tmp_path):
    """benchmarks/gate_gradients.py: per kind, the gradient statistics are finite and consistent (|E g| <= E|g|,
    shares in [0, 1]), the noise reference is the median |t| of Student t (about 0.76 for 4 samples)."""
    out = tmp_path / 'gg.json'
    data = _run('gate_gradients.py', out, '--batches', '4', '--batch-size', '16')
    assert data['meta']['complete'] is True and data['batches'] == 4
    assert set(data['kinds']) == {'qk', 'v', 'mlp', 'all'}
    for row in data['kinds'].values():
        assert 0 < row['abs_mean_g'] <= row['mean_abs_g'] and 0 <= row['signal_share'] <= 1
        assert 0 <= row['share_significant'] <= 1 and 0 <= row['share_closing'] <= 1
    assert data['kinds']['all']['channels'] == sum(data['kinds'][k]['channels'] for k in ('qk', 'v', 'mlp'))
    assert 0.7 < data['t_noise'] < 0.82


def test_base_recipe_lists_where_each_stretch_trained(monkeypatch):
    """``recipe.json`` of a base resumed on another device: one segment per change of device, AMP or loader workers,
    placed by step and epoch; a log without the resolved device (older runs) gives the configured one."""
    monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
    import bases

    def start(event, step, device=None, amp=None, workers=0, cfg_device='auto'):
        rec = {'event': event, 'step': step, 'config': {'device': cfg_device, 'amp': 'on',
                                                        'data': {'num_workers': workers}}}
        return rec if device is None else {**rec, 'device': device, 'amp_dtype': amp}

    log = [start('start', 0), {'event': 'eval', 'step': 390, 'epoch': 1.0},
           start('resume', 200), start('resume', 300, 'cuda:0', 'float16', 12, 'cuda'),
           {'event': 'eval', 'step': 780, 'epoch': 2.0}, start('resume', 600, 'cuda:0', 'float16', 12, 'cuda')]
    assert bases.segments(log) == [
        {'from_step': 0, 'from_epoch': 0.0, 'device': 'auto', 'amp': 'on', 'workers': 0},
        {'from_step': 300, 'from_epoch': 0.77, 'device': 'cuda:0', 'amp': 'float16', 'workers': 12}]
    recipe = bases.recipe('flatten_swin_micro', log)
    assert recipe['command'].startswith('amap train --model flatten_swin_micro')
    assert recipe['segments'] == bases.segments(log)
