"""Does a pruned model really run faster? CPU latency and throughput of unpruned vs pruned models, side by side.

For every model: the unpruned model (random weights) and copies pruned with ``criterion='magnitude'`` to each MAC
target (70% and 50% by default; the structure, not the weights, decides the speed), each run in torch eager mode
(``torch.inference_mode``) and in onnxruntime (``torch.onnx.export(..., dynamo=False)``, dynamic batch, CPU
provider, ``intra_op_num_threads`` = the torch threads). Latencies at batch 1 and batch 32 are medians of rounds in
which all variants are timed in turn (warm-up excluded, order rotating), so the unpruned/pruned ratio compares runs
taken under the same machine load. Throughput is batch / latency at the large batch.

Reported per model and target: MAC ratio, parameters, median wall latencies and CPU times (process CPU time per call,
which other jobs on a shared machine cannot steal), speed-up (unpruned / pruned) and the ratios pruned / unpruned
(medians of the per-round ratios) against the MAC ratio; the goal (issue 5) is a latency ratio <= 1.1 x the MAC
ratio, judged on CPU time (``goal_met``; ``goal_met_wall`` on wall time). ``--profile`` adds the operators that
dominate eager latency of the unpruned and the most pruned model (torch.profiler, self CPU time).

Usage::

    python benchmarks/speed.py --out benchmarks/results/speed.json          # small + full-size models (~20-30 min)
    python benchmarks/speed.py --quick --out /tmp/speed.json                # small models, batch 1 and 8 (minutes)
    python benchmarks/speed.py --models flatten_swin_tiny --threads 2 --profile --out /tmp/swin.json
    python benchmarks/speed.py --channel-multiples 1 8 --out /tmp/aligned.json       # exact vs aligned widths
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ''):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from amap.macs import count_macs, count_params  # noqa: E402
from amap.prune.api import prune  # noqa: E402
from benchmarks.common import (  # noqa: E402
    FULL_MODELS,
    SMALL_MODELS,
    build_model,
    command_line,
    interleaved,
    loadavg,
    machine_info,
    markdown_table,
    random_loader,
    write_results,
)

GOAL = 1.1  # latency ratio <= GOAL * MAC ratio


def _variants(name: str, targets: list[float], multiples: tuple[int, ...] = (1,)) -> tuple[
        dict[str, torch.nn.Module], dict[str, dict], int]:
    """The unpruned model and one magnitude-pruned copy per target and channel multiple (key ``'50%'``, or
    ``'50%/x8'`` for widths rounded to multiples of 8), with their MACs and parameters."""
    base, side = build_model(name)
    size = (3, side, side)
    macs0 = count_macs(base, size).total
    models = {'unpruned': base}
    info = {'unpruned': {'target': 1.0, 'macs': int(macs0), 'mac_ratio': 1.0, 'params': count_params(base)}}
    loader = random_loader(2, side, 1)
    for t in targets:
        for multiple in multiples:
            t0 = time.perf_counter()
            result = prune(copy.deepcopy(base), loader, t, criterion='magnitude', calib_batches=1, input_size=size,
                           channel_multiple=multiple)
            key = f'{round(100 * t)}%' + (f'/x{multiple}' if multiple > 1 else '')
            models[key] = result.model.eval()
            info[key] = {'target': t, 'channel_multiple': multiple, 'macs': result.macs_after,
                         'mac_ratio': result.ratio, 'params': result.params_after,
                         'prune_seconds': round(time.perf_counter() - t0, 2)}
    return models, info, side


def _ort_sessions(models: dict[str, torch.nn.Module], side: int, threads: int, folder: Path) -> tuple[dict, dict]:
    """Export every variant to ONNX (dynamic batch) and open an onnxruntime session; also the max abs difference
    between onnxruntime and eager outputs on a batch of 2 (a wrong export would make its timing meaningless)."""
    import onnxruntime as ort
    sessions, diffs = {}, {}
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    for key, model in models.items():
        path = folder / f'{key.strip("%")}.onnx'
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(model, (x,), str(path), input_names=['images'], output_names=['logits'],
                              dynamic_axes={'images': {0: 'batch'}}, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), opts, providers=['CPUExecutionProvider'])
        (out,) = sess.run(None, {'images': x.numpy()})
        with torch.inference_mode():
            diffs[key] = float((torch.from_numpy(out) - model(x)).abs().max())
        sessions[key] = sess
    return sessions, diffs


def _calls(models: dict, sessions: dict, backend: str, x: torch.Tensor) -> dict[str, Any]:
    if backend == 'eager':
        def eager(m):
            def run():
                with torch.inference_mode():
                    m(x)
            return run
        return {k: eager(m) for k, m in models.items()}
    xn = x.numpy()
    return {k: (lambda s=s: s.run(None, {'images': xn})) for k, s in sessions.items()}


def _reps_for(fn, sample_seconds: float) -> int:
    """Calls per timing sample so that one sample lasts about ``sample_seconds`` (one untimed probe call)."""
    t0 = time.perf_counter()
    fn()
    return max(1, math.ceil(sample_seconds / max(time.perf_counter() - t0, 1e-6)))


def _op_times(model: torch.nn.Module, x: torch.Tensor, calls: int = 3) -> dict[str, float]:
    """Self CPU milliseconds per operator and forward (mean of ``calls`` eager forwards, after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in prof.key_averages() if e.self_cpu_time_total > 0}


