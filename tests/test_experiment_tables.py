"""An experiment folder's tables.md from hand-written records: every block kind against figures worked
out by hand, and the one-line errors for a table naming what is not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fqtrun.errors import ConfigError, FqtrunError
from fqtrun.experiment.layout import TABLES_FILE, run_dir, save_spec, step_dir
from fqtrun.experiment.spec import ReproduceConfig
from fqtrun.report.experiment import experiment_report, value

T = "fqtrun.report.experiment."
ACC = {"_target_": T + "MeanStd", "key": "final_test_acc", "scale": 100}


def folder_with(tmp_path: Path, tables: list, summaries: dict[str, list[dict]], steps: dict | None = None,
                step_records: dict | None = None) -> Path:
    """A folder as `fqtrun reproduce` leaves it: reproduce.yaml, one summary.json per variant and seed,
    one result file per step."""
    variants = {name: {"overrides": [], "seeds": list(range(len(records)))} for name, records in summaries.items()}
    spec = OmegaConf.merge(OmegaConf.structured(ReproduceConfig), {"experiment": {
        "name": "tiny", "variants": variants, "tables": tables, **(steps or {})}, "out": str(tmp_path)})
    save_spec(tmp_path, spec)
    for name, records in summaries.items():
        for seed, record in enumerate(records):
            run_dir(tmp_path, name, seed).mkdir(parents=True)
            (run_dir(tmp_path, name, seed) / "summary.json").write_text(json.dumps(record))
    for (kind, name, seed, file), record in (step_records or {}).items():
        step_dir(tmp_path, kind, name, seed).mkdir(parents=True)
        (step_dir(tmp_path, kind, name, seed) / file).write_text(json.dumps(record))
    return tmp_path


def table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def test_value_reads_dotted_keys_and_averages_per_layer_dicts():
    record = {"accuracy": {"dense": 0.5}, "sparsity": {"density": {"a": 0.25, "b": 0.75, "c": 0.5}}}
    assert value(record, "accuracy.dense") == 0.5
    assert value(record, "sparsity.density") == 0.5
    assert value(record, "sparsity.kind") is None and value(record, "missing") is None


def test_run_table_mean_std_mean_ratio_count(tmp_path):
    """Accuracies 0.90, 0.92, 0.94: mean 92.00 %, sample std 2.00; GBitOPs 10, 20 vs a baseline of 40."""
    summaries = {
        "base": [{"final_test_acc": 0.90, "gbitops": 40.0, "wall_time_s": 1.0},
                 {"final_test_acc": 0.92, "gbitops": 40.0, "wall_time_s": 2.0},
                 {"final_test_acc": 0.94, "gbitops": 40.0, "wall_time_s": 4.5}],
        "cheap": [{"final_test_acc": 0.81, "gbitops": 10.0, "wall_time_s": 3.0, "density": {"x": 0.5, "y": 1.0}},
                  {"final_test_acc": 0.83, "gbitops": 20.0, "wall_time_s": 5.0, "density": {"x": 0.5, "y": 1.0}}],
    }
    table = {"_target_": T + "RunTable", "header": ["run", "acc", "GBitOPs", "vs base", "time", "density", "n"],
             "rows": {"base": ["the base"], "cheap": ["cheap one"]},
             "columns": [ACC, {"_target_": T + "Mean", "key": "gbitops", "digits": 1},
                         {"_target_": T + "Ratio", "key": "gbitops", "baselines": {"cheap": "base"}},
                         {"_target_": T + "MeanStd", "key": "wall_time_s", "digits": 1},
                         {"_target_": T + "Mean", "key": "density", "digits": 3, "missing": "1"},
                         {"_target_": T + "Count"}],
             "title": "### the title", "note": "the note"}
    text = experiment_report(folder_with(tmp_path, [table], summaries))
    assert table_lines(text) == [
        "| run | acc | GBitOPs | vs base | time | density | n |", "|---|---|---|---|---|---|---|",
        "| the base | 92.00 ± 2.00 | 40.0 | 1.0000 | 2.5 ± 1.8 | 1 | 3 |",  # std of 1, 2, 4.5: sqrt(3.25)
        "| cheap one | 82.00 ± 1.41 | 15.0 | 0.3750 | 4.0 ± 1.4 | 0.750 | 2 |"]
    assert text.startswith("### the title\n") and "the note" in text
    assert (tmp_path / TABLES_FILE).read_text() == text


def test_gap_to_a_reference_source(tmp_path):
    """Losses 1.80, 1.84 (mean 1.82) against fp32's 1.70, 1.72, 1.74 (mean 1.72): gap +0.1000, unpaired (other
    seeds); q4p on fp32's seeds 0, 1, 2 with 1.75, 1.72, 1.83: differences 0.05, 0.00, 0.09, mean +0.0467,
    sample std sqrt(((0.0033)^2 + (0.0467)^2 + (0.0433)^2) / 2) = 0.0451; fp32's own gap 0."""
    summaries = {"fp32": [{"final_test_loss": v} for v in (1.70, 1.72, 1.74)],
                 "q4": [{"final_test_loss": v} for v in (1.80, 1.84)],
                 "q4p": [{"final_test_loss": v} for v in (1.75, 1.72, 1.83)]}
    gap = {"_target_": T + "Gap", "key": "final_test_loss", "reference": "fp32"}
    table = {"_target_": T + "RunTable", "header": ["run", "gap"],
             "rows": {"fp32": ["fp32"], "q4": ["4-bit"], "q4p": ["paired"]}, "columns": [gap]}
    assert table_lines(experiment_report(folder_with(tmp_path, [table], summaries)))[2:] == [
        "| fp32 | +0.0000 |", "| 4-bit | +0.1000 |", "| paired | +0.0467 ± 0.0451 |"]


