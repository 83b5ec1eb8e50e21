"""The mask study's tables (sparsity/report.py rows, conversion accuracies): mask.md and the terminal's."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from fqtrun.report.markdown import markdown_table
from fqtrun.training.loggers import summary_table

HEADER = ["layer", "shape", "dens", "kept", "greedy", "MD", "MD unstr", "ms", "ms gr", "err mag", "err rec"]
LEGEND = ("dens, kept: of the exact mask; dens: fraction kept; kept: kept |w| over unstructured top-k at the same density; greedy: greedy "
          "over exact kept |w| (transposable); MD: log10 mask diversity of the constraint (- where the layer's "
          "dimensions are not multiples of M) and of unstructured; ms / ms gr: exact / greedy mask search; "
          "err: output error ||W X - W' X||^2 / ||W X||^2 on the calibration batches, magnitude-only / "
          "reconstructed")
TERMINAL_COLUMNS = [0, 2, 3, 4, 5, 7, 8, 9, 10]  # the terminal leaves out shape and unstructured MD (see mask.md)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def layer_cells(r: dict) -> list[str]:
    """One layer row's cells, in HEADER's order."""
    return [r["layer"], "x".join(map(str, r["shape"])), f"{r['density']:.3f}", f"{r['kept_vs_unstructured']:.4f}",
            _f(r["greedy_vs_exact"], ".4f"), _f(r["log10_md"], ".1f"), f"{r['log10_md_unstructured']:.1f}",
            f"{r['mask_ms']:.1f}", _f(r["greedy_ms"], ".1f"),
            _f(r.get("rel_err_magnitude"), ".4f"), _f(r.get("rel_err_reconstructed"), ".4f")]


def accuracy_rows(s: dict) -> list[tuple[str, str]]:
    """(model, test accuracy): dense, magnitude masks, and what the conversion recovered."""
    a = s["accuracy"]
    rows = [("dense (as loaded)", f"{a['dense']:.4f}"), ("magnitude masks only", f"{a['magnitude']:.4f}")]
    if a.get("magnitude_bn") is not None:
        rows.append(("magnitude masks + BN re-estimation", f"{a['magnitude_bn']:.4f}"))
    if a["reconstructed"] is not None:
        cal = s["calibration"]
        bn = " + BN re-estimation" if cal["bn_layers_reestimated"] else ""
        rows.append((f"reconstructed{bn} ({cal['samples']} calibration samples)",
                     f"{a['reconstructed']:.4f}"))
    return rows


def markdown(s: dict) -> str:
    """mask.md: the layer table, the legend, what stayed dense, the accuracies, the sparse checkpoint."""
    sp = s["sparsity"]
    label = f"{sp['n']}:{sp['m']}{' transposable (' + sp['method'] + ')' if sp['kind'] == 'transposable' else ''}"
    text = [f"## fqtrun mask: {s['model']} / {s['dataset']}, {label} (N kept of every M)\n",
            markdown_table(HEADER, [layer_cells(r) for r in s["layers"]]),
            f"{LEGEND}. Kept dense: {', '.join(f'{k} ({v})' for k, v in s['kept_dense'].items()) or 'none'}.\n",
            markdown_table(["model", "test accuracy"], [[k, v] for k, v in accuracy_rows(s)])]
    if s.get("sparse_checkpoint"):
        text.append(f"Sparse checkpoint: `{s['sparse_checkpoint']}`\n")
    return "\n".join(text)


def terminal_tables(s: dict, out_dir: Path) -> list[Table]:
    """The layer table and the summary (accuracies, diversity, what stayed dense, timings, outputs)."""
    sp = s["sparsity"]
    table = Table(title=f"fqtrun mask: {s['model']}, {sp['kind']} {sp['n']}:{sp['m']} ({sp['method']})",
                  title_justify="left", caption=LEGEND, caption_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for i in TERMINAL_COLUMNS:
        table.add_column(HEADER[i], justify="left" if i == 0 else "right", no_wrap=True)
    for r in s["layers"]:
        cells = layer_cells(r)
        table.add_row(*(cells[i] for i in TERMINAL_COLUMNS))
    times = " / ".join(f"{1e3 * s['timing_s'][k]:.1f} ms" if k in s["timing_s"] else "-"
                       for k in ("masks", "reconstruction", "bn_reestimation"))
    rows = accuracy_rows(s) + [
        ("log10 mask diversity", f"{s['log10_md']:.1f} (unstructured {s['log10_md_unstructured']:.1f}; "
                                 "layers that tile exactly)"),
        ("kept dense", ", ".join(s["kept_dense"]) or "none"),
        ("time: masks / reconstruction / BN", times),
        ("outputs", str(out_dir / "mask.json") + (f", {s['sparse_checkpoint']}" if s.get("sparse_checkpoint") else "")),
    ]
    return [table, summary_table("test accuracy", rows)]
