"""Top-1 at equal *measured* latency (``quality.py --equal-latency S --latency-batch B``): a latency target against
MAC targets matched to the latency it measured.

Per base and seed, three arms of the AMAP pipeline, each with the budget of every AMAP run of ``quality.py`` (same
search epochs, fine-tune epochs, curve points, distillation):

* ``latency``: ``resource='latency'`` at ``1 / S`` of the unpruned model's latency at batch ``B``, 1 thread (method
  ``amap_latency_b<B>``; its calibration is cached, ``~/.cache/amap/latency``, and reused by every seed and run);
* ``macs``: a MAC target (method ``amap``) matched to the latency arm's measured latency;
* ``macs_multiple8``: the same with ``channel_multiple`` 8 (method ``amap_multiple8``).

Matching: each candidate MAC target is run to its cut (search + cut + one fine-tune step,
:func:`benchmarks.quality.run_to_cut`), its cut model timed interleaved with the latency arm's cut model and the
unpruned base (1 thread, process CPU time, a low percentile per model, the split-half spread as its noise); the
first candidate is the latency arm's MAC ratio, the next ones step by the measured latency ratio (``t / q``) until a
faster and a slower candidate bracket the latency arm, then interpolate linearly between the closest pair. A
measurement noisier than :data:`MATCH_TOL` is taken again (at most :data:`RETIME` times; the quietest counts). It
stops when a candidate is within :data:`MATCH_TOL` of the latency arm by a measurement no noisier than that, or
after ``--match-probes`` candidates; the closest is kept and continued to the end of the budget (its run folder resumes:
only the rejected candidates' searches are extra work). Every candidate is recorded.

After the fine-tunes, the three cut models and the unpruned base are timed once more, together (``MEASURE_ROUNDS``
interleaved rounds): the table reports that measured latency ratio per arm (mean over seeds, the largest split-half
noise) and its latency relative to the latency arm's, flagged when they differ by more than :data:`MATCH_TOL` and
the noise, beside top-1 (mean ± sample std over seeds): a reader sees whether the arms really are at equal measured
latency (on a loaded machine two measurements of the same models can differ by more than either's split-half
noise says).

Resumable like the rest of ``quality.py``: the runs are its runs (reused or continued), and the matching and the
measurements of each (base, seed) are kept in ``eqlat_s<S>_b<B>/seed<N>.json`` (under ``--records`` when given, else
the work folder) and reused when their settings are unchanged.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from amap.utils.io import atomic_write_json, read_json

ARMS = {'latency': None, 'macs': 'amap', 'macs_multiple8': 'amap_multiple8'}  # arm -> method (None: latency target)
MATCH_TOL = 0.02  # a MAC arm within 2% of the latency arm's measured latency (or within the noise) is matched
MATCH_ROUNDS = 15  # interleaved rounds of a matching measurement
RETIME = 2  # a matching measurement noisier than MATCH_TOL is taken again, at most this many more times
MEASURE_ROUNDS = 25  # interleaved rounds of the final measurement of every arm
MAX_PROBES = 4  # candidate MAC targets per MAC arm (default of --match-probes)


def latency_method(batch: int, scale: str = 'total', trim_rank: str = 'cost', search: str = 'table') -> str:
    """The :data:`benchmarks.quality.METHODS` entry (added when missing) of a latency target at ``batch`` with
    ``resource_scale`` ``scale``, ``trim_rank`` ``trim_rank`` and ``latency_search`` ``search``."""
    from benchmarks.quality import METHODS, latency_options, latency_suffix
    name = f'amap_latency_b{batch}' + latency_suffix(scale, trim_rank, search)
    METHODS.setdefault(name, latency_options(batch, scale, trim_rank, search))
    return name


def cut_model(folder: Path) -> nn.Module:
    """The cut model of a pipeline run folder (``pruned_init``), in eval mode."""
    from amap.pipeline import PRUNED_INIT
    from amap.prune.staged import load_cut
    return load_cut(folder / PRUNED_INIT).model.eval()


def measure(models: dict[str, nn.Module], size: tuple[int, int, int], *, batch: int, rounds: int,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Latency (ms per batch of ``batch``, 1 thread, process CPU time) of each model, all timed interleaved; the
    first model is the reference: ``{name: {'ms', 'ratio' (to the first), 'noise' (split-half, the larger of the
    model's and the reference's)}}``."""
    from amap.latency.measure import Backend, interleaved, low_percentile, split_half, torch_threads
    backend = Backend('cpu', 1)
    x = torch.randn(batch, *size)
    names = list(models)
    with torch_threads(1):
        runners = [backend.runner(models[n], (x,), {}) for n in names]
        times = interleaved(runners, backend, rounds=rounds, seed=seed)
    ms = [1e3 * low_percentile(t) for t in times]
    return {n: {'ms': ms[i], 'ratio': ms[i] / ms[0], 'noise': max(split_half([times[0]]), split_half([times[i]]))}
            for i, n in enumerate(names)}


