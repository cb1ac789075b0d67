"""What does the AMAP search cost over ordinary training? Time and peak memory of one search step vs one plain
training step, and of the calibration / initialisation phase.

Per model (random weights, 32x32 random images, batch 64 by default), each with its own copy of the same model and
the same batch, timed step by step in interleaved rounds (warm-up excluded, order rotating, medians):

* ``plain``: one training step: cross-entropy, backward, gradient clipping, AdamW (the search's weight optimiser
  and settings) -- no gates, no teacher;
* ``plain_kd``: the same plus distillation from a frozen copy (what fine-tuning with distillation costs);
* ``search_no_kd``: a search step without distillation: AMAP gates installed (indicators, similarity weights,
  head balance, reweights, straight-through masks), task + resource loss, backward, both optimisers, clamping;
* ``search``: the full search step, task + KD + resource loss: the engine's own
  :meth:`amap.prune.search.Search.train_step` (with its history record every ``log_every`` steps; the median step
  time leaves those out, the mean in the JSON includes them).

Overhead = median of the per-round ratios step time / plain step time, minus 1, in process CPU time (other jobs on
a shared machine stretch wall time, not CPU time; ``overhead_vs_plain_wall`` has the wall-time ones). Goal of issue 5:
under 15% for ``search``.

Calibration / initialisation (the amap criterion's ``prepare``), each phase on a fresh copy of the model:
``pruner`` (gates, one probe forward, MAC count), ``attn_init`` (attention difference on the first calibration
batch), ``similarity`` (channel similarity over the calibration batches), against ``eval_forward`` (plain eval
forwards over the same batches).

Peak memory: the peak of live CPU tensor bytes during a step or phase above what was live when it started, from
torch.profiler's allocator events (:func:`benchmarks.common.peak_tensor_bytes`), plus the persistent state live at
the start of the step (parameters, buffers, optimiser state, teacher, indicators; gradients count in the step).
tracemalloc does not see torch's allocator and the process RSS high-water mark (``ru_maxrss``) only rises, so
neither can isolate one step.

Usage::

    python benchmarks/cost.py --out benchmarks/results/cost.json       # 3 small models, batch 64 (~10 min)
    python benchmarks/cost.py --quick --out /tmp/cost.json             # fewer rounds, 2 calibration batches
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ''):  # run as a script: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from amap.prune.api import PruneConfig, prepare  # noqa: E402
from amap.prune.attn_init import attention_difference_init  # noqa: E402
from amap.prune.pruner import Pruner  # noqa: E402
from amap.prune.search import Search, SearchSettings, distillation_loss, task_loss  # noqa: E402
from amap.prune.similarity import calibrate_similarity  # noqa: E402
from benchmarks.common import (  # noqa: E402
    SMALL_MODELS,
    build_model,
    command_line,
    interleaved,
    loadavg,
    machine_info,
    markdown_table,
    peak_tensor_bytes,
    random_loader,
    write_results,
)

GOAL = 0.15  # search step overhead over a plain step
MODES = ['plain', 'plain_kd', 'search_no_kd', 'search']


def _state_bytes(*objs: Any) -> int:
    """Bytes of the distinct tensors held by modules (parameters, gradients, buffers) and optimisers (state)."""
    seen: dict[int, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for obj in objs:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
    return sum(seen.values())


class Step:
    """One training step of a mode, on its own copy of the model; ``objects`` hold its persistent state.

    The search modes call the engine's own :meth:`amap.prune.search.Search.train_step` (which also writes a history
    record every ``log_every`` steps, as in a real search); the plain modes are the same step without the gates, the
    resource loss and the indicator optimiser: cross-entropy (+ KD), backward, clipping, the same AdamW.
    """

    def __init__(self, mode: str, base: nn.Module, size: tuple[int, int, int], batch: tuple[torch.Tensor, torch.Tensor],
                 calib: list, settings: SearchSettings, cfg: PruneConfig, target_ratio: float) -> None:
        self.mode, self.x, self.y, self.s = mode, batch[0], batch[1], settings
        self.model = copy.deepcopy(base)
        kd = mode in ('plain_kd', 'search')
        self.teacher = copy.deepcopy(base).eval().requires_grad_(False) if kd else None
        self.kd_alpha = settings.kd_alpha if kd else 0.0
        self.pruner: Pruner | None = None
        self.search: Search | None = None
        if mode.startswith('search'):
            self.pruner = prepare(self.model, size, cfg, calib)
            self.search = Search(self.pruner, target_ratio * self.pruner.full_macs, settings, teacher=self.teacher)
            self.opt, self.opt_ind = self.search.opt, self.search.opt_ind
        else:
            self.weights = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW([{'params': self.weights, 'lr': settings.lr,
                                           'weight_decay': settings.weight_decay}])
            self.opt_ind = None
        self.model.train()

    def objects(self) -> list[Any]:
        return [o for o in (self.model, self.teacher, self.pruner, self.opt, self.opt_ind) if o is not None]

    def __call__(self) -> None:
        if self.search is not None:
            self.search.train_step(self.x, self.y)
            return
        s, x, y = self.s, self.x, self.y
        logits = self.model(x)
        loss = task_loss(logits, y)
        if self.kd_alpha > 0:
            with torch.no_grad():
                t_logits = self.teacher(x)
            loss = (1 - self.kd_alpha) * loss + self.kd_alpha * distillation_loss(logits, t_logits, s.kd_temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.weights, s.clip_grad)
        self.opt.step()


def _settings(cfg: PruneConfig) -> SearchSettings:
    """The search settings :func:`amap.prune.prune` uses with a config."""
    return cfg.search


def _mb(n: float) -> float:
    return round(n / 2 ** 20, 2)


def measure_steps(base: nn.Module, size: tuple[int, int, int], loader: list, cfg: PruneConfig, target: float,
                  rounds: int) -> dict[str, Any]:
    settings = _settings(cfg)
    calib = loader[:cfg.calib_batches]
    steps = {m: Step(m, base, size, loader[0], calib, settings, cfg, target) for m in MODES}
    timing = interleaved(steps, rounds=rounds, warmup=2)
    st = timing['stats']
    plain, plain_cpu = st['plain']['samples'], st['plain']['cpu']['samples']
    out: dict[str, Any] = {'rounds': timing['rounds'], 'loadavg_1min': timing['loadavg_1min'], 'modes': {}}
    for m in MODES:
        step = steps[m]
        # gradients are dropped first (as the step's own zero_grad does), so that the profiler sees their allocation
        # inside the step; a free of a tensor allocated before profiling started would be invisible to it
        step.opt.zero_grad(set_to_none=True)
        if step.opt_ind is not None:
            step.opt_ind.zero_grad(set_to_none=True)
        state = _state_bytes(*step.objects())
        peak = peak_tensor_bytes(step)
        out['modes'][m] = {
            'ms': st[m]['median'] * 1e3, 'mean_ms': statistics.fmean(st[m]['samples']) * 1e3,
            'q1_ms': st[m]['q1'] * 1e3, 'q3_ms': st[m]['q3'] * 1e3, 'samples_ms': [v * 1e3 for v in st[m]['samples']],
            'cpu_ms': st[m]['cpu']['median'] * 1e3, 'cpu_samples_ms': [v * 1e3 for v in st[m]['cpu']['samples']],
            'overhead_vs_plain_wall': statistics.median(a / b for a, b in zip(st[m]['samples'], plain)) - 1,
            'overhead_vs_plain': statistics.median(a / b for a, b in zip(st[m]['cpu']['samples'], plain_cpu)) - 1,
            'state_mb': _mb(state), 'step_peak_mb': _mb(peak), 'total_peak_mb': _mb(state + peak)}
    modes = out['modes']
    out['overhead_search_vs_plain_kd'] = modes['search']['cpu_ms'] / modes['plain_kd']['cpu_ms'] - 1
    out['memory_overhead_search_vs_plain'] = modes['search']['total_peak_mb'] / modes['plain']['total_peak_mb'] - 1
    out['goal_met'] = bool(modes['search']['overhead_vs_plain'] < GOAL)
    # the search's own machinery (gates, indicators, resource loss), without the teacher forward of distillation
    out['goal_met_without_kd'] = bool(modes['search_no_kd']['overhead_vs_plain'] < GOAL)
    return out


def measure_calibration(base: nn.Module, size: tuple[int, int, int], loader: list, cfg: PruneConfig,
                        reps: int) -> dict[str, Any]:
    """Each phase of ``prepare`` on a fresh copy of the model, ``reps`` times in interleaved rounds."""
    calib = [x for x, _ in loader[:cfg.calib_batches]]

    def fresh() -> tuple[nn.Module, Pruner]:
        model = copy.deepcopy(base)
        return model, Pruner(model, size, kinds=cfg.kinds, head_balance=cfg.head_balance, reweight=cfg.reweight,
                             threshold=cfg.threshold, min_keep=cfg.min_keep)

    def phase(name: str) -> tuple[Callable[[], None], Callable[[], None]]:
        # set-up outside the timed part: a fresh pruner for the phases that need one
        state: dict[str, Any] = {}

        def setup() -> None:
            if name in ('attn_init', 'similarity'):
                state['model'], state['pruner'] = fresh()
            elif name == 'eval_forward':
                state['model'] = copy.deepcopy(base).eval()

        def run() -> None:
            if name == 'pruner':
                Pruner(copy.deepcopy(base), size, kinds=cfg.kinds, head_balance=cfg.head_balance,
                       reweight=cfg.reweight, threshold=cfg.threshold, min_keep=cfg.min_keep)
            elif name == 'attn_init':
                attention_difference_init(state['pruner'], calib[0], seed=cfg.seed)
            elif name == 'similarity':
                calibrate_similarity(state['pruner'], calib, beta=cfg.similarity_beta)
            else:
                with torch.no_grad():
                    for x in calib:
                        state['model'](x)
        return setup, run

    phases = {n: phase(n) for n in ('pruner', 'attn_init', 'similarity', 'eval_forward')}
    samples: dict[str, list[float]] = {n: [] for n in phases}
    cpu: dict[str, list[float]] = {n: [] for n in phases}
    peaks: dict[str, int] = {}
    loads = []
    for r in range(reps):
        names = list(phases)
        for n in names[r % len(names):] + names[:r % len(names)]:
            setup, run = phases[n]
            setup()
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            samples[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
        loads.append(loadavg()[:1])
    for n, (setup, run) in phases.items():
        setup()
        peaks[n] = peak_tensor_bytes(run)
    med = {n: statistics.median(v) for n, v in samples.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    total = med['pruner'] + med['attn_init'] + med['similarity']
    total_cpu = med_cpu['pruner'] + med_cpu['attn_init'] + med_cpu['similarity']
    return {'calib_batches': len(calib), 'calib_images': sum(len(x) for x in calib), 'reps': reps,
            'loadavg_1min': [x[0] for x in loads if x],
            'phases': {n: {'seconds': med[n], 'cpu_seconds': med_cpu[n], 'samples_s': samples[n],
                           'cpu_samples_s': cpu[n], 'peak_mb': _mb(peaks[n])} for n in phases},
            'total_seconds': total, 'total_cpu_seconds': total_cpu}


def measure(name: str, batch: int, target: float, rounds: int, calib_batches: int, calib_reps: int
            ) -> dict[str, Any]:
    t_start = time.perf_counter()
    base, side = build_model(name)
    size = (3, side, side)
    cfg = PruneConfig(criterion='amap', target=target, calib_batches=calib_batches, attn_init=True)  # every component
    loader = random_loader(batch, side, max(1, calib_batches))
    row: dict[str, Any] = {'model': name, 'input': list(size), 'batch': batch, 'target': target}
    row['steps'] = measure_steps(base, size, loader, cfg, target, rounds)
    m = row['steps']['modes']
    print(f"{name}: " + ', '.join(f"{k} {v['ms']:.0f} ms, CPU {v['cpu_ms']:.0f} ms "
                                  f"({100 * v['overhead_vs_plain']:+.1f}%)" for k, v in m.items())
          + f' load {loadavg()[:1]}', file=sys.stderr, flush=True)
    row['calibration'] = measure_calibration(base, size, loader, cfg, calib_reps)
    row['calibration']['in_plain_steps'] = row['calibration']['total_cpu_seconds'] / (m['plain']['cpu_ms'] / 1e3)
    print(f"{name}: calibration {row['calibration']['total_seconds']:.2f} s", file=sys.stderr, flush=True)
    row['seconds'] = round(time.perf_counter() - t_start, 1)
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    mach = meta['machine']
    head = ['model', 'batch'] + [f'{m} ms (CPU ms)' for m in MODES] + [
        'search vs plain', 'search vs plain_kd', 'gates only (search_no_kd vs plain)',
        f'goal < {100 * GOAL:.0f}%: search / without KD']
    lines = []
    for r in rows:
        s = r['steps']
        m = s['modes']
        lines.append([r['model'], r['batch'], *(f"{m[k]['ms']:.0f} ({m[k]['cpu_ms']:.0f})" for k in MODES),
                      f"{100 * m['search']['overhead_vs_plain']:+.1f}%",
                      f"{100 * s['overhead_search_vs_plain_kd']:+.1f}%",
                      f"{100 * m['search_no_kd']['overhead_vs_plain']:+.1f}%",
                      ' / '.join('yes' if s[k] else 'NO' for k in ('goal_met', 'goal_met_without_kd'))])
    mem_head = ['model'] + [f'{k} peak MB (state + step)' for k in MODES] + ['search vs plain']
    mem = [[r['model'], *(f"{r['steps']['modes'][k]['total_peak_mb']:.0f} ({r['steps']['modes'][k]['state_mb']:.0f} + "
                          f"{r['steps']['modes'][k]['step_peak_mb']:.0f})" for k in MODES),
            f"{100 * r['steps']['memory_overhead_search_vs_plain']:+.0f}%"] for r in rows]
    cal_head = ['model', 'calibration images', 'pruner CPU s', 'attn_init CPU s', 'similarity CPU s', 'total CPU s',
                '= plain steps', 'eval forwards CPU s (same images)', 'peak MB (pruner / attn_init / similarity)']
    cal = []
    for r in rows:
        c = r['calibration']
        p = c['phases']
        cal.append([r['model'], c['calib_images'], *(f"{p[k]['cpu_seconds']:.2f}" for k in ('pruner', 'attn_init',
                                                                                            'similarity')),
                    f"{c['total_cpu_seconds']:.2f}", f"{c['in_plain_steps']:.1f}",
                    f"{p['eval_forward']['cpu_seconds']:.2f}",
                    ' / '.join(f"{p[k]['peak_mb']:.0f}" for k in ('pruner', 'attn_init', 'similarity'))])
    return '\n'.join([
        f"CPU: {mach['cpu']}, {mach['torch_threads']} torch thread(s), load average {mach['loadavg_start']} at start, "
        f"{meta['loadavg_end']} at end; {mach['date']}; torch {mach['torch']}.", '',
        f"Command: `{meta['command']}`", '',
        'Step time: median wall-clock (and process CPU) time over interleaved rounds, warm-up excluded; overheads are '
        'medians of per-round ratios of CPU time (which other jobs on a shared machine cannot steal; the JSON has the '
        'wall-clock ones too). '
        'Random weights and images; search to 70% MACs with the full method (similarity, head balance, reweight, '
        'attention init, KD).', '',
        markdown_table(head, lines, left=2), '',
        'Peak memory: live CPU tensor bytes (torch.profiler allocator events): persistent state at the start of a '
        'step (parameters, buffers, optimiser state, teacher, indicators) + the peak reached during the step '
        '(activations kept for backward, gradients, temporaries).', '',
        markdown_table(mem_head, mem), '',
        'Calibration / initialisation (amap `prepare`), each phase on a fresh copy of the model:', '',
        markdown_table(cal_head, cal)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='benchmarks/results/cost.json', help='JSON file (and .md beside it)')
    parser.add_argument('--quick', action='store_true', help='fewer rounds and calibration batches')
    parser.add_argument('--models', nargs='+', default=None, help=f'model names (default: {" ".join(SMALL_MODELS)})')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--target', type=float, default=0.7, help='MAC ratio the search aims at')
    parser.add_argument('--rounds', type=int, default=None, help='timed steps per mode (default 20; quick 4)')
    parser.add_argument('--calib-batches', type=int, default=None,
                        help=f'calibration batches (default: PruneConfig\'s {PruneConfig().calib_batches}; quick 2)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch intra-op threads (default 1: on cores shared with other jobs, more threads time '
                             'the OS scheduler, as every parallel op waits for its slowest thread)')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.models or SMALL_MODELS
    rounds = args.rounds or (4 if args.quick else 20)
    calib_batches = args.calib_batches or (2 if args.quick else PruneConfig().calib_batches)
    calib_reps = 1 if args.quick else 3
    meta: dict[str, Any] = {
        'machine': machine_info(args.threads), 'command': command_line('cost.py', argv), 'quick': args.quick,
        'batch': args.batch, 'target': args.target, 'rounds': rounds, 'calib_batches': calib_batches,
        'goal': f'search step overhead over a plain step < {100 * GOAL:.0f}%',
        'memory_method': 'torch.profiler(profile_memory=True) allocator events: peak of live CPU tensor bytes during '
                         'the step above its start, plus the tensors persistent at its start; excludes Python objects '
                         'and allocator/oneDNN caches (not RSS)'}
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
            rows.append(measure(name, args.batch, args.target, rounds, calib_batches, calib_reps))
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
