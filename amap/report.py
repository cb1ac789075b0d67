"""The pipeline's report: ``report.json`` (every number), ``report.md`` (the table a person reads) and PNG plots
(kept channels per block, search curves). :func:`render_report` re-renders the Markdown and plots from the JSON.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .prune.plot import plot_structure
from .utils.figures import pyplot, save_png
from .utils.io import atomic_write_bytes, atomic_write_json, read_json

__all__ = ['write_report', 'render_report', 'format_report', 'format_latency_target', 'plot_search', 'REPORT_JSON',
           'REPORT_MD']

REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
STRUCTURE_PNG = 'structure.png'
SEARCH_PNG = 'search.png'


def _fmt(value: Any, spec: str = '.2f', suffix: str = '') -> str:
    if value is None:
        return '-'
    if isinstance(value, (int, float)):
        return f'{value:{spec}}{suffix}'
    return str(value)


def format_latency_target(lat: dict[str, Any]) -> list[str]:
    """Markdown lines of a latency target: the target, predicted and measured latency before and after, speed-ups
    and the closed loop's verdict."""
    threads = lat.get('threads', 1)
    lines = [f"Target {_fmt(lat.get('target_ratio'), '.3f')} of the measured latency (speed-up "
             f"{_fmt(lat.get('speedup_target'), '.2f')}x) at batch {lat.get('batch')}, {threads} "
             f"thread{'s' if threads != 1 else ''}, {lat.get('backend')}: measured "
             f"{_fmt(lat.get('measured_ratio'), '.3f')} (speed-up {_fmt(lat.get('speedup_measured'), '.2f')}x), "
             f"{lat.get('verdict', '')}.", '',
             '| latency target | original | pruned | ratio | speed-up |', '|---|---:|---:|---:|---:|']
    for what in ('predicted', 'measured'):
        before, after = lat.get(f'{what}_before_ms'), lat.get(f'{what}_after_ms')
        ratio = after / before if before and after is not None else None
        lines.append(f'| {what} latency, batch {lat.get("batch")} (ms) | {_fmt(before, ".3f")} | '
                     f'{_fmt(after, ".3f")} | {_fmt(ratio, ".3f")} | {_fmt(1 / ratio if ratio else None, ".2f")} |')
    cal = lat.get('calibration') or {}
    how = 'read from the cache' if cal.get('cached') else f"{_fmt(cal.get('seconds'), '.1f')} s"
    if lat.get('recalibrated'):
        how += (f" (timed again: the cached calibration was stale, the original measured "
                f"{lat['recalibrated']['drift']:+.0%} off its time)")
    lines += ['', f"Latency model: width step {lat.get('step')}, calibration {how}, split-half noise "
                  f"{_fmt(100 * cal.get('noise', 0.0), '.1f')}% (check {_fmt(100 * lat.get('noise', 0.0), '.1f')}%), "
                  f"{len(lat.get('attempts') or [])} check(s) of the cut model.", '']
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The Markdown summary table of a report."""
    macs, params, top1 = report.get('macs', {}), report.get('params', {}), report.get('top1', {})
    lat = report.get('latency_target')
    headline = format_latency_target(lat) if lat else \
        [f"Target {_fmt(macs.get('target_ratio'), '.3f')} of the MACs, achieved {_fmt(macs.get('ratio'), '.4f')}.", '']
    lines = [f"# AMAP pruning report: {report.get('model', '?')}", '', *headline,
             '| | original | pruned | ratio |', '|---|---:|---:|---:|',
             f"| MACs (M) | {_fmt(macs.get('before', 0) / 1e6, '.2f')} | {_fmt(macs.get('after', 0) / 1e6, '.2f')} | "
             f"{_fmt(macs.get('ratio'), '.4f')} |",
             f"| parameters (M) | {_fmt(params.get('before', 0) / 1e6, '.3f')} | "
             f"{_fmt(params.get('after', 0) / 1e6, '.3f')} | "
             f"{_fmt(params.get('after', 0) / max(params.get('before', 1), 1), '.4f')} |"]
    for device, lat in (report.get('latency') or {}).items():
        orig, pruned = lat.get('original', {}), lat.get('pruned', {})
        for key in sorted(k for k in orig if k.endswith('_ms')):
            b = key[1:-3]
            ratio = pruned.get(key, 0) / orig[key] if orig.get(key) else None
            lines.append(f'| {device} latency, batch {b} (ms) | {_fmt(orig.get(key))} | {_fmt(pruned.get(key))} | '
                         f'{_fmt(ratio, ".3f")} |')
            t = f'b{b}_images_per_s'
            lines.append(f'| {device} throughput, batch {b} (img/s) | {_fmt(orig.get(t), ".0f")} | '
                         f'{_fmt(pruned.get(t), ".0f")} | |')
    lines += ['', '| top-1 (%) | |', '|---|---:|',
              f"| original | {_fmt(top1.get('before'))} |",
              f"| after surgery | {_fmt(top1.get('after_surgery'))} |",
              f"| after fine-tuning | {_fmt(top1.get('after_finetune'))} |"]
    seconds = report.get('seconds') or {}
    if seconds:
        lines += ['', '| stage | wall time (s) |', '|---|---:|']
        lines += [f'| {k} | {_fmt(v, ".1f")} |' for k, v in seconds.items()]
    meta = ((report.get('latency') or {}).get('cpu') or {}).get('_meta', {})
    if meta.get('threads'):
        threads, clock = meta['threads'], meta.get('clock', 'wall')
        if clock == 'process cpu time':
            clock += ' (what the process itself used: other jobs on the machine do not count)'
        lines += ['', f'CPU latency: median of interleaved rounds, {threads} thread{"s" if threads > 1 else ""}, '
                      f'{clock}.']
    return '\n'.join(lines) + '\n'


def search_ratios(history: list[dict]) -> tuple[str, list[str]]:
    """The history key of the ratio the search's target is in (``mac_ratio``, ``latency_ratio``) and the other ratios
    it records (e.g. the latency of a latency target's search on MACs)."""
    if not history:
        return 'mac_ratio', []
    ratios = [k for k in history[-1] if k.endswith('_ratio') and k != 'target_ratio']
    followed = history[-1].get('search_resource')
    if followed is None:  # histories written before search_resource: the target's ratio is the resource's
        return next((k for k in ratios if k != 'mac_ratio'), 'mac_ratio'), []
    main = 'mac_ratio' if followed == 'macs' else f'{followed}_ratio'
    return main, [k for k in ratios if k != main]


def plot_search(history: list[dict], path: str | os.PathLike) -> Path:
    """MAC ratio (or the ratio of the resource the target is in, e.g. latency) and losses per search step (PNG)."""
    plt = pyplot()

    steps = [h['step'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ratio, others = search_ratios(history)
    if history:
        ax1.plot(steps, [h[ratio] for h in history], label=f"{ratio.replace('_', ' ')} (hard structure)")
        ax1.axhline(history[-1]['target_ratio'], color='tab:red', linestyle='--', label='target')
        for other in others:
            ax1.plot(steps, [h[other] for h in history], linestyle=':', label=other.replace('_', ' '))
        for key in ('loss', 'task', 'kd', 'resource'):
            ax2.plot(steps, [h[key] for h in history], label=key)
    ax1.set_xlabel('search step')
    ax1.set_ylabel(f"{ratio.split('_')[0]} / original")
    ax2.set_xlabel('search step')
    ax2.set_ylabel('loss')
    for ax in (ax1, ax2):
        if history:
            ax.legend()
        else:  # a criterion's cut: nothing was searched
            ax.text(0.5, 0.5, 'no search steps', ha='center', va='center', transform=ax.transAxes)
    return save_png(fig, path)


def write_report(out_dir: str | os.PathLike, report: dict[str, Any]) -> Path:
    """Write ``report.json`` and render ``report.md`` and the plots into ``out_dir``."""
    out = Path(out_dir)
    atomic_write_json(out / REPORT_JSON, report)
    render_report(out)
    return out / REPORT_MD


def render_report(out_dir: str | os.PathLike) -> str:
    """(Re-)render ``report.md``, ``structure.png`` and ``search.png`` from ``report.json``; returns the Markdown."""
    out = Path(out_dir)
    report = read_json(out / REPORT_JSON)
    text = format_report(report)
    atomic_write_bytes(out / REPORT_MD, text.encode())
    if report.get('structure'):
        plot_structure(report['structure'], out / STRUCTURE_PNG,
                       title=f"{report.get('model', '')}: kept channels per block")
    plot_search(report.get('history') or [], out / SEARCH_PNG)
    return text
