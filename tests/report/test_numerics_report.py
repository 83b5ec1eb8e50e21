"""fqtrun report's numerics-health table and plot, from a run folder whose records are written by hand."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from fqtrun.commands.report import ReportConfig, run_report
from fqtrun.report.collect import load_run
from fqtrun.report.numerics import series

PNG = b"\x89PNG\r\n\x1a\n"


def probe(step: int, rows: dict) -> dict:
    rec = {"step": step, "epoch": 0, "split": "train", "loss": 1.0, "numerics/step": step}
    for (layer, slot), (sqnr, flush, nonfinite) in rows.items():
        rec.update({f"numerics/{layer}/{slot}/bits": 4, f"numerics/{layer}/{slot}/sat": 0.0,
                    f"numerics/{layer}/{slot}/flush": flush, f"numerics/{layer}/{slot}/sqnr_db": sqnr,
                    f"numerics/{layer}/{slot}/nonfinite": nonfinite})
    return rec


def make_run(path: Path) -> Path:
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\nbits: 4\n")
    (path / "summary.json").write_text(json.dumps({"final_test_acc": 0.5, "best_test_acc": 0.6}))
    recs = [probe(10, {("features.0", "w"): (30.0, 0.1, 0), ("head", "dx"): (9.0, 0.4, 0)}),
            {"step": 15, "epoch": 0, "split": "test", "acc": 0.5},
            probe(20, {("features.0", "w"): (31.0, 0.1, 0), ("head", "dx"): (8.0, 0.5, 0),
                       ("features.0", "a"): ("nan", "nan", 2)})]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_series_and_the_worst_first_table(tmp_path):
    run = make_run(tmp_path / "run")
    s = series(load_run(run))
    assert s[("head", "dx")]["sqnr_db"] == [(10, 9.0), (20, 8.0)]
    assert s[("features.0", "a")]["nonfinite"] == [(20, 2)]
    out = run_report(OmegaConf.structured(ReportConfig(dirs=[str(run)])))
    assert out["numerics_rows"] == 3
    md = (run / "report.md").read_text(encoding="utf-8")
    table = md.split("## Numerics health")[1].splitlines()
    body = [line for line in table if line.startswith("| (defaults)")]
    assert body == ["| (defaults) | 20 | features.0 | a | 4 | 0.00 | – | – | 2 |",  # non-finite first
                    "| (defaults) | 20 | head | dx | 4 | 0.00 | 50.00 | 8.0 | 0 |",  # then the lowest SQNR
                    "| (defaults) | 20 | features.0 | w | 4 | 0.00 | 10.00 | 31.0 | 0 |"]
    assert (run / "numerics_health.png").read_bytes().startswith(PNG)
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "Numerics health at the last probe" in page and page.count("data:image/png;base64,") == 2