def next_target(probes: list[dict[str, Any]]) -> float:
    """The next candidate MAC target from the candidates so far (``q``: latency relative to the latency arm):
    interpolation between the closest faster and slower ones when both exist, else a step by ``1 / q``."""
    faster = [p for p in probes if p['q'] < 1]
    slower = [p for p in probes if p['q'] >= 1]
    if faster and slower:
        lo, hi = max(faster, key=lambda p: p['q']), min(slower, key=lambda p: p['q'])
        t = lo['target'] + (1 - lo['q']) * (hi['target'] - lo['target']) / (hi['q'] - lo['q'])
    else:
        best = min(probes, key=lambda p: abs(p['q'] - 1))
        t = best['target'] / best['q']
    return round(min(max(t, 0.05), 0.99), 4)


def _matched(p: dict[str, Any]) -> bool:
    """A candidate within :data:`MATCH_TOL` of the latency arm, by a measurement no noisier than that."""
    return abs(p['q'] - 1) <= MATCH_TOL and p['noise'] <= MATCH_TOL


def _noise(m: dict[str, dict[str, float]]) -> float:
    return max(m['candidate']['noise'], m['latency']['noise'])


def match_mac_target(run_cut, reference: dict[str, nn.Module], size: tuple[int, int, int], *, batch: int,
                     start: float, max_probes: int, probes: list[dict[str, Any]], save) -> float:
    """The MAC target whose cut model measures closest to ``reference['latency']`` (see the module docstring).

    Args:
        run_cut: ``run_cut(target) -> folder`` runs the MAC arm to its cut.
        reference: ``{'unpruned': base, 'latency': the latency arm's cut model}``.
        start: The first candidate (the latency arm's MAC ratio).
        max_probes: At most this many candidates.
        probes: The candidates measured before (extended in place; ``save()`` is called after each new one).
    """
    from amap.macs import count_macs
    full = count_macs(reference['unpruned'], size).total
    while not any(_matched(p) for p in probes) and len(probes) < max_probes:
        target = next_target(probes) if probes else round(start, 4)
        if any(p['target'] == target for p in probes):
            break  # the step leads back to a candidate measured already
        model = cut_model(run_cut(target))
        models = {**reference, 'candidate': model}
        m = measure(models, size, batch=batch, rounds=MATCH_ROUNDS, seed=len(probes))
        for retime in range(1, RETIME + 1):  # a noisy machine: time again, keep the quietest measurement
            if _noise(m) <= MATCH_TOL:
                break
            m = min(m, measure(models, size, batch=batch, rounds=MATCH_ROUNDS, seed=len(probes) + 100 * retime),
                    key=_noise)
        probes.append({'target': target, 'mac_ratio': count_macs(model, size).total / full,
                       'q': m['candidate']['ms'] / m['latency']['ms'], 'measured_ratio': m['candidate']['ratio'],
                       'latency_arm_ratio': m['latency']['ratio'],
                       'noise': _noise(m)})
        save()
    return min(probes, key=lambda p: abs(p['q'] - 1))['target']