def _profile(base: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, top: int = 10) -> dict[str, Any]:
    """Which operators dominate eager latency and how much each shrinks: the ``top`` operators by unpruned self
    CPU time, with their pruned time and ratio (pruned and unpruned profiled alternately, twice, medians)."""
    runs = [(_op_times(base, x), _op_times(pruned, x)) for _ in range(2)]
    ops = set().union(*(set(a) | set(b) for a, b in runs))
    med = {op: (statistics.median(a.get(op, 0.0) for a, _ in runs), statistics.median(b.get(op, 0.0) for _, b in runs))
           for op in ops}
    total_u, total_p = sum(u for u, _ in med.values()), sum(p for _, p in med.values())
    rows = sorted(med.items(), key=lambda kv: -kv[1][0])[:top]
    return {'batch': x.shape[0], 'total_ms_unpruned': round(total_u, 3), 'total_ms_pruned': round(total_p, 3),
            'ops': [{'op': op, 'ms_unpruned': round(u, 3), 'ms_pruned': round(p, 3),
                     'share_unpruned': round(u / total_u, 4), 'ratio': round(p / u, 3) if u else None}
                    for op, (u, p) in rows]}


def measure(name: str, targets: list[float], batches: list[int], backends: list[str], threads: int,
            settings: dict[str, Any], do_profile: bool, multiples: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """All timings of one model: ``{'model', 'input', 'variants': {...}, 'timings': [...], ...}``."""
    t_start = time.perf_counter()
    models, info, side = _variants(name, targets, multiples)
    row: dict[str, Any] = {'model': name, 'input': [3, side, side], 'variants': info, 'timings': []}
    with tempfile.TemporaryDirectory(prefix='amap-speed-') as tmp:
        sessions: dict = {}
        if 'ort' in backends:
            sessions, diffs = _ort_sessions(models, side, threads, Path(tmp))
            row['ort_max_abs_diff'] = diffs
        big = side >= 128
        for batch in batches:
            x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
            for backend in backends:
                fns = _calls(models, sessions, backend, x)
                reps = _reps_for(fns['unpruned'], settings['sample_seconds'])
                rounds = settings['rounds_big' if big else 'rounds']
                res = interleaved(fns, rounds=rounds, reps=reps, warmup=1 if big else settings['warmup'],
                                  budget=settings['budget'], min_rounds=min(3, rounds))
                stats = res['stats']
                base, base_cpu = stats['unpruned']['samples'], stats['unpruned']['cpu']['samples']
                entry = {'batch': batch, 'backend': backend, 'reps_per_sample': reps, 'rounds': res['rounds'],
                         'loadavg_1min': res['loadavg_1min'], 'variants': {}}
                for key, st in stats.items():
                    mac_ratio = info[key]['mac_ratio']
                    wall = statistics.median(s / b for s, b in zip(st['samples'], base))
                    cpu = statistics.median(s / b for s, b in zip(st['cpu']['samples'], base_cpu))
                    entry['variants'][key] = {
                        'latency_ms': st['median'] * 1e3, 'latency_q1_ms': st['q1'] * 1e3,
                        'latency_q3_ms': st['q3'] * 1e3, 'samples_ms': [s * 1e3 for s in st['samples']],
                        'cpu_ms': st['cpu']['median'] * 1e3, 'cpu_samples_ms': [s * 1e3 for s in st['cpu']['samples']],
                        'throughput_ips': batch / st['median'], 'cpu_throughput_ips': batch / st['cpu']['median'],
                        'latency_ratio': wall, 'cpu_ratio': cpu,
                        'latency_ratio_of_medians': st['median'] / stats['unpruned']['median'],
                        'speedup': 1.0 / wall, 'cpu_speedup': 1.0 / cpu, 'mac_speedup': 1.0 / mac_ratio,
                        'goal_met': bool(cpu <= GOAL * mac_ratio) if key != 'unpruned' else None,
                        'goal_met_wall': bool(wall <= GOAL * mac_ratio) if key != 'unpruned' else None,
                    }
                row['timings'].append(entry)
                print(f'{name} b{batch} {backend}: ' + ', '.join(
                    f"{k} {v['latency_ms']:.2f} ms (x{v['latency_ratio']:.2f}, CPU x{v['cpu_ratio']:.2f} vs MACs "
                    f"x{info[k]['mac_ratio']:.2f})"
                    for k, v in entry['variants'].items()) + f' load {loadavg()[:1]}', file=sys.stderr, flush=True)
        if do_profile:
            last = list(models)[-1]
            xb = torch.randn(max(batches), 3, side, side)
            row['profile'] = {'pruned': last, **_profile(models['unpruned'], models[last], xb)}
    row['seconds'] = round(time.perf_counter() - t_start, 1)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = ['model', 'target', 'MAC ratio', 'params (M)', 'backend']
    batches = sorted({t['batch'] for r in rows for t in r['timings']})
    for b in batches:
        head += [f'b{b} ms', f'b{b} CPU ms', f'b{b} ratio', f'b{b} CPU ratio', f'b{b} speed-up (CPU)']
    big = max(batches)
    head += [f'b{big} img/s', f'goal: CPU ratio <= {GOAL} x MAC ratio']
    lines = []
    for r in rows:
        backends = list(dict.fromkeys(t['backend'] for t in r['timings']))
        for backend in backends:
            by_batch = {t['batch']: t for t in r['timings'] if t['backend'] == backend}
            for key, v in r['variants'].items():
                cells = [r['model'], key if key == 'unpruned' else f'{key} MACs', f"{v['mac_ratio']:.3f}",
                         f"{v['params'] / 1e6:.3f}", backend]
                goals = []
                for b in batches:
                    t = by_batch[b]['variants'][key]
                    cells += [f"{t['latency_ms']:.2f}", f"{t['cpu_ms']:.2f}", f"{t['latency_ratio']:.3f}",
                              f"{t['cpu_ratio']:.3f}", f"{t['cpu_speedup']:.2f}x"]
                    if t['goal_met'] is not None:
                        goals.append(f"b{b} {'yes' if t['goal_met'] else 'NO'}")
                cells += [f"{by_batch[big]['variants'][key]['throughput_ips']:.1f}", ', '.join(goals)]
                lines.append(cells)
    text = [f"CPU: {meta['machine']['cpu']}, {meta['machine']['torch_threads']} thread(s) (torch and onnxruntime), "
            f"load average {meta['machine']['loadavg_start']} at start, {meta['loadavg_end']} at end; "
            f"{meta['machine']['date']}; torch {meta['machine']['torch']}, onnxruntime "
            f"{meta['machine'].get('onnxruntime')}.",
            '', f"Command: `{meta['command']}`", '',
            'ms: median wall-clock latency over interleaved rounds (warm-up excluded); CPU ms: median process CPU time '
            'per call (what other jobs on a shared machine cannot steal; with 1 thread, the latency of an idle core); '
            'ratio = pruned / unpruned (median of per-round ratios); speed-up = 1 / CPU ratio. Random weights, pruned '
            'with magnitude. img/s: wall-clock throughput at the largest batch.', '',
            markdown_table(head, lines, left=2)]
    for r in rows:
        prof = r.get('profile')
        if prof:
            text += ['', f"{r['model']}, eager batch {prof['batch']}, unpruned -> {prof['pruned']} MACs: profiled "
                     f"total {prof['total_ms_unpruned']:.1f} -> {prof['total_ms_pruned']:.1f} ms (x"
                     f"{prof['total_ms_pruned'] / prof['total_ms_unpruned']:.2f}, MACs x"
                     f"{r['variants'][prof['pruned']]['mac_ratio']:.2f}); top ops (share of unpruned time, "
                     'pruned/unpruned): '
                     + ', '.join(f"{o['op'].removeprefix('aten::')} {100 * o['share_unpruned']:.0f}% x{o['ratio']}"
                                 for o in prof['ops'][:8])]
    return '\n'.join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='benchmarks/results/speed.json', help='JSON file (and .md beside it)')
    parser.add_argument('--quick', action='store_true', help='small models, batch 1 and 8, few rounds')
    parser.add_argument('--models', nargs='+', default=None, help='model names (default: small + full-size)')
    parser.add_argument('--targets', nargs='+', type=float, default=[0.7, 0.5], help='MAC ratios to prune to')
    parser.add_argument('--batches', nargs='+', type=int, default=None, help='batch sizes (default 1 32; quick 1 8)')
    parser.add_argument('--backends', nargs='+', choices=['eager', 'ort'], default=['eager', 'ort'])
    parser.add_argument('--threads', type=int, default=1,
                        help='torch/onnxruntime intra-op threads (default 1: on cores shared with other jobs, more '
                             'threads time the OS scheduler, as every parallel op waits for its slowest thread)')
    parser.add_argument('--profile', action='store_true', help='top operators of the unpruned and most pruned model')
    parser.add_argument('--channel-multiples', nargs='+', type=int, default=[1], metavar='N',
                        help='also prune with widths rounded to multiples of N (e.g. 1 8: exact and aligned)')
    args = parser.parse_args(argv)
    threads = args.threads
    torch.set_num_threads(threads)
    names = args.models or (SMALL_MODELS if args.quick else SMALL_MODELS + FULL_MODELS)
    batches = args.batches or ([1, 8] if args.quick else [1, 32])
    if args.quick:
        settings = {'rounds': 5, 'rounds_big': 3, 'sample_seconds': 0.05, 'warmup': 2, 'budget': 10.0}
    else:
        settings = {'rounds': 15, 'rounds_big': 7, 'sample_seconds': 0.3, 'warmup': 2, 'budget': 60.0}
    meta: dict[str, Any] = {'machine': machine_info(threads), 'command': command_line('speed.py', argv),
                            'quick': args.quick, 'targets': args.targets, 'batches': batches, 'settings': settings,
                            'goal': f'latency ratio <= {GOAL} x MAC ratio', 'criterion': 'magnitude',
                            'channel_multiples': args.channel_multiples}
    rows, failed = [], []

    def write(done: bool) -> str:
        meta['loadavg_end'] = loadavg()
        meta['complete'] = done
        table = markdown(rows, meta) if rows else 'no model measured'
        if not done:
            table = '**Partial results: the run is unfinished or was interrupted.**\n\n' + table
        write_results(args.out, {'meta': meta, 'rows': rows, 'failed': failed}, table)
        return table

    for name in names:
        try:
            rows.append(measure(name, args.targets, batches, args.backends, threads, settings, args.profile,
                                tuple(args.channel_multiples)))
        except Exception as err:  # one broken model must not hide the others; it is reported and fails the run
            failed.append({'model': name, 'error': f'{type(err).__name__}: {err}'.splitlines()[0]})
            print(f'{name}: FAILED {failed[-1]["error"]}', file=sys.stderr, flush=True)
        write(done=False)  # after every model: an interrupted run keeps what it measured
    table = write(done=True)
    print(table)
    for f in failed:
        print(f"\nFAILED {f['model']}: {f['error']}")
    return 1 if failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
