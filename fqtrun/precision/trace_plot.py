"""Bit-width trace: the bits each quantizer slot used vs the training step, from metrics.jsonl.

The train records carry bits_w, bits_a, bits_dx, bits_dw (read back from the layers by the
trainer's BitsProbe), one record every logger.log_every steps: set log_every=1 to see every step
of a short cycle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

SLOTS = ("w", "a", "dx", "dw")


def read_bit_trace(metrics_path: Path) -> dict[str, tuple[list[int], list[int]]]:
    """slot -> (steps, bits) over the train records of metrics.jsonl; slots never logged are left out."""
    trace: dict[str, tuple[list[int], list[int]]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") != "train":
                continue
            for slot in SLOTS:
                if (bits := rec.get(f"bits_{slot}")) is not None:
                    steps, values = trace.setdefault(slot, ([], []))
                    steps.append(int(rec["step"]))
                    values.append(int(bits))
    return trace


def _draw(ax, trace: dict[str, tuple[list[int], list[int]]], title: str) -> None:
    for i, slot in enumerate(s for s in SLOTS if s in trace):
        steps, bits = trace[slot]
        # a small vertical offset keeps overlapping slots (w and a usually coincide) visible
        ax.step(steps, [b + 0.06 * i for b in bits], where="post", label=slot, linewidth=1.0)
    values = [b for slot in trace for b in trace[slot][1]]
    ax.set_ylim(min(values) - 0.5, max(values) + 0.7)
    ax.set_yticks(range(min(values), max(values) + 1))
    ax.set_ylabel("bits")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right", ncol=4)
    ax.grid(alpha=0.3)


def plot_bit_trace(metrics_path: Path, out_png: Path, title: str | None = None) -> Path | None:
    """Write the trace of one run as a PNG; None (nothing written) when no record carries bits."""
    trace = read_bit_trace(metrics_path)
    if not trace:
        return None
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    fig = Figure(figsize=(8, 3))
    ax = fig.subplots()
    _draw(ax, trace, title or f"bits per slot: {Path(metrics_path).parent.name}")
    ax.set_xlabel("step")
    return save_figure(fig, out_png)


def plot_bit_traces(runs: Mapping[str, Path], out_png: Path) -> Path:
    """One panel per run (label -> metrics.jsonl), sharing the step axis."""
    from matplotlib.figure import Figure

    from fqtrun.figures import save_figure

    fig = Figure(figsize=(8, 2.2 * len(runs)))
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)
    for ax, (label, path) in zip(axes[:, 0], runs.items()):
        _draw(ax, read_bit_trace(path), label)
    axes[-1, 0].set_xlabel("step")
    return save_figure(fig, out_png)
