"""fqtrun report over a real (tiny) sweep: the table against a hand computation from the summaries,
the figures, and damaged or foreign run folders that must be skipped, not crash the report."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fqtrun.commands.report import ReportConfig, prepare_argv, run_report
from fqtrun.report import plots
from fqtrun.report.collect import find_runs, group_runs, load_run

FQTRUN = str(Path(sys.executable).with_name("fqtrun"))
PNG = b"\x89PNG\r\n\x1a\n"


def fqtrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([FQTRUN, *args], cwd=cwd, env=env, check=False, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_cache) -> Path:
    """A real 4-job sweep (basic launcher, one process): +quant=qat bits=4,8 seed=0,1, 2 epochs."""
    root = tmp_path_factory.mktemp("report")
    res = fqtrun("train", "-m", "hydra.sweep.dir=sweep", "+quant=qat", "bits=4,8", "seed=0,1", "epochs=2",
                 "batch_size=400", "logger.log_every=5", "logger.wandb.mode=disabled", "logger.progress=none",
                 "threads=1", f"dataset.cache_dir={data_cache}", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "sweep"


def report(dirs, **kw) -> dict:
    return run_report(OmegaConf.structured(ReportConfig(dirs=[str(d) for d in dirs], **kw)))


def test_report_table_matches_hand_computation(sweep):
    res = fqtrun("report", str(sweep), cwd=sweep.parent)  # positional folder -> dirs=[...]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "final test acc" in res.stdout and "2 groups from 4 finished and 0 failed runs" in res.stdout

    by_bits: dict[str, list[dict]] = {}
    for job in sweep.iterdir():
        if job.name.isdigit():
            s = json.loads((job / "summary.json").read_text())
            bits = next(o.split("=")[1] for o in s["overrides"] if o.startswith("bits="))
            by_bits.setdefault(bits, []).append(s)
    with open(sweep / "report.csv", encoding="utf-8") as f:
        rows = {r["bits"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(by_bits) == {"4", "8"}
    md = (sweep / "report.md").read_text(encoding="utf-8")
    for bits, summaries in by_bits.items():
        row = rows[bits]
        assert row["seeds"] == "2" and row["failed"] == "0"
        for key in ("final_test_acc", "best_test_acc", "gbitops", "wall_time_s"):
            values = [s[key] for s in summaries]
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-15)
        acc = [s["final_test_acc"] for s in summaries]
        assert f"| {bits} | 2 | 0 | {statistics.fmean(acc):.4f} ± {statistics.stdev(acc):.4f} |" in md
    assert "Shared settings: `batch_size=400 epochs=2 quant=qat`" in md

    for name in ("accuracy_vs_bits", "accuracy_curves", "bit_traces"):
        data = (sweep / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    page = (sweep / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    assert "gradient variance" in md  # said why that plot is missing (no var/quant records)


def _copy_job(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_damaged_and_partial_runs_are_skipped_not_fatal(sweep, tmp_path):
    jobs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    truncated = _copy_job(jobs[0], tmp_path / "truncated")  # killed mid-write: half a line, no summary
    text = (truncated / "metrics.jsonl").read_text()
    (truncated / "metrics.jsonl").write_text(text[: len(text) - 25])
    (truncated / "summary.json").unlink()
    kept = _copy_job(jobs[1], tmp_path / "kept")  # finished, but its metrics file lost its tail later
    (kept / "metrics.jsonl").write_text((kept / "metrics.jsonl").read_text()[:-10])
    old = _copy_job(jobs[2], tmp_path / "old")  # an older run: summary without gbitops / wall time
    s = json.loads((old / "summary.json").read_text())
    for k in ("gbitops", "wall_time_s"):
        s.pop(k)
    (old / "summary.json").write_text(json.dumps(s))
    broken = _copy_job(jobs[3], tmp_path / "broken")  # summary.json cut short
    (broken / "summary.json").write_text((broken / "summary.json").read_text()[:40])
    (tmp_path / "other" / ".hydra").mkdir(parents=True)  # e.g. a run of another command
    (tmp_path / "other" / ".hydra" / "config.yaml").write_text("seed: 0\n")

    out = report([tmp_path], out=str(tmp_path / "out"))
    skipped = "\n".join(out["skipped"])
    assert f"{truncated}: no summary.json" in skipped and "metrics.jsonl line" in skipped
    assert f"{broken}: summary.json is not valid JSON" in skipped
    assert f"{tmp_path / 'other'}: nothing to report" in skipped
    assert out["done"] == 2 and out["failed"] == 0  # kept and old
    assert any(str(kept) in n and "metrics.jsonl line" in n for n in out["notes"])
    with open(tmp_path / "out" / "report.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    old_bits = next(o.split("=")[1] for o in s["overrides"] if o.startswith("bits="))
    old_row = next(r for r in rows if r["bits"] == old_bits)
    assert old_row["gbitops_n"] == "0" and old_row["final_test_acc_n"] == "1"
    assert "skipped" in (tmp_path / "out" / "report.html").read_text()


def test_failed_run_is_counted_with_its_error(sweep, tmp_path):
    failed = _copy_job(min(p for p in sweep.iterdir() if p.name.isdigit()), tmp_path / "f")
    for f in ("summary.json", "metrics.jsonl", "last.pt"):
        (failed / f).unlink()
    (failed / "failed.json").write_text(json.dumps({"error": "loss is nan at step 3"}))
    out = report([tmp_path], plots=False)
    assert out["failed"] == 1 and out["done"] == 0 and not out["skipped"]
    assert "loss is nan at step 3" in (tmp_path / "report.md").read_text()


def test_gradient_variance_plot_from_variance_json(tmp_path):
    run = tmp_path / "v"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    quant = {q: {str(b): {"total": 10.0 * 4.0 ** -b * k, "per_layer": {}} for b in (4, 6, 8)}
             for q, k in (("per_tensor", 3.0), ("per_sample", 1.0))}
    (run / "variance.json").write_text(json.dumps({"sampling": {"total": 1e-3}, "quantization": quant}))
    runs = [load_run(p) for p in find_runs([tmp_path])[0]]
    assert runs[0].skip_reason is None and not group_runs(runs, ["seed"])  # not a training run
    path, why = plots.gradient_variance([], [], runs, tmp_path / "var.png")
    assert path is not None and path.read_bytes().startswith(PNG), why


def test_positional_folders_become_a_dirs_override(tmp_path):
    odd = tmp_path / "a=b"
    odd.mkdir()
    args = prepare_argv(["multirun/x", "out=r", "--cfg", "job", str(odd), "it's"])
    assert args == ["out=r", "--cfg", "job", f"dirs=['multirun/x','{odd}','it\\'s']"]
    assert prepare_argv(["dirs=[a]"]) == ["dirs=[a]"]


def test_report_refuses_missing_folders(tmp_path):
    from fqtrun.errors import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        report([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="no runs under"):
        report([tmp_path])
    with pytest.raises(ConfigError, match="no folders"):
        report([])
