"""Splicing `fqtrun reproduce`'s tables.md into a docs page: only between the markers, idempotent, refused
without them; figures copied beside the page under names that cannot collide."""

from __future__ import annotations

from pathlib import Path

import pytest

from fqtrun.errors import ConfigError, FqtrunError
from fqtrun.report.publish import main, marked_names, publish, relink, splice

PAGE = """# Ridge

Prose before, with a table of its own:

| a | b |
|---|---|
| 1 | 2 |

<!-- tables:ridge:begin -->

| setting | STE | ridge |
|---|---|---|
| A2W2 | 26.6 ± 1.5 | 40.8 ± 1.8 |

<!-- tables:ridge:end -->

Prose after.
"""

TABLES = "| setting | STE | ridge |\n|---|---|---|\n| A2W2 | 21.4 ± 3.4 | 39.0 ± 1.8 |\n"


def test_splice_replaces_only_the_lines_between_the_markers():
    out = splice(PAGE, "ridge", TABLES)
    assert out == PAGE.replace("| A2W2 | 26.6 ± 1.5 | 40.8 ± 1.8 |", "| A2W2 | 21.4 ± 3.4 | 39.0 ± 1.8 |")
    before, after = PAGE.split("<!-- tables:ridge:begin -->")[0], PAGE.split("<!-- tables:ridge:end -->")[1]
    assert out.startswith(before) and out.endswith(after)


def test_splice_is_idempotent():
    once = splice(PAGE, "ridge", "\n\n" + TABLES + "\n\n")  # surrounding blank lines do not accumulate
    assert splice(once, "ridge", TABLES) == once
    assert once.count("\n\n\n") == 0


@pytest.mark.parametrize("page", [
    "# A page\n\n| a |\n|---|\n",  # no markers
    PAGE.replace("<!-- tables:ridge:end -->", ""),  # begin only
    PAGE.replace("<!-- tables:ridge:begin -->", "<!-- tables:ridge:end -->", 1).replace(
        "<!-- tables:ridge:end -->\n\nProse", "<!-- tables:ridge:begin -->\n\nProse"),  # end before begin
    PAGE + "\n<!-- tables:ridge:begin -->\n",  # two begins
])
def test_splice_refuses_a_page_without_one_pair_of_markers_in_one_line(page):
    with pytest.raises(ConfigError) as e:
        splice(page, "ridge", TABLES, where="docs/ridge.md")
    message = str(e.value)
    assert "\n" not in message and "docs/ridge.md" in message and "<!-- tables:ridge:begin -->" in message


def test_markers_name_the_experiments_and_must_stand_on_their_own_line():
    page = PAGE + "\ninline <!-- tables:fqt:begin --> is not a marker\n<!-- tables:cpt:begin -->\n"
    assert marked_names(page) == ["ridge", "cpt"]


def test_relink_names_figures_beside_the_page_without_collisions():
    text = ("![trace](bit_trace.png)\n![v](variance/a/seed0/variance.png)\n![v](variance/b/seed0/variance.png)\n"
            "![web](https://example.org/x.png)\n")
    out, names = relink(text, "fqt")
    assert names == {"bit_trace.png": "fqt_bit_trace.png",
                     "variance/a/seed0/variance.png": "fqt_variance_a_seed0_variance.png",
                     "variance/b/seed0/variance.png": "fqt_variance_b_seed0_variance.png"}
    assert out == ("![trace](fqt_bit_trace.png)\n![v](fqt_variance_a_seed0_variance.png)\n"
                   "![v](fqt_variance_b_seed0_variance.png)\n![web](https://example.org/x.png)\n")


def test_publish_splices_existing_results_copies_figures_and_keeps_the_rest(tmp_path):
    docs, results = tmp_path / "docs", tmp_path / "results"
    docs.mkdir()
    (docs / "ridge.md").write_text(PAGE + "\n<!-- tables:cpt:begin -->\nkept\n<!-- tables:cpt:end -->\n")
    (docs / "other.md").write_text("# No markers\n")
    (results / "ridge").mkdir(parents=True)
    (results / "ridge" / "tables.md").write_text(TABLES + "\n![trace](bit_trace.png)\n")
    (results / "ridge" / "bit_trace.png").write_bytes(b"\x89PNG figure")
    (results / "lm").mkdir()
    (results / "lm" / "tables.md").write_text("| x |\n|---|\n")

    done = publish(results, docs)

    page = (docs / "ridge.md").read_text()
    assert "21.4 ± 3.4" in page and "26.6 ± 1.5" not in page and "![trace](ridge_bit_trace.png)" in page
    assert "<!-- tables:cpt:begin -->\nkept\n<!-- tables:cpt:end -->" in page  # no results/cpt: kept as it was
    assert (docs / "ridge_bit_trace.png").read_bytes() == b"\x89PNG figure"
    assert (docs / "other.md").read_text() == "# No markers\n"
    assert [n for _, n in done.spliced] == ["ridge"] and [n for _, n in done.no_results] == ["cpt"]
    assert done.unmarked == ["lm"]
    publish(results, docs)
    assert (docs / "ridge.md").read_text() == page  # publishing again changes nothing


def test_publish_refuses_a_missing_figure_and_a_missing_docs_folder(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ridge.md").write_text(PAGE)
    (tmp_path / "results" / "ridge").mkdir(parents=True)
    (tmp_path / "results" / "ridge" / "tables.md").write_text("![trace](bit_trace.png)\n")
    with pytest.raises(FqtrunError, match="bit_trace.png, which does not exist"):
        publish(tmp_path / "results", tmp_path / "docs")
    assert (tmp_path / "docs" / "ridge.md").read_text() == PAGE
    assert main([str(tmp_path / "results"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: docs folder") and err.count("\n") == 1


def test_the_docs_pages_markers_are_well_formed():
    """Every docs page's marked tables, spliced back in, give the page unchanged: one pair per name, in order."""
    pages = sorted((Path(__file__).resolve().parents[2] / "docs").glob("*.md"))
    marked = {page.stem: marked_names(page.read_text(encoding="utf-8")) for page in pages}
    assert {"fqt", "cpt", "sparsity", "ridge", "lm", "lm_formats", "lm_llama", "qat"} <= {n for ns in marked.values() for n in ns}
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for name in marked[page.stem]:
            inside = text.split(f"<!-- tables:{name}:begin -->")[1].split(f"<!-- tables:{name}:end -->")[0]
            assert splice(text, name, inside, where=str(page)) == text
