"""Smoke test of benchmarks/quality.py: --quick runs as a user runs it (a subprocess, on the embedded digits data)
and must write JSON + Markdown with every method at the MAC target, top-1 values that are percentages, and reuse
finished runs when run again.

Accuracies are never compared between methods here (a few dozen steps decide nothing); only that each was measured.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK_METHODS = {'amap', 'magnitude', 'torch_pruning_magnitude'}


def _run(out: Path, work: Path, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'quality.py'), '--quick', '--data', 'digits',
                           '--out', str(out), '--work-dir', str(work), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix('.md').is_file()
    assert not list(out.parent.glob('.*.tmp')), 'a temp file of the atomic write was left behind'
    return json.loads(out.read_text()), proc.stderr


def _percent(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 100


def test_quality_quick(tmp_path):
    out, work = tmp_path / 'quality_quick.json', tmp_path / 'work'
    data, _ = _run(out, work)
    meta = data['meta']
    assert meta['quick'] is True and meta['complete'] is True and data['failed'] == []
    assert meta['command'].startswith('python benchmarks/quality.py --quick')
    assert meta['machine']['torch_threads'] == 1 and meta['machine']['date'] and meta['torch_pruning_version']
    assert meta['targets'] == [0.7] and meta['seeds'] == [0]
    budget = meta['budget']
    assert budget['baseline_finetune_epochs'] == budget['search_epochs'] + budget['finetune_epochs']

    runs = {r['method']: r for r in data['runs']}
    assert set(runs) == QUICK_METHODS
    for method, r in runs.items():
        assert 'not_applicable' not in r, f'{method}: {r.get("not_applicable")}'  # a timm DeiT: Torch-Pruning works
        ratio = r['macs']['ratio']
        assert ratio <= 0.7 + 1e-9, (method, ratio)
        if not method.startswith('torch_pruning'):  # the engine's target guarantee: at most, and close to, the target
            assert ratio >= 0.7 - 0.01, (method, ratio)
        assert r['macs']['after'] < r['macs']['before'] and r['params']['after'] < r['params']['before']
        assert all(_percent(r['top1'][k]) for k in ('before', 'after_surgery', 'after_finetune')), r['top1']
        assert r['seconds']['total'] > 0 and r['reused'] is False
    # every method starts from the same base, evaluated on the same data
    assert len({r['top1']['before'] for r in runs.values()}) == 1
    # the amap search ran, long enough to reach the target itself; the baselines got its epochs as fine-tuning
    assert runs['amap']['budget']['search_epochs'] >= 1
    assert abs(runs['amap']['search_final_mac_ratio'] - 0.7) <= 0.05
    assert runs['magnitude']['search_final_mac_ratio'] is None
    assert runs['magnitude']['budget']['finetune_epochs'] == budget['baseline_finetune_epochs']
    assert runs['torch_pruning_magnitude']['budget']['finetune_epochs'] == budget['baseline_finetune_epochs']

    rows = {r['method']: r for r in data['rows']}
    assert set(rows) == QUICK_METHODS
    for method, row in rows.items():
        assert row['seeds'] == [0]
        assert row['top1_after_finetune']['mean'] == runs[method]['top1']['after_finetune']
        assert row['top1_after_finetune']['std'] == 0.0 and row['mac_ratio']['max'] <= 0.7 + 1e-9
    (goal,) = data['goals']
    assert goal['best_method'] in QUICK_METHODS and isinstance(goal['amap_is_best'], bool)
    md = out.with_suffix('.md').read_text()
    for method in QUICK_METHODS:
        assert f'| {method} |' in md
    assert 'torch-pruning' in md and 'mean ± sample std' in md

    # a second invocation reuses every finished run (an interrupted benchmark continues where it stopped)
    again, _ = _run(out, work)
    assert all(r['reused'] for r in again['runs'])
    assert {r['method']: r['top1'] for r in again['runs']} == {m: r['top1'] for m, r in runs.items()}
    # --collect gathers what finished and starts nothing: a method never run is listed as not run
    collected, _ = _run(tmp_path / 'collected.json', work, '--methods', 'amap', 'magnitude', 'random', '--collect')
    assert {r['method'] for r in collected['runs']} == {'amap', 'magnitude'}
    assert collected['meta']['not_run'] == [{'base': 'quick_timm_deit', 'target': 0.7, 'method': 'random', 'seed': 0}]
    assert collected['meta']['complete'] is False and not (work / 'quick_timm_deit' / 't0.7' / 'random').exists()
    assert 'Not run' in (tmp_path / 'collected.md').read_text()
