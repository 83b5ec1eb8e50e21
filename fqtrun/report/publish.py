"""Put `fqtrun reproduce <name>`'s generated tables into the docs pages, so no page holds a hand-typed table.

A page marks where experiment <name>'s tables go with two lines of their own:

    <!-- tables:<name>:begin -->
    ...            replaced by results/<name>/tables.md (its figures copied beside the page)
    <!-- tables:<name>:end -->

    python -m fqtrun.report.publish [RESULTS] [DOCS]     (default: results docs; `make docs-tables`)
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fqtrun.errors import ConfigError, FqtrunError
from fqtrun.experiment.layout import TABLES_FILE
from fqtrun.files import atomic_open

MARKER = re.compile(r"<!-- tables:([A-Za-z0-9_]+):(begin|end) -->")
IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def marker(name: str, end: str) -> str:
    return f"<!-- tables:{name}:{end} -->"


def marked_names(page: str) -> list[str]:
    """The experiment names whose begin markers the page holds, in order."""
    return [m.group(1) for line in page.splitlines() if (m := MARKER.fullmatch(line.strip())) and m.group(2) == "begin"]


def splice(page: str, name: str, tables: str, where: str = "the page") -> str:
    """The page with the lines between name's begin and end markers replaced by `tables` (a blank line each side).

    Only that span changes, and splicing the same tables again gives the same page. A page without exactly one
    begin line followed by one end line for `name` is refused in one line (`where` names it)."""
    lines = page.splitlines()
    begins = [i for i, line in enumerate(lines) if line.strip() == marker(name, "begin")]
    ends = [i for i, line in enumerate(lines) if line.strip() == marker(name, "end")]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ConfigError(f"{where} needs one line {marker(name, 'begin')} and, after it, one line "
                          f"{marker(name, 'end')} (found {len(begins)} and {len(ends)}): put them around the "
                          f"tables that results/{name}/{TABLES_FILE} replaces")
    body = tables.strip("\n").splitlines()
    out = [*lines[:begins[0] + 1], "", *body, "", *lines[ends[0]:]]
    return "\n".join(out) + ("\n" if page.endswith("\n") else "")


def relink(tables: str, name: str) -> tuple[str, dict[str, str]]:
    """tables.md's relative image links (relative to results/<name>/) renamed to files beside the page.

    Returns the text and {link in tables.md: file name beside the page}: <name>_<file name>, or the whole
    path flattened with '_' where two images share a file name (two variance steps' variance.png)."""
    links = [m.group(2) for m in IMAGE.finditer(tables) if not re.match(r"[a-z]+:|/", m.group(2))]
    stems = [Path(link).name for link in links]
    names = {link: f"{name}_{Path(link).name if stems.count(Path(link).name) == 1 else link.replace('/', '_')}"
             for link in links}
    text = IMAGE.sub(lambda m: f"![{m.group(1)}]({names.get(m.group(2), m.group(2))})", tables)
    return text, names


@dataclass
class Published:
    """What publish did: (page, name) spliced, names marked without results, results no page marks."""

    spliced: list[tuple[Path, str]] = field(default_factory=list)
    no_results: list[tuple[Path, str]] = field(default_factory=list)
    unmarked: list[str] = field(default_factory=list)


def publish(results: Path, docs: Path) -> Published:
    """Splice results/<name>/tables.md into every docs/*.md marked for <name> and copy its figures beside it."""
    results, docs = Path(results), Path(docs)
    if not docs.is_dir():
        raise ConfigError(f"docs folder {docs} does not exist: pass the folder holding the pages")
    done = Published()
    for page in sorted(docs.glob("*.md")):
        text = original = page.read_text(encoding="utf-8")
        for name in marked_names(text):
            source = results / name / TABLES_FILE
            if not source.is_file():
                done.no_results.append((page, name))
                continue
            tables, images = relink(source.read_text(encoding="utf-8"), name)
            for link, target in images.items():
                if not (results / name / link).is_file():
                    raise FqtrunError(f"{source} shows {link}, which does not exist: render it again with "
                                      f"fqtrun report {results / name}")
                shutil.copyfile(results / name / link, page.parent / target)
            text = splice(text, name, tables, where=str(page))
            done.spliced.append((page, name))
        if text != original:
            with atomic_open(page, "w", encoding="utf-8") as f:
                f.write(text)
    marked = {name for _, name in [*done.spliced, *done.no_results]}
    done.unmarked = sorted(p.parent.name for p in results.glob(f"*/{TABLES_FILE}") if p.parent.name not in marked)
    return done


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 2 or any(a.startswith("-") for a in args):
        print("usage: python -m fqtrun.report.publish [RESULTS (results)] [DOCS (docs)]", file=sys.stderr)
        return 2
    results, docs = Path(args[0] if args else "results"), Path(args[1] if len(args) > 1 else "docs")
    try:
        done = publish(results, docs)
    except FqtrunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for page, name in done.spliced:
        print(f"{page}: tables of {name} from {results / name / TABLES_FILE}")
    for page, name in done.no_results:
        print(f"{page}: kept the tables of {name} (no {results / name / TABLES_FILE} yet)")
    for name in done.unmarked:
        print(f"note: {results / name / TABLES_FILE} is in no page (add {marker(name, 'begin')} ... to one)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
