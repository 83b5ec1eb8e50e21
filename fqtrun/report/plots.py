"""The report's PNG figures. Each function returns the file it wrote, or None and why it drew nothing.

Figures use matplotlib's object API (Figure, no pyplot state), so reports can be made from
worker processes and tests without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from fqtrun.figures import save_figure
from fqtrun.report import numerics
from fqtrun.report.collect import Group, Run, headline
from fqtrun.report.tables import stat

Result = tuple[Path | None, str]


def group_label(group: Group, keys: list[str], drop: str = "") -> str:
    """The group's values of the settings that vary between groups (`keys`), less `drop`."""
    return " ".join(f"{k}={v}" for k, v in group.key if k in keys and k != drop) or "(defaults)"


WORDS = {"acc": "accuracy"}  # a headline metric as a word in titles and file names


def _headline(groups: list[Group]) -> str:
    """The headline metric the plots show: the first finished run's (acc, or loss for language models)."""
    return next((headline(g.done[0].summary) for g in groups if g.done), "acc")


def headline_vs_bits(groups: list[Group], keys: list[str], out: Path) -> Result:
    """The final headline metric (test accuracy; validation loss for a language model), mean ± std over
    seeds, against the `bits` setting, one line per quantizer recipe (the group's settings other than
    bits); full-precision groups as dashed reference lines. Writes <metric>_vs_bits.png."""
    name = _headline(groups)
    word = WORDS.get(name, name)
    series: dict[str, list[tuple[float, float, float]]] = {}
    refs: list[tuple[str, float]] = []
    for g in groups:
        done = [r for r in g.done if headline(r.summary) == name]
        if not done:
            continue
        s = stat([r.summary.get(f"final_test_{name}") for r in done])
        if done[0].config.get("quant") is None:
            refs.append((group_label(g, keys), s.mean))
        elif isinstance(bits := done[0].config.get("bits"), int):
            std = 0.0 if math.isnan(s.std) else s.std
            series.setdefault(group_label(g, keys, "bits"), []).append((bits, s.mean, std))
    if not series:
        return None, f"{word} vs bits: no finished quantized runs (+quant=...)"
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, pts in series.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=label)
    for label, value in refs:
        ax.axhline(value, linestyle="--", color="gray", label=label)
    ax.set(xlabel="bits (the `bits` setting)", ylabel=f"final test {word}", title=f"{word} vs bits")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return save_figure(fig, out / f"{word}_vs_bits.png", dpi=110), ""


def headline_curves(groups: list[Group], keys: list[str], out: Path) -> Result:
    """The test headline metric per evaluation (per epoch, or per step for runs evaluated every
    trainer.eval_every steps), mean over a group's seeds with a ±std band. Writes <metric>_curves.png."""
    name = _headline(groups)
    word = WORDS.get(name, name)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    drawn, axes = 0, set()
    for g in groups:
        runs = [r for r in g.done if headline(r.summary) == name]
        at = "step" if runs and (runs[0].config.get("trainer") or {}).get("eval_every", 0) else "epoch"
        per_run = [{r_[at]: r_[name] for r_ in r.metrics if r_.get("split") == "test"
                    and isinstance(r_.get(name), (int, float)) and at in r_} for r in runs]
        per_run = [c for c in per_run if c]
        if not per_run:
            continue
        xs = sorted(set.intersection(*(set(c) for c in per_run)))
        if not xs:
            continue
        stats = [stat([c[x] for c in per_run]) for x in xs]
        mean = [s.mean for s in stats]
        std = [0.0 if math.isnan(s.std) else s.std for s in stats]
        line, = ax.plot(xs, mean, marker="." if len(xs) < 30 else None, label=group_label(g, keys))
        ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.2)
        drawn += 1
        axes.add(at)
    if not drawn:
        return None, f"test {word} curves: no test records in any metrics.jsonl"
    ax.set(xlabel=" / ".join(sorted(axes)), ylabel=f"test {word}", title=f"test {word} (mean ± std over seeds)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    return save_figure(fig, out / f"{word}_curves.png", dpi=110), ""


def bit_traces(groups: list[Group], keys: list[str], path: Path) -> Result:
    """The bits each quantizer slot used vs the step (train records' bits_*), first seed of each group."""
    traces: dict[str, list[tuple[str, list, list]]] = {}
    for g in groups:
        if not g.done:
            continue
        recs = [r for r in g.done[0].metrics if r.get("split") == "train" and "step" in r]
        for key in sorted({k for r in recs for k in r if k.startswith("bits_")}):
            pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            label = group_label(g, keys)
            traces.setdefault(key, []).append((label, [p[0] for p in pts], [p[1] for p in pts]))
    if not traces:
        return None, "bit-width traces: no bits_* keys in the train records (full-precision runs)"
    fig = Figure(figsize=(6, 2.2 * len(traces)))
    for i, (key, lines) in enumerate(sorted(traces.items()), 1):
        ax = fig.add_subplot(len(traces), 1, i)
        for label, steps, bits in lines:
            marker = "." if len(steps) <= 50 else None
            ax.plot(steps, bits, drawstyle="steps-post", marker=marker, label=label)
        ax.set(ylabel=key.replace("_", " "), xlabel="step" if i == len(traces) else None)
        ax.yaxis.get_major_locator().set_params(integer=True)
    fig.axes[0].set_title("bit-width traces (first seed of each group)")
    fig.axes[0].legend(fontsize=6)
    return save_figure(fig, path, dpi=110), ""


def gradient_variance(groups: list[Group], keys: list[str], runs: list[Run], path: Path) -> Result:
    """Quantization variance vs bits per quantizer, sampling variance as the reference level: from
    the training probe's var/quant, var/sampling records and from `fqtrun variance`'s variance.json."""
    probe: dict[str, list[tuple[int, float]]] = {}
    sampling: list[float] = []
    for g in groups:
        for r in g.done:
            q = [x["var/quant"] for x in r.metrics if isinstance(x.get("var/quant"), (int, float))]
            sampling += [x["var/sampling"] for x in r.metrics
                         if isinstance(x.get("var/sampling"), (int, float))]
            if q and isinstance(bits := r.config.get("bits"), int):
                probe.setdefault(group_label(g, keys, "bits"), []).append((bits, sum(q) / len(q)))
    studies = [r for r in runs if r.variance and isinstance(r.variance.get("quantization"), dict)]
    if not probe and not studies:
        return None, "gradient variance: no var/quant records and no variance.json"
    panels = ([("training probe (var/quant)", probe, sampling)] if probe else []) + [
        (f"fqtrun variance: {r.path.name}", _study_series(r.variance), _study_sampling(r.variance))
        for r in studies]
    fig = Figure(figsize=(6, 3.6 * len(panels)))
    for i, (title, series, samp) in enumerate(panels, 1):
        ax = fig.add_subplot(len(panels), 1, i)
        for label, pts in series.items():
            by_bits: dict[int, list[float]] = {}
            for b, v in pts:
                by_bits.setdefault(b, []).append(v)
            xs = sorted(by_bits)
            ax.plot(xs, [sum(by_bits[b]) / len(by_bits[b]) for b in xs], marker="o", label=label)
        if samp:
            ax.axhline(sum(samp) / len(samp), linestyle="--", color="gray", label="sampling variance")
        ax.set_yscale("log")
        ax.set(xlabel="gradient bits", ylabel="variance", title=title)
        ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=110), ""


