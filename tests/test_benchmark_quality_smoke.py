"""Smoke test of benchmarks/quality.py: --quick runs as a user runs it (a subprocess, on the embedded digits data)
and must write JSON + Markdown with every method at the MAC target (``unpruned`` at a MAC ratio of 1), top-1 values
that are percentages, a curve of top-1 against optimizer steps per run and its plot, and reuse finished runs when run
again.

Accuracies are never compared between methods here (a few dozen steps decide nothing); only that each was measured.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUICK_METHODS = {'amap', 'magnitude', 'torch_pruning_magnitude', 'unpruned'}
PRUNED = QUICK_METHODS - {'unpruned'}


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
    for method, r in ((m, runs[m]) for m in PRUNED):
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

    # unpruned: the base fine-tuned with the same budget, one run for every target
    ref = runs['unpruned']
    assert ref['macs']['ratio'] == 1.0 and ref['macs']['after'] == ref['macs']['before']
    assert ref['params']['after'] == ref['params']['before']
    assert ref['top1']['after_surgery'] == ref['top1']['before'] and _percent(ref['top1']['after_finetune'])
    assert ref['budget']['finetune_epochs'] == budget['baseline_finetune_epochs']
    assert Path(ref['folder']).parent.parent.name == 'quick_timm_deit'  # not under a target

    # curves: top-1 against optimizer steps since the unpruned model, at the cut and every curve point
    assert budget['curve_epochs'] == [0.25, 1.0, 3.0, 5.0]
    steps_per_epoch = 30  # 960 images in batches of 32
    for method, r in runs.items():
        curve = r['curve']
        steps = [q['steps'] for q in curve]
        assert steps == sorted(set(steps)) and len(steps) >= 2, (method, steps)
        assert all(q['epochs'] == q['steps'] / steps_per_epoch and _percent(q['top1']) for q in curve), curve
        cut = r['budget']['search_epochs'] * steps_per_epoch  # AMAP's first point is its cut, after the search
        assert steps[0] == cut and curve[0]['top1'] == r['top1']['after_surgery'], (method, curve[0])
        assert steps[1:] == [round(e * steps_per_epoch) for e in budget['curve_epochs'] if e * steps_per_epoch > cut]
        assert curve[-1]['epochs'] == budget['curve_epochs'][-1]  # the last point ends the budget
        assert curve[-1]['top1'] == r['top1']['after_finetune'], (method, curve[-1])
    assert len(runs['amap']['curve']) == 2 and len(runs['magnitude']['curve']) == 5

    rows = {r['method']: r for r in data['rows']}
    assert set(rows) == QUICK_METHODS
    for method, row in rows.items():
        assert row['seeds'] == [0]
        assert row['top1_after_finetune']['mean'] == runs[method]['top1']['after_finetune']
        assert row['top1_after_finetune']['std'] == 0.0
        assert row['mac_ratio']['max'] <= (1.0 if method == 'unpruned' else 0.7 + 1e-9)
        assert [(q['steps'], q['top1']['mean']) for q in row['curve']] == \
            [(q['steps'], q['top1']) for q in runs[method]['curve']]
    (goal,) = data['goals']
    assert goal['best_method'] in PRUNED and isinstance(goal['amap_is_best'], bool)  # unpruned is no competitor
    assert goal['unpruned_finetuned_top1'] == runs['unpruned']['top1']['after_finetune']
    assert isinstance(goal['within_0.5_of_unpruned_finetuned'], bool)
    # the cuts' overlap with AMAP's, from the kept channels every pruned run reports (not carried in the runs)
    overlap = {r['method']: r for r in data['overlap']}
    assert set(overlap) == {'amap', 'magnitude'}  # Torch-Pruning's and unpruned's reports name no kept channels
    assert overlap['amap']['same_seed']['mean'] == 1.0 and overlap['amap']['other_seeds'] is None
    assert 0 < overlap['magnitude']['same_seed']['mean'] < 1
    assert all('structure' not in r for r in data['runs'])
    md = out.with_suffix('.md').read_text()
    assert "How much each cut shares with AMAP's" in md
    # the plot of the curves, beside the results and linked from the Markdown
    (plot,) = data['plots']
    png = out.parent / 'quality_quick_quick_timm_deit_t0.7.png'
    assert plot['png'] == png.name and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000
    assert f'({png.name})' in md and '150 steps' in md
    for method in QUICK_METHODS:
        assert f'| {method} |' in md
    assert 'torch-pruning' in md and 'mean ± sample std' in md

    # a second invocation reuses every finished run (an interrupted benchmark continues where it stopped)
    again, _ = _run(out, work)
    assert all(r['reused'] for r in again['runs'])
    assert {r['method']: r['top1'] for r in again['runs']} == {m: r['top1'] for m, r in runs.items()}
    # committed records: another machine, without the work folder and with the base elsewhere, reuses every run
    records = tmp_path / 'records'
    recorded, _ = _run(tmp_path / 'recorded.json', work, '--records', str(records))
    assert all(r['reused'] for r in recorded['runs'])  # finished before --records: recorded without re-running
    rec = json.loads((records / 'quick_timm_deit' / 't0.7' / 'amap' / 'seed0.json').read_text())
    assert rec['structure'] and 'base' not in rec['settings'] and len(rec['settings']['base_sha256']) == 64
    assert (records / 'quick_timm_deit' / 'unpruned' / 'seed0.json').is_file()  # no target: one record per seed
    moved_base = tmp_path / 'elsewhere' / 'base'
    shutil.copytree(work / 'quick_base_digits_e8', moved_base)
    moved, _ = _run(tmp_path / 'moved.json', tmp_path / 'empty_work', '--bases', f'quick_timm_deit={moved_base}',
                    '--records', str(records), '--collect')
    assert moved['meta']['complete'] is True and all(r['reused'] for r in moved['runs'])
    assert moved['overlap'] == data['overlap']  # the records carry every cut's kept channels
    # a work folder whose run is of other settings (an older default) does not hide the record of today's settings
    marker = work / 'quick_timm_deit' / 't0.7' / 'amap' / 'seed0' / 'benchmark.json'
    stale = json.loads(marker.read_text())
    stale['settings']['seed'] = 99
    marker.write_text(json.dumps(stale))
    shadowed, _ = _run(tmp_path / 'shadowed.json', work, '--records', str(records), '--collect')
    assert shadowed['meta']['complete'] is True
    assert {r['method']: r['top1'] for r in shadowed['runs']} == {m: r['top1'] for m, r in runs.items()}
    stale['settings']['seed'] = 0
    marker.write_text(json.dumps(stale))
    assert {r['method']: r['top1'] for r in moved['runs']} == {m: r['top1'] for m, r in runs.items()}
    # --collect gathers what finished and starts nothing: a method never run is listed as not run
    collected, _ = _run(tmp_path / 'collected.json', work, '--methods', 'amap', 'magnitude', 'random', '--collect')
    assert {r['method'] for r in collected['runs']} == {'amap', 'magnitude'}
    assert collected['meta']['not_run'] == [{'base': 'quick_timm_deit', 'target': 0.7, 'method': 'random', 'seed': 0}]
    assert collected['meta']['complete'] is False and not (work / 'quick_timm_deit' / 't0.7' / 'random').exists()
    assert 'Not run' in (tmp_path / 'collected.md').read_text()


def test_curve_epochs_set_the_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a folder of scripts, importable from the repo root
    from benchmarks.quality import parse_args
    quick = parse_args(['--quick'])
    assert quick.curve_epochs == [0.25, 1.0, 3.0, 5.0] and quick.search_epochs + quick.finetune_epochs == 5
    default = parse_args(['--data', 'x'])  # the half-epoch search `amap prune` runs, 6 epochs of steps in all
    assert (default.search_epochs, default.finetune_epochs, default.curve_epochs) == (0.5, 5.5, [0.25, 1.0, 3.0, 6.0])
    with pytest.raises(SystemExit):  # every method's budget is a whole number of epochs
        parse_args(['--data', 'x', '--finetune-epochs', '2'])
    args = parse_args(['--data', 'x', '--search-epochs', '1', '--curve-epochs', '0.5,2,4'])
    assert args.curve_epochs == [0.5, 2.0, 4.0] and args.finetune_epochs == 3
    for bad in (['--curve-epochs', '1,2.5'], ['--curve-epochs', '3,1'], ['--curve-epochs', '0.5'],
                ['--curve-epochs', '1,4', '--finetune-epochs', '2']):
        with pytest.raises(SystemExit):
            parse_args(['--data', 'x', '--search-epochs', '1', *bad])


def test_a_changed_method_default_is_part_of_a_runs_settings(tmp_path, monkeypatch):
    """A record made under other method defaults is never reused: the effective options that differ from those under
    the recorded defaults (new fields included) enter the settings of a pipeline method's run; nothing enters when
    none differ, when the method sets the option itself, or when a baseline criterion does not use it."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import quality
    today = quality.method_defaults()
    assert today['search.gate'] in ('binary', 'ramp') and 'search.lr' in today and 'similarity' in today
    recorded = tmp_path / 'defaults.json'
    recorded.write_text(json.dumps(today))
    assert quality.defaults_changed({}, recorded) == {}
    older = {k: v for k, v in today.items() if k != 'indicator_init'}
    older['search.indicator_lr'] = 0.5
    older['calib_batches'] = 99
    recorded.write_text(json.dumps(older))
    changed = {'indicator_init': today['indicator_init'], 'search.indicator_lr': today['search.indicator_lr'],
               'calib_batches': today['calib_batches']}
    assert quality.defaults_changed({}, recorded) == changed
    assert quality.defaults_changed({'indicator_lr': 0.3}, recorded) == {  # set by the method: the same both times
        k: v for k, v in changed.items() if k != 'search.indicator_lr'}
    assert quality.defaults_changed({'criterion': 'taylor'}, recorded) == {'calib_batches': today['calib_batches']}
    monkeypatch.setattr(quality, 'defaults_changed', functools.partial(quality.defaults_changed, recorded=recorded))
    base = ROOT / 'benchmarks' / 'bases' / 'flatten_deit_micro' / 'probe_e40'  # any trained base
    assert quality._settings(base, 0.5, 'amap', 0, {}, {})['defaults_changed'] == changed
    assert 'defaults_changed' not in quality._settings(base, 0.5, 'unpruned', 0, {}, {})  # not a pipeline run


