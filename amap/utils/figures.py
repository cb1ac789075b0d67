"""Figures: matplotlib without a display, and PNGs written atomically."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .io import atomic_path

__all__ = ['pyplot', 'save_png']


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display; imported on first use)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_png(fig: Any, path: str | os.PathLike, *, dpi: int = 100) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG atomically (never a half-written file) and close it."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png', dpi=dpi)
    pyplot().close(fig)
    return path
