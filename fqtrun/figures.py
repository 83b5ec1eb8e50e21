"""PNG figures through matplotlib's object API (Figure, no pyplot): no global backend switch and
no figure registry to close, so commands, report workers and tests draw without a display."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Tight layout, then write `fig` to `path` (format from the suffix); returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return Path(path)