def test_a_recorded_auto_trim_counts_as_the_trim_it_ran(tmp_path, monkeypatch):
    """Records made while ``trim_rank='auto'`` was the default ran the trim per MAC under a MAC target and by score
    under a latency target: the first differ from today's default trim by score (never reused as ``amap``, reused as
    ``amap_rank_cost``), the second do not."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import quality
    today = quality.method_defaults()
    assert today['trim_rank'] == 'score'
    recorded = tmp_path / 'defaults.json'
    recorded.write_text(json.dumps({**today, 'trim_rank': 'auto'}))
    assert quality.defaults_changed({}, recorded) == {'trim_rank': 'score'}
    assert quality.defaults_changed(quality.METHODS['amap_rank_cost'], recorded) == {}
    assert quality.defaults_changed(quality.METHODS['amap_rank_score'], recorded) == {}
    assert quality.defaults_changed({'resource': 'latency'}, recorded) == {}
    assert quality.defaults_changed({'criterion': 'taylor'}, recorded) == {}  # a criterion's cut ignores trim_rank


def test_structure_overlap_is_the_jaccard_index_of_the_kept_channels(monkeypatch):
    """Against the amap run of the same seed, and of every other seed (the yardstick of what a seed changes)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.quality import structure_overlap

    def run(method: str, seed: int, mlp: list[int], qk: list[list[int]]) -> dict:
        structure = [{'module': 'blocks.0.attn', 'indices': {'qk': qk}},
                     {'module': 'blocks.0.mlp', 'indices': {'mlp': [mlp]}}]
        return {'base': 'b', 'target': 0.5, 'method': method, 'seed': seed, 'structure': structure}

    runs = [run('amap', 0, [0, 1, 2, 3], [[0], [1]]), run('amap', 1, [0, 1, 2, 4], [[0], [1]]),
            run('taylor', 0, [0, 1, 4, 5], [[0], [0]]),  # head 1 keeps channel 0, not channel 1: a different channel
            {'base': 'b', 'target': 0.5, 'method': 'unpruned', 'seed': 0}]  # nothing cut: no row
    rows = {r['method']: r for r in structure_overlap(runs)}
    assert set(rows) == {'amap', 'taylor'}
    assert rows['amap']['same_seed']['mean'] == 1.0 and rows['amap']['other_seeds']['mean'] == pytest.approx(5 / 7)
    assert rows['taylor']['same_seed']['mean'] == pytest.approx(3 / 9)  # {0,1 mlp; head 0's 0} of 9 channels
    assert rows['taylor']['other_seeds']['mean'] == pytest.approx(4 / 8) and rows['taylor']['seeds'] == [0]


