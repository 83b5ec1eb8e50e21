"""The machines an experiment's runs ran on (summary.json's "machine": numerics_mode.machine_info) as the
markdown block at the top of tables.md: runs on different CPUs agree to the last bit only when portable on
the same torch build."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fqtrun.report.markdown import markdown_table

MACHINE_COLUMNS = {"CPU": "cpu", "flags": "cpu_flags", "ATen": "aten_capability", "torch": "torch",
                   "MKL": "mkl", "MKL branch": "mkl_branch", "threads": "threads", "kernels": "kernels",
                   "numerics": "portable"}  # machine_block's header -> machine_info's key


def _cell(key: str, value) -> str:
    if key == "portable":
        return "portable" if value else "native"
    if isinstance(value, list):
        return " ".join(value) or "-"
    return "-" if value is None else str(value)


def machine_block(records: Sequence[Mapping]) -> str:
    """A markdown table of the distinct machines (machine_info) the runs of `records` (summary dicts) ran on,
    with how many runs each; runs that recorded none are counted on their own line. '' when none recorded one
    (no records, or runs from before summary.json had "machine")."""
    if not any(isinstance(r.get("machine"), Mapping) for r in records):
        return ""
    rows: dict[tuple[str, ...], int] = {}
    missing = 0
    for record in records:
        info = record.get("machine")
        if not isinstance(info, Mapping):
            missing += 1
            continue
        row = tuple(_cell(k, info.get(k)) for k in MACHINE_COLUMNS.values())
        rows[row] = rows.get(row, 0) + 1
    body = [[*row, str(n)] for row, n in rows.items()]
    if missing:
        body.append(["not recorded", *["-"] * (len(MACHINE_COLUMNS) - 1), str(missing)])
    return f"Machines ({len(records)} runs):\n\n" + markdown_table([*MACHINE_COLUMNS, "runs"], body)
