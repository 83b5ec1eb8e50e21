"""report.html: one static, self-contained page (the table, the PNGs embedded as base64, the skips)."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from fqtrun.report.tables import Table, cells, columns

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}li{font-size:13px}"""


def page(title: str, table: Table, keys: list[str], common: dict[str, str], plots: list[Path],
         notes: list[str], skipped: list[str], sections: Sequence[tuple[str, str]] = ()) -> str:
    """The page; `sections` are further (title, HTML fragment) pairs after the main table."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{e(title)}</h1>",
             "<p>mean ± sample std over seeds; the seed and bookkeeping settings do not define a group.</p>"]
    if common:
        shared = " ".join(f"{k}={v}" for k, v in common.items())
        parts.append(f"<p>shared settings: <code>{e(shared)}</code></p>")
    parts.append(table_html(columns(table, keys), [cells(table, r, keys) for r in table.rows],
                            numbers_from=len(keys)))
    for name, fragment in sections:
        parts.append(f"<h2>{e(name)}</h2>{fragment}")
    failed = [f for r in table.rows for f in r.failed]
    for name, items in (("failed runs", failed), ("skipped", skipped), ("notes", notes)):
        if items:
            parts.append(f"<h2>{name}</h2><ul>" + "".join(f"<li>{e(i)}</li>" for i in items) + "</ul>")
    for p in plots:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        parts.append(f"<h2>{e(p.stem.replace('_', ' '))}</h2>"
                     f"<img alt='{e(p.name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def table_html(head: list[str], body: list[list[str]], numbers_from: int) -> str:
    """An HTML table of formatted cells; columns from `numbers_from` on are right-aligned numbers."""
    e = html.escape
    cells_ = "".join("<tr>" + "".join(f'<td{" class=n" if i >= numbers_from else ""}>{e(c)}</td>'
                                      for i, c in enumerate(row)) + "</tr>" for row in body)
    return f"<table><tr>{''.join(f'<th>{e(c)}</th>' for c in head)}</tr>{cells_}</table>"