def test_grid_table_and_line(tmp_path):
    summaries = {"a4": [{"final_test_acc": 0.5}], "a8": [{"final_test_acc": 0.75}], "b4": [{"final_test_acc": 0.125}],
                 "b8": [{"final_test_acc": 1.0}]}
    tables = [{"_target_": T + "Line", "text": "baseline **{}** %", "source": "a8", "cell": ACC},
              {"_target_": T + "GridTable", "header": ["q", "4 bits", "8 bits"], "rows": {"A": ["a4", "a8"],
               "B": ["b4", "b8"]}, "cell": {**ACC, "digits": 1}}]
    text = experiment_report(folder_with(tmp_path, tables, summaries))
    assert text.splitlines()[0] == "baseline **75.00** %"
    assert table_lines(text)[2:] == ["| A | 50.0 | 75.0 |", "| B | 12.5 | 100.0 |"]


def test_variance_and_intbn_tables_from_step_results(tmp_path):
    variance = {"sampling": {"total": 0.208}, "quantization": {
        "per_tensor": {"4": {"total": 0.0406}, "3": {"total": 0.154}},
        "householder": {"4": {"total": 0.00127}, "3": {"total": 0.00622}}}}
    layer = {"bn": "stages.0.bn1", "channels": 16, "verified_exact": True, "shift_mean": 28.44, "shift_max": 31,
             "shift_naive_mean": None, "shift_naive_max": None}
    intbn = {"acc_range": "reachable", "layers": [layer], "acc_float_bn_requant": 0.9667, "acc_integer_bn": 0.9667,
             "acc_difference": 0.0, "acc_fake_quant_dynamic": 0.97, "kept_float": {"x": "residual"}}
    steps = {"variance": {"v": {"run": "qat", "seed": 0}}, "intbn": {"i": {"run": "qat", "seed": 0}}}
    records = {("variance", "v", 0, "variance.json"): variance, ("intbn", "i", 0, "intbn.json"): intbn}
    tables = [{"_target_": T + "VarianceTable", "source": "v", "title": "#### variance ({sampling:.2e})"},
              {"_target_": T + "IntbnTable", "source": "i", "title": "intbn, {acc_range}"}]
    text = experiment_report(folder_with(tmp_path, tables, {"qat": [{"final_test_acc": 0.9}]}, steps, records))
    lines = text.splitlines()
    assert lines[0] == "#### variance (2.08e-01)" and "intbn, reachable" in lines
    assert table_lines(text) == [
        "| quantizer | 3 bits | 4 bits |", "|---|---|---|",
        "| per_tensor | 1.54e-01 | 4.06e-02 |", "| householder | 6.22e-03 | 1.27e-03 |",
        "| BN | channels | exact | shift ours mean / max | shift naive mean / max |", "|---|---|---|---|---|",
        "| stages.0.bn1 | 16 | yes | 28.4 / 31 | - |"]
    assert "![gradient variance vs bits](variance/v/seed0/variance.png)" in lines
    assert "integer BN 96.67 % (difference +0.00)" in text and "1 BNs stay float" in text


