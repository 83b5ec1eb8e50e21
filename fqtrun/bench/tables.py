"""The benchmark's result dict (suite.run_suite) as rich tables: one for the quantizers, one for the number
formats, one per model's train steps and one for the mask search, for every thread count."""

from __future__ import annotations

from rich.table import Table


def result_tables(result: dict) -> list[Table]:
    """The tables of every run (thread count) in `result`, in the order they are printed."""
    tables = []
    for run in result["runs"]:
        t = Table(title=f"quantizers, {run['threads']} thread(s), load {run['load'][0]:.1f}", title_justify="left")
        for col in ("operation", "x clone", "ms", "BHQ / PSQ"):
            t.add_column(col)
        for k, v in run["quantizers"].items():
            t.add_row(k, f"{v['x_clone']:.2f}", f"{v['median_ms']:.2f}", f"{v['x_psq']:.2f}" if "x_psq" in v else "")
        tables.append(t)
        tables.append(format_table(run["formats"], run["threads"], run["load"][0]))
        tables += [step_table(run[part], run["threads"]) for part in ("linear", "cnn")]
        if "masks" in run:
            tables.append(mask_table(run["masks"], run["threads"]))
    return tables


def format_table(rows: dict, threads: int, load: float) -> Table:
    """The number formats' fake-quantization passes (format_bench's dict): one row per format."""
    t = Table(title=f"number formats, fake quantization vs clone(), {threads} thread(s), load {load:.1f}",
              title_justify="left")
    for col in ("format", "RTN", "SR", "SR + RHT16", "ms (RTN / SR / SR + RHT16)"):
        t.add_column(col)
    names = [k.rsplit(" ", 1)[0] for k in rows if k.endswith(" RTN")]
    for n in names:
        r = [rows[f"{n} {m}"] for m in ("RTN", "SR", "SR+RHT16")]
        t.add_row(n, *(f"{v['x_clone']:.2f}x" for v in r), " / ".join(f"{v['median_ms']:.1f}" for v in r))
    return t


def step_table(b: dict, threads: int) -> Table:
    """One model's train-step figures (step_bench's dict)."""
    t = Table(title=f"train step, {b['model']}, {threads} thread(s)", title_justify="left")
    for col in ("recipe", "time / fp32", "speedup vs fp32", "ms", "note"):
        t.add_column(col)
    for k, v in b["steps"].items():
        if "status" in v:
            t.add_row(k, "", "", "", v["status"])
            continue
        note = f"{v['speedup_vs_bf16']:.2f}x vs bf16" if "speedup_vs_bf16" in v else ""
        if k == "FQT int8":
            note += f"; {b['int8_layers_ran_int8']}/{b['layers']} layers all-int8"
        t.add_row(k, f"{v['x_fp32']:.2f}", f"{v['speedup_vs_fp32']:.2f}x", f"{v['median_ms']:.1f}", note)
    if "numerics_probe" in b:
        p = b["numerics_probe"]
        t.add_row("FQT int8, numerics probe step", f"{p['probe_step_x_plain']:.2f} x FQT int8", "",
                  f"{p['probe_step_ms']:.1f}", f"{100 * p['overhead_at_every']:.2f}% of a step at numerics.every={p['every']}")
    return t


def mask_table(b: dict, threads: int) -> Table:
    """The mask-search figures (masks.mask_bench's dict), targets marked met or not."""
    t = Table(title=f"mask search, {b['size']} x {b['size']} fp32 weight, {threads} thread(s)", title_justify="left")
    for col in ("operation", "median ms", "x clone()", "target"):
        t.add_column(col)
    for k, v in b["rows"].items():
        target = "" if v["target_ms"] is None else \
            f"< {v['target_ms']:.0f} ms {'✓' if v['median_ms'] < v['target_ms'] else '✗'}"
        t.add_row(k, f"{v['median_ms']:.1f}", f"{v['x_clone']:.1f}", target)
    return t


def load_line(result: dict) -> str:
    """The machine's load average before and after the run (how far to trust the figures), and what its CPU
    runs the int8 GEMMs with."""
    return (f"load average before/after: {result['load_before'][0]:.2f} / {result['load_after'][0]:.2f}; "
            f"CPU {result['cpu_capability']}, int8 GEMMs via {result['int8_gemm']}")