def test_goals_say_when_a_lead_beyond_the_std_would_need_to_beat_the_unpruned_model(monkeypatch):
    """The least AMAP must reach to lead beyond the std is the best other method's mean plus its std; when that is
    not below the unpruned model fine-tuned with the same budget, the pair cannot be won by a better structure."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.quality import goals

    def row(method: str, target: float, mean: float, std: float) -> dict:
        return {'base': 'b', 'target': target, 'method': method, 'top1_before': {'mean': 82.0},
                'top1_after_finetune': {'mean': mean, 'std': std}}

    rows = [row('amap', 0.5, 79.0, 0.3), row('taylor', 0.5, 79.1, 0.4), row('unpruned', 0.5, 80.5, 0.1),
            row('amap', 0.7, 80.7, 0.3), row('taylor', 0.7, 80.8, 0.3), row('unpruned', 0.7, 80.5, 0.1)]
    by_target = {g['target']: g for g in goals(rows)}
    assert by_target[0.5]['lead_needs'] == pytest.approx(79.5) and by_target[0.5]['lead_reachable']
    assert by_target[0.7]['lead_needs'] == pytest.approx(81.1) and not by_target[0.7]['lead_reachable']
    assert by_target[0.7]['runner_up'] == 'taylor' and by_target[0.7]['margin'] == pytest.approx(-0.1)
