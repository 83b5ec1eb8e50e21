"""`fqtrun report baseline=<group settings>` over hand-written run folders: the paired verdict column
against a hand computation, the baseline's own row, a group that cannot pair, and the one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fqtrun.commands.report import prepare_argv
from fqtrun.errors import ConfigError
from fqtrun.report import tables
from fqtrun.report.sweep import sweep_report


def run(folder: Path, seed: int, acc: float, *overrides: str) -> None:
    """A finished run folder as a sweep job leaves it (config, overrides, summary)."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\n")
    (folder / ".hydra" / "overrides.yaml").write_text(json.dumps([*overrides, f"seed={seed}"]))
    (folder / "summary.json").write_text(json.dumps({"final_test_acc": acc, "best_test_acc": acc}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """bits=8 on seeds 0, 1, 2: 0.90, 0.92, 0.91; bits=4: 0.85, 0.88, 0.86 (differences -0.05, -0.04, -0.05:
    mean -0.046667, sd 0.005774, half-width 4.3027 * 0.005774 / sqrt(3) = 0.014342, CI [-0.061009,
    -0.032324] -> worse); bits=2 on seed 7 only (shares no seed)."""
    for seed, (a8, a4) in enumerate(((0.90, 0.85), (0.92, 0.88), (0.91, 0.86))):
        run(tmp_path / "sweep" / f"8_{seed}", seed, a8, "+quant=qat", "bits=8")
        run(tmp_path / "sweep" / f"4_{seed}", seed, a4, "+quant=qat", "bits=4")
    run(tmp_path / "sweep" / "2_7", 7, 0.5, "+quant=qat", "bits=2")
    return tmp_path / "sweep"


def test_paired_verdict_against_a_group(sweep):
    report = sweep_report([sweep], sweep, draw=False, ignore=["seed"], baseline="bits=8")
    md = (sweep / "report.md").read_text()
    assert "| bits | seeds | failed |" in md and "| paired vs baseline (higher acc is better) |" in md
    rows = {r.split("|")[1].strip(): r for r in md.splitlines() if r.startswith("| ") and r[2].isdigit()}
    assert rows["4"].endswith("| -0.0467 | -0.0467 [-0.0610, -0.0323] 3/3 worse |")
    assert rows["8"].endswith("| +0.0000 | baseline |")
    assert rows["2"].endswith("| -0.4100 | – |")  # 0.5 - 0.91: the gap of the means, unpaired
    assert ("not paired with the baseline: bits=2 quant=qat vs the baseline: no shared seed (bits=2 quant=qat: 7; "
            "the baseline: 0, 1, 2)") in "\n".join(report.notes)
    with open(sweep / "report.csv", encoding="utf-8") as f:
        four = next(r for r in csv.DictReader(f) if r["bits"] == "4")
    assert float(four["paired_mean"]) == pytest.approx(-0.046667, abs=1e-6)
    assert float(four["paired_ci_low"]) == pytest.approx(-0.061009, abs=1e-6)
    assert float(four["paired_ci_high"]) == pytest.approx(-0.032324, abs=1e-6)
    assert (four["paired_agree"], four["paired_n"], four["verdict"]) == ("3", "3", "worse")


def test_the_baseline_by_full_label_or_a_folder(sweep, tmp_path):
    by_label = sweep_report([sweep], tmp_path / "a", draw=False, ignore=["seed"], baseline="bits=4 quant=qat")
    rows = by_label.table.rows  # bits 2, 4, 8
    assert rows[1].paired == "baseline" and rows[2].paired.verdict == "better"
    for seed, acc in enumerate((0.89, 0.93, 0.90)):  # bits=8 - these: +0.01, -0.01, +0.01 (the q8 example of
        run(tmp_path / "fp32" / str(seed), seed, acc)  # tests/test_experiment_tables.py::test_claims_table)
    by_folder = sweep_report([sweep], tmp_path / "b", draw=False, ignore=["seed"], baseline=str(tmp_path / "fp32"))
    assert tables.paired_text(by_folder.table.rows[2]) == "+0.0033 [-0.0254, +0.0320] 2/3 not resolved (~49 seeds)"


def test_a_baseline_that_names_no_single_group_is_one_line(sweep):
    with pytest.raises(ConfigError, match=r"baseline=bits=16 is no folder and matches no group: name a run folder "
                                          r"or one group's settings, one of: bits=2 quant=qat; bits=4 quant=qat; "
                                          r"bits=8 quant=qat$"):
        sweep_report([sweep], sweep, draw=False, ignore=["seed"], baseline="bits=16")
    with pytest.raises(ConfigError, match=r"baseline=quant=qat is no folder and matches 3 groups"):
        sweep_report([sweep], sweep, draw=False, ignore=["seed"], baseline="quant=qat")


def test_baseline_settings_pass_through_hydra_unquoted():
    """baseline=bits=8 is not a Hydra override as typed ('=' in a value): the command quotes it."""
    args = prepare_argv(["multirun/x", "baseline=bits=8 +quant=qat"])
    assert args == ["baseline='bits=8 +quant=qat'", "dirs=['multirun/x']"]
    assert OverridesParser.create().parse_override(args[0]).value() == "bits=8 +quant=qat"
    assert prepare_argv(["baseline=outputs/fp32"]) == ["baseline=outputs/fp32"]
    assert prepare_argv(["baseline='bits=8'"]) == ["baseline='bits=8'"]