def _study_series(data: dict) -> dict[str, list[tuple[int, float]]]:
    out = {}
    for q, per_bits in data["quantization"].items():
        pts = [(int(b), v["total"]) for b, v in per_bits.items()
               if str(b).isdigit() and isinstance(v, dict) and isinstance(v.get("total"), (int, float))]
        if pts:
            out[q] = pts
    return out


def _study_sampling(data: dict) -> list[float]:
    s = data.get("sampling")
    total = s.get("total") if isinstance(s, dict) else None
    return [total] if isinstance(total, (int, float)) else []


HEALTH_PANELS = (("sqnr_db", "SQNR (dB)", 1.0), ("flush", "flushed to zero (%)", 100.0),
                 ("sat", "saturated (%)", 100.0), ("nonfinite", "non-finite values", 1.0),
                 ("crest", "max/RMS", 1.0), ("kurtosis", "kurtosis (log)", 1.0))
LOG_PANELS = ("kurtosis",)  # Gaussian 3, heavy tails in the hundreds


def numerics_health(runs: list[tuple[str, Run]], path: Path) -> Result:
    """The numerics-health probes over steps, one line per (layer, slot) of each group's first run (a colour
    per layer, a line style per slot): SQNR and the flushed fraction always, saturation and non-finite
    counts when any probe saw some, the operands' max/RMS and kurtosis (before any RHT) when logged."""
    lines = [(label, key, per_stat) for label, run in runs for key, per_stat in numerics.series(run).items()]
    if not lines:
        return None, "numerics health: no numerics/* records (train with numerics.every=N)"
    panels = [p for p in HEALTH_PANELS if p[0] in ("sqnr_db", "flush")
              or any(v for _, _, per in lines for _, v in per.get(p[0], []))]
    fig = Figure(figsize=(7.5, 2.6 * len(panels)))
    prefix = len({label for label, _, _ in lines}) > 1
    styles = {slot: style for slot, style in zip(("w", "a", "dx", "dw"), ("-", "--", "-.", ":"))}
    colours = {}
    for label, (layer, _), _ in lines:
        colours.setdefault((label, layer), f"C{len(colours) % 10}")
    for i, (name, title, factor) in enumerate(panels, 1):
        ax = fig.add_subplot(len(panels), 1, i)
        for label, (layer, slot), per in lines:
            pts = [(s, v) for s, v in per.get(name, []) if math.isfinite(v)]
            ax.plot([p[0] for p in pts], [factor * p[1] for p in pts], linestyle=styles.get(slot, "-"),
                    color=colours[(label, layer)], marker="." if len(pts) <= 30 else None,
                    label=f"{label}: {layer}/{slot}" if prefix else f"{layer}/{slot}")
        ax.set(ylabel=title, xlabel="step" if i == len(panels) else None)
        if name in LOG_PANELS:
            ax.set_yscale("log")
    fig.axes[0].set_title("numerics health per layer/slot (first seed of each group)")
    fig.axes[0].legend(fontsize=6, ncol=2 if len(lines) > 8 else 1, loc="center left",
                       bbox_to_anchor=(1.01, 0.5))
    return save_figure(fig, path, dpi=110), ""