def test_variance_table_per_layer(tmp_path):
    """per_layer_bits adds one row per layer (sampling, then each quantizer at those bits) and the totals."""
    variance = {"sampling": {"total": 0.3, "per_layer": {"fc1": 0.1, "fc2": 0.2}}, "quantization": {
        "per_sample": {"4": {"total": 0.05, "per_layer": {"fc1": 0.02, "fc2": 0.03}}},
        "nvfp4": {"4": {"total": 0.004, "per_layer": {"fc1": 0.001, "fc2": 0.003}}}}}
    steps = {"variance": {"v": {"run": "fp32", "seed": 0}}}
    table = {"_target_": T + "VarianceTable", "source": "v", "per_layer_bits": 4}
    folder = folder_with(tmp_path, [table], {"fp32": [{"final_test_loss": 1.8}]}, steps,
                         {("variance", "v", 0, "variance.json"): variance})
    (step_dir(folder, "variance", "v", 0) / "variance_layers.png").write_bytes(b"png")
    text = experiment_report(folder)
    assert "![gradient variance per layer at 4 bits](variance/v/seed0/variance_layers.png)" in text.splitlines()
    assert table_lines(text)[4:] == [
        "| layer | sampling | per_sample (4 bits) | nvfp4 (4 bits) |", "|---|---|---|---|",
        "| fc1 | 1.00e-01 | 2.00e-02 | 1.00e-03 |", "| fc2 | 2.00e-01 | 3.00e-02 | 3.00e-03 |",
        "| total | 3.00e-01 | 5.00e-02 | 4.00e-03 |"]


def test_bit_traces_figure(tmp_path):
    folder = folder_with(tmp_path, [{"_target_": T + "BitTraces", "runs": {"CPT": "cpt"}, "file": "trace.png"}],
                         {"cpt": [{"final_test_acc": 0.9}]})
    records = [{"split": "train", "step": s, "bits_w": 3 + s % 4, "bits_dx": 8} for s in range(1, 9)]
    (run_dir(folder, "cpt", 0) / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)))
    assert experiment_report(folder).strip() == "![bit-width traces](trace.png)"
    assert (folder / "trace.png").stat().st_size > 0


def test_a_table_naming_an_unknown_source_is_one_line(tmp_path):
    table = {"_target_": T + "RunTable", "header": ["a", "b"], "rows": {"nope": ["x"]}, "columns": [ACC]}
    with pytest.raises(ConfigError, match=r"experiment.tables\[0\] of tiny names 'nope', which is no variant or "
                                          r"step: use one of qat$"):
        experiment_report(folder_with(tmp_path, [table], {"qat": [{"final_test_acc": 0.9}]}))


def test_a_block_that_cannot_be_built_is_one_line(tmp_path):
    table = {"_target_": T + "RunTable", "header": ["a"], "rows": {}, "columns": [], "colour": "red"}
    with pytest.raises(ConfigError, match=r"experiment.tables\[0\] of tiny cannot be built .*colour"):
        experiment_report(folder_with(tmp_path, [table], {"qat": [{"final_test_acc": 0.9}]}))


def test_a_missing_key_and_a_missing_run_are_one_line(tmp_path):
    table = {"_target_": T + "RunTable", "header": ["a", "b"], "rows": {"qat": ["x"]},
             "columns": [{"_target_": T + "MeanStd", "key": "gbitops"}]}
    folder = folder_with(tmp_path, [table], {"qat": [{"final_test_acc": 0.9}]})
    with pytest.raises(ConfigError, match="a record of qat .* has no number at 'gbitops'"):
        experiment_report(folder)
    (run_dir(folder, "qat", 0) / "summary.json").unlink()
    with pytest.raises(FqtrunError, match=r"seed0/summary.json is missing or unreadable: finish the experiment "
                                          r"with fqtrun reproduce tiny out="):
        experiment_report(folder)


def test_a_label_yaml_reads_as_a_number_is_one_line(tmp_path):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124: refused before any run, naming the fix."""
    rows = OmegaConf.create("rows: {qat: [2:4]}").rows
    assert rows.qat == [124]
    table = {"_target_": T + "RunTable", "header": ["a", "b"], "rows": rows, "columns": [ACC]}
    with pytest.raises(ConfigError, match=r"experiment.tables\[0\] of tiny has the label 124, which YAML read as a "
                                          r"number .*quote the label"):
        experiment_report(folder_with(tmp_path, [table], {"qat": [{"final_test_acc": 0.9}]}))
