"""``plot_structure``: where the method cut -- kept qk / v / MLP channels per block, as a PNG."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..utils.figures import pyplot, save_png

__all__ = ['plot_structure', 'structure_table']


def structure_table(structure: list[dict]) -> list[dict[str, Any]]:
    """One row per pruned module: ``{'module', 'qk', 'v', 'mlp', 'heads'}`` kept channels per head (mlp: total)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in structure:
        name = rec['module']
        block = name.rsplit('.', 1)[0] if name.endswith(('.attn', '.mlp')) else name
        row = rows.setdefault(block, {'module': block})
        for kind, width in rec['widths'].items():
            if kind in ('qk', 'v', 'mlp'):
                row[kind] = int(width)
                if kind != 'mlp':
                    row['heads'] = rec['heads'][kind]
    return list(rows.values())


def plot_structure(result: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Draw kept channels per block (qk and v per head, MLP hidden units) and save a PNG.

    Args:
        result: A :class:`~amap.prune.api.PruneResult`, or its ``structure`` list.
        path: PNG path (written atomically).
        title: Figure title.
    """
    plt = pyplot()

    structure = result if isinstance(result, list) else result.structure
    rows = structure_table(structure)
    x = list(range(len(rows)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(rows) + 2), 6), sharex=True)
    width = 0.4
    ax1.bar([i - width / 2 for i in x], [r.get('qk', 0) for r in rows], width, label='qk / head')
    ax1.bar([i + width / 2 for i in x], [r.get('v', 0) for r in rows], width, label='v / head')
    ax1.set_ylabel('kept channels per head')
    ax1.legend(loc='upper right')
    ax2.bar(x, [r.get('mlp', 0) for r in rows], 0.6, color='tab:green', label='MLP hidden')
    ax2.set_ylabel('kept MLP units')
    ax2.set_xticks(x)
    ax2.set_xticklabels([r['module'] for r in rows], rotation=90, fontsize=7)
    ax2.legend(loc='upper right')
    if title is None and not isinstance(result, list):
        title = f'kept channels per block: {result.ratio:.3f} of the MACs'
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=110)