def run_seed(args: argparse.Namespace, base_name: str, base: Path, seed: int, data: dict[str, Any]) -> dict[str, Any]:
    """Match, fine-tune and measure the three arms of one (base, seed); returns ``{'arms': {arm: run summary with
    'target', 'measured'}, 'match': {arm: candidates}}``."""
    from amap.macs import count_macs
    from amap.train import load_trained
    from amap.utils.runfolder import file_digest
    from benchmarks.quality import _budget, _portable, _settings, latency_suffix, one_run, run_to_cut
    s, batch = args.equal_latency, args.latency_batch
    lat_opts = (args.latency_scale, args.latency_trim_rank, args.latency_search)
    lat = latency_method(batch, *lat_opts)
    size = (3, data['img_size'], data['img_size'])
    tag = f'eqlat_s{s:g}_b{batch}' + latency_suffix(*lat_opts)
    doc_path = (Path(args.records) if args.records else Path(args.work_dir).expanduser()) / base_name / tag / \
        f'seed{seed}.json'
    settings = {'speedup': s, 'batch': batch, 'max_probes': args.match_probes, 'match_tol': MATCH_TOL,
                'retime': RETIME, 'match_rounds': MATCH_ROUNDS,
                'base_sha256': file_digest(base),  # the runs' settings but their targets (the matching's result)
                'runs': {arm: _portable(_settings(base, 0.0, m or lat, seed, data, _budget(args, m or lat)), None)
                         for arm, m in ARMS.items()}}
    doc = read_json(doc_path) if doc_path.is_file() else {}
    if doc.get('settings') != settings:
        doc = {'settings': settings, 'match': {}}

    def save() -> None:
        atomic_write_json(doc_path, doc)

    targets = {'latency': round(1 / s, 4)}
    if 'measured' not in doc:  # the matching needs the cut models (reused when run before)
        reference = {'unpruned': load_trained(base).eval(),
                     'latency': cut_model(run_to_cut(args, base_name, base, targets['latency'], lat, seed, data))}
        for arm, method in ARMS.items():
            if method is None:
                continue
            rec = doc['match'].setdefault(arm, {'probes': []})
            start = doc['match'].get('latency_arm_mac_ratio')
            if start is None:
                start = doc['match']['latency_arm_mac_ratio'] = (count_macs(reference['latency'], size).total
                                                                 / count_macs(reference['unpruned'], size).total)
            rec['target'] = match_mac_target(
                lambda t, m=method: run_to_cut(args, base_name, base, t, m, seed, data), reference, size,
                batch=batch, start=start, max_probes=args.match_probes, probes=rec['probes'], save=save)
            save()
    targets.update({arm: doc['match'][arm]['target'] for arm, m in ARMS.items() if m is not None})
    runs = {arm: one_run(args, base_name, base, targets[arm], m or lat, seed, data) for arm, m in ARMS.items()}
    if 'measured' not in doc:
        models = {'unpruned': load_trained(base).eval(),
                  **{arm: cut_model(Path(runs[arm]['folder'])) for arm in ARMS}}
        doc['measured'] = measure(models, size, batch=batch, rounds=MEASURE_ROUNDS, seed=seed)
        save()
    return {'base': base_name, 'seed': seed, 'match': doc['match'],
            'arms': {arm: {**runs[arm], 'arm': arm, 'measured': doc['measured'][arm]} for arm in ARMS},
            'unpruned_ms': doc['measured']['unpruned']['ms']}


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (base, arm): targets, MAC ratio, measured latency ratio (mean over seeds, largest noise) and
    top-1 (mean ± sample std over seeds)."""
    from benchmarks.quality import _stats
    rows = []
    for base in dict.fromkeys(r['base'] for r in results):
        rs = [r for r in results if r['base'] == base]
        for arm in ARMS:
            runs = [r['arms'][arm] for r in rs]
            rows.append({'base': base, 'arm': arm, 'method': runs[0]['method'], 'seeds': [r['seed'] for r in rs],
                         'target': _stats([x['target'] for x in runs]),
                         'mac_ratio': _stats([x['macs']['ratio'] for x in runs]),
                         'measured_ratio': _stats([x['measured']['ratio'] for x in runs]),
                         'noise': max(x['measured']['noise'] for x in runs),
                         'probes': [len(r['match'][arm]['probes']) for r in rs] if arm in rs[0]['match'] else None,
                         **{f'top1_{k}': _stats([x['top1'][k] for x in runs])
                            for k in ('before', 'after_surgery', 'after_finetune')}})
    return rows


def _versus(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The row's measured latency relative to its base's latency arm (Markdown), flagged when not matched."""
    if row['arm'] == 'latency':
        return ''
    ref = next(r for r in rows if r['base'] == row['base'] and r['arm'] == 'latency')
    off = row['measured_ratio']['mean'] / ref['measured_ratio']['mean'] - 1
    return f'{off:+.1%}' + (' (NOT matched)' if abs(off) > max(MATCH_TOL, row['noise'], ref['noise']) else '')


