"""Smoke test of ``benchmarks/quality.py --equal-latency``: on the ``--quick`` digits base, a few steps, the three arms
(latency target, MAC target and MAC target with ``channel_multiple`` 8 matched to the latency arm's measured latency)
must each be run with the same budget, timed, and reported; a second invocation reuses everything.

Accuracies and speeds are never compared here (a few dozen steps on a loaded machine decide nothing): only the
structure of the results.
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
SPEEDUP, BATCH, PROBES = 1.3, 8, 2


def _run(out: Path, work: Path) -> dict:
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, str(ROOT / 'benchmarks' / 'quality.py'), '--quick', '--equal-latency', str(SPEEDUP),
           '--latency-batch', str(BATCH), '--search-epochs', '1', '--curve-epochs', '1.5,2', '--match-probes',
           str(PROBES), '--work-dir', str(work), '--out', str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.with_suffix('.md').is_file()
    return json.loads(out.read_text())


def _percent(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and 0 <= x <= 100


@pytest.fixture
def equal_latency(monkeypatch):
    """benchmarks/equal_latency.py (benchmarks/ is a folder of scripts, importable from the repo root)."""
    monkeypatch.syspath_prepend(str(ROOT))
    import benchmarks.equal_latency as module
    return module


def test_equal_latency_quick(tmp_path, equal_latency):
    ARMS, MATCH_TOL = equal_latency.ARMS, equal_latency.MATCH_TOL  # noqa: N806 - the module's constants
    out, work = tmp_path / 'eqlat.json', tmp_path / 'work'
    data = _run(out, work)
    meta = data['meta']
    assert meta['complete'] is True and data['failed'] == []
    assert meta['speedup'] == SPEEDUP and meta['batch'] == BATCH and meta['seeds'] == [0]
    assert '--equal-latency 1.3' in meta['command']
    (res,) = data['results']
    arms = res['arms']
    assert set(arms) == set(ARMS) == {'latency', 'macs', 'macs_multiple8'}
    assert {a: r['method'] for a, r in arms.items()} == {
        'latency': f'amap_latency_b{BATCH}_rank_score_macs', 'macs': 'amap', 'macs_multiple8': 'amap_multiple8'}
    # the same budget for every arm, and every arm fine-tuned to its end (the curve's last point)
    budgets = [r['budget'] for r in arms.values()]
    assert all(b == budgets[0] for b in budgets) and budgets[0]['curve_epochs'] == [1.5, 2.0]
    for arm, r in arms.items():
        assert all(_percent(r['top1'][k]) for k in ('before', 'after_surgery', 'after_finetune')), (arm, r['top1'])
        assert r['curve'][-1]['epochs'] == 2.0 and r['curve'][-1]['top1'] == r['top1']['after_finetune']
        m = r['measured']  # the final measurement: every arm timed against the unpruned base, with its noise
        assert 0 < m['ratio'] < 1.5 and m['ms'] > 0 and 0 <= m['noise'] < 1, (arm, m)
        assert r['macs']['ratio'] < 1
    assert math.isclose(res['unpruned_ms'] * arms['macs']['measured']['ratio'], arms['macs']['measured']['ms'])
    # the latency arm: its target is the latency ratio, and its own closed loop measured it
    lat = arms['latency']
    assert math.isclose(lat['target'], round(1 / SPEEDUP, 4))
    assert lat['latency_target']['batch'] == BATCH and lat['latency_target']['measured_ratio'] > 0
    assert 'latency_target' not in arms['macs']
    # the MAC arms: matched by candidates run to their cut, the first at the latency arm's MAC ratio; the kept
    # target is the candidate closest to the latency arm's latency
    start = res['match']['latency_arm_mac_ratio']
    assert math.isclose(start, lat['macs']['ratio'])
    for arm in ('macs', 'macs_multiple8'):
        rec = res['match'][arm]
        probes = rec['probes']
        assert 1 <= len(probes) <= PROBES and probes[0]['target'] == round(start, 4)
        assert all(p['q'] > 0 and p['measured_ratio'] > 0 and 0 < p['mac_ratio'] < 1 for p in probes)
        assert rec['target'] == min(probes, key=lambda p: abs(p['q'] - 1))['target'] == arms[arm]['target']
        assert arms[arm]['macs']['ratio'] <= arms[arm]['target'] + 1e-9  # a MAC target: the guarantee holds
        gap = abs(arms[arm]['macs']['ratio'] - lat['macs']['ratio'])
        if rec['target'] == probes[0]['target']:  # the latency arm's own MAC ratio measured closest: the same MACs
            assert gap <= 0.01
            if len(probes) == 1:  # matched at once
                assert abs(probes[0]['q'] - 1) <= MATCH_TOL and probes[0]['noise'] <= MATCH_TOL
        else:  # the MAC ratio moved off the latency arm's to match its latency
            assert gap > 1e-3
    rows = {r['arm']: r for r in data['rows']}
    assert set(rows) == set(ARMS) and all(r['measured_ratio']['n'] == 1 for r in rows.values())
    md = out.with_suffix('.md').read_text()
    assert 'latency ratio (measured)' in md and 'amap_multiple8' in md and 'vs latency arm' in md

    # a second invocation reuses the runs, the matching and the measurement
    again = _run(out, work)
    (res2,) = again['results']
    assert all(r['reused'] for r in res2['arms'].values())
    assert res2['match'] == res['match']
    assert {a: r['measured'] for a, r in res2['arms'].items()} == {a: r['measured'] for a, r in arms.items()}


def test_the_latency_arm_may_search_on_the_prunable_ratio(equal_latency):
    """--latency-scale prunable: the latency arm is the METHODS entry the quality grid measures as a variant."""
    from benchmarks.quality import METHODS, parse_args
    assert equal_latency.latency_method(32) == 'amap_latency_b32'
    assert METHODS['amap_latency_b32'] == {'resource': 'latency', 'latency_batch': 32, 'latency_threads': 1,
                                           'trim_rank': 'cost', 'latency_search': 'table'}  # explicit, as run
    name = equal_latency.latency_method(32, 'prunable')
    assert name == 'amap_latency_b32_prunable' and METHODS[name] == {**METHODS['amap_latency_b32'],
                                                                      'resource_scale': 'prunable'}
    assert parse_args(['--data', 'x', '--equal-latency', '1.6', '--latency-scale', 'prunable']).latency_scale == \
        'prunable'
    # --latency-trim-rank score: the variant whose target guarantee ranks by score per channel
    name = equal_latency.latency_method(32, 'total', 'score')
    assert name == 'amap_latency_b32_rank_score' and METHODS[name] == {**METHODS['amap_latency_b32'],
                                                                        'trim_rank': 'score'}
    assert equal_latency.latency_method(32, 'prunable', 'score') == 'amap_latency_b32_prunable_rank_score'
    assert parse_args(['--data', 'x', '--equal-latency', '1.6', '--latency-trim-rank', 'score']).latency_trim_rank == \
        'score'
    # by default the latency arm runs the product's defaults (the MAC search, the score trim), named explicitly
    from amap.prune import PruneConfig
    args = parse_args(['--data', 'x', '--equal-latency', '1.6'])
    name = equal_latency.latency_method(32, args.latency_scale, args.latency_trim_rank, args.latency_search)
    assert name == 'amap_latency_b32_rank_score_macs'
    default, arm = PruneConfig(resource='latency'), PruneConfig(**METHODS[name])
    assert (arm.latency_search, arm.trim_by_cost) == (default.latency_search, default.trim_by_cost) == ('macs', False)


def test_next_target(equal_latency):
    next_target = equal_latency.next_target
    # one candidate: a step by its latency ratio (slower than the latency arm: fewer MACs)
    assert next_target([{'target': 0.6, 'q': 1.2}]) == 0.5
    assert next_target([{'target': 0.5, 'q': 0.8}]) == 0.625
    # a faster and a slower candidate: linear interpolation between the closest pair
    probes = [{'target': 0.6, 'q': 1.2}, {'target': 0.5, 'q': 0.9}, {'target': 0.3, 'q': 0.7}]
    assert next_target(probes) == round(0.5 + 0.1 * (0.1 / 0.3), 4)
    assert next_target([{'target': 0.1, 'q': 3.0}]) == 0.05  # clamped to a MAC target the pipeline accepts
