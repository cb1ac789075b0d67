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

__all__ = ['write_report', 'render_report', 'format_report', 'plot_search', 'REPORT_JSON', 'REPORT_MD']

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


def format_report(report: dict[str, Any]) -> str:
    """The Markdown summary table of a report."""
    macs, params, top1 = report.get('macs', {}), report.get('params', {}), report.get('top1', {})
    lines = [f"# AMAP pruning report: {report.get('model', '?')}", '',
             f"Target {_fmt(macs.get('target_ratio'), '.3f')} of the MACs, achieved {_fmt(macs.get('ratio'), '.4f')}.",
             '', '| | original | pruned | ratio |', '|---|---:|---:|---:|',
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
    threads = ((report.get('latency') or {}).get('cpu') or {}).get('_meta', {}).get('threads')
    if threads:
        lines += ['', f'CPU latency: median of interleaved rounds, {threads} thread{"s" if threads > 1 else ""}.']
    return '\n'.join(lines) + '\n'


def plot_search(history: list[dict], path: str | os.PathLike) -> Path:
    """MAC ratio and losses per search step (PNG)."""
    plt = pyplot()

    steps = [h['step'] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if history:
        ax1.plot(steps, [h['mac_ratio'] for h in history], label='MAC ratio (hard structure)')
        ax1.axhline(history[-1]['target_ratio'], color='tab:red', linestyle='--', label='target')
        for key in ('loss', 'task', 'kd', 'resource'):
            ax2.plot(steps, [h[key] for h in history], label=key)
    ax1.set_xlabel('search step')
    ax1.set_ylabel('MACs / original')
    ax1.legend()
    ax2.set_xlabel('search step')
    ax2.set_ylabel('loss')
    ax2.legend()
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