def render(payload: dict[str, Any]) -> str:
    """The Markdown of an equal-latency benchmark."""
    from benchmarks.common import markdown_table
    from benchmarks.quality import _pm
    meta, m = payload['meta'], payload['meta']['machine']
    b = meta['budget']
    lines = ['# Quality: top-1 at equal measured latency', '', f'Command: `{meta["command"]}`', '',
             f'Date {m["date"]}; {m["cpu"]}, {m["cpu_count"]} cores; torch {m["torch"]}; commit {m.get("git_commit")};'
             f' load average at start {m["loadavg_start"]}, at end {meta["loadavg_end"]}.', '',
             f'Requested speed-up {meta["speedup"]:g}x at batch {meta["batch"]}, 1 thread, eager (latency: process '
             f'CPU time, low percentile of {MEASURE_ROUNDS} interleaved rounds with the unpruned model). Budget of '
             f'every arm: search {b["search_epochs"]} epoch(s) + fine-tune {b["finetune_epochs"]} epoch(s), '
             f'distillation from the unpruned model. Data: `{meta["data"]["data"]}` (train subset '
             f'{meta["data"].get("train_subset")}, val subset {meta["data"].get("val_subset")}). Seeds: '
             f'{meta["seeds"]}. Top-1 in %, mean ± sample std over seeds. Latency ratio: pruned / unpruned, mean over '
             'seeds (noise: the largest split-half disagreement).', '']
    head = ['base', 'arm', 'target', 'MAC ratio', 'latency ratio (measured)', 'noise', 'speed-up',
            'vs latency arm', 'top-1 after cut', 'top-1 after fine-tune', 'candidates']
    table = [[r['base'], f'{r["arm"]} (`{r["method"]}`)',
              (f'{r["target"]["mean"]:.4f} of latency' if r['arm'] == 'latency' else f'{r["target"]["mean"]:.4f} of '
               'MACs'), _pm(r['mac_ratio'], 4), _pm(r['measured_ratio'], 3), f'{r["noise"]:.1%}',
              f'{1 / r["measured_ratio"]["mean"]:.2f}x', _versus(r, payload['rows']), _pm(r['top1_after_surgery']),
              _pm(r['top1_after_finetune']), '' if r['probes'] is None else ', '.join(map(str, r['probes']))]
             for r in payload['rows']]
    lines += [markdown_table(head, table, left=2), '',
              f'"vs latency arm": the arm\'s measured latency relative to the latency arm\'s (same measurement); '
              f'"NOT matched" when it is off by more than {MATCH_TOL:.0%} and its noise.', '']
    lines += ['Matching (per seed): each candidate MAC target run to its cut and timed against the latency arm '
              '(q: its latency / the latency arm\'s, same measurement).', '']
    for r in payload['results']:
        for arm, rec in r['match'].items():
            if isinstance(rec, dict):
                lines.append(f'- {r["base"]} seed {r["seed"]} {arm}: ' + '; '.join(
                    f'target {p["target"]:.4f} (MAC ratio {p["mac_ratio"]:.4f}): q {p["q"]:.3f} ± {p["noise"]:.1%}'
                    for p in rec['probes']) + f' -> {rec["target"]:.4f}')
    closed = [(r['base'], r['seed'], r['arms']['latency'].get('latency_target')) for r in payload['results']]
    lines += ['', 'The latency arm\'s own closed loop (its report): ' + '; '.join(
        f'{b_} seed {s_}: measured {lt["measured_ratio"]:.3f} (predicted {lt["predicted_ratio"]:.3f}), {lt["verdict"]}'
        for b_, s_, lt in closed if lt) + '.', '']
    if payload['failed']:
        lines += [f'**Incomplete**: {len(payload["failed"])} (base, seed) failed; see `failed` in the JSON.', '']
    return '\n'.join(lines)


def main(args: argparse.Namespace, bases: dict[str, Path], data: dict[str, Any], meta: dict[str, Any]) -> int:
    """Run the equal-latency comparison for every base and seed; writes ``args.out`` (JSON + Markdown)."""
    import time

    from amap.errors import Interrupted
    from amap.train import read_trained_meta
    from benchmarks.common import loadavg, write_results
    from benchmarks.quality import NotRun, _log
    t0 = time.perf_counter()
    results, failed, interrupted = [], [], None
    for base_name, base in bases.items():
        base_data = {**data, 'img_size': (read_trained_meta(base) or {}).get('img_size') or data['img_size']}
        for seed in args.seeds:
            try:
                results.append(run_seed(args, base_name, base, seed, base_data))
            except NotRun as e:  # --collect: not finished
                _log(f'not run: {e}')
                failed.append({'base': base_name, 'seed': seed, 'error': f'not run: {e}'})
            except Interrupted as e:
                _log(f'interrupted: {e}; run the same command again to continue')
                interrupted = str(e)
                break
            except Exception as e:  # one broken (base, seed) must not lose the others
                _log(f'FAILED {base_name} seed {seed}: {type(e).__name__}: {e}')
                failed.append({'base': base_name, 'seed': seed, 'error': f'{type(e).__name__}: {e}'})
        if interrupted:
            break
    payload = {'meta': {**meta, 'speedup': args.equal_latency, 'batch': args.latency_batch,
                        'seconds': time.perf_counter() - t0, 'loadavg_end': loadavg(), 'seeds': args.seeds,
                        'complete': not failed and not interrupted, 'interrupted': interrupted,
                        'match': {'tolerance': MATCH_TOL, 'rounds': MATCH_ROUNDS, 'retime': RETIME,
                                  'max_probes': args.match_probes},
                        'measure_rounds': MEASURE_ROUNDS},
               'rows': aggregate(results) if results else [], 'results': results, 'failed': failed}
    json_path, md_path = write_results(args.out, payload, render(payload))
    _log(f'wrote {json_path} and {md_path} ({payload["meta"]["seconds"]:.0f} s)')
    return 130 if interrupted else (1 if failed else 0)


__all__ = ['ARMS', 'latency_method', 'cut_model', 'measure', 'next_target', 'match_mac_target', 'run_seed',
           'aggregate', 'render', 'main']
