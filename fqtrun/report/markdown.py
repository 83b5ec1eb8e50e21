"""Markdown pieces the reports share: a table and 'mean ± std' over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' of the scaled values (sample std); a single value has no ± part."""
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
