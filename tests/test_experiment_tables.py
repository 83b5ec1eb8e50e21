"""An experiment folder's tables.md from hand-written records: every block kind (verdicts and claims too)
against figures worked out by hand, and the one-line errors for a table naming what is not there."""

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
                step_records: dict | None = None, claims: list | None = None, seeds: dict | None = None) -> Path:
    """A folder as `fqtrun reproduce` leaves it: reproduce.yaml, one summary.json per variant and seed (seeds
    0, 1, ... unless `seeds` names a variant's), one result file per step."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    seeds = {name: (seeds or {}).get(name, list(range(len(records)))) for name, records in summaries.items()}
    variants = {name: {"overrides": [], "seeds": seeds[name]} for name in summaries}
    spec = OmegaConf.merge(OmegaConf.structured(ReproduceConfig), {"experiment": {
        "name": "tiny", "variants": variants, "tables": tables, "claims": claims or [], **(steps or {})},
        "out": str(tmp_path)})
    save_spec(tmp_path, spec)
    for name, records in summaries.items():
        for seed, record in zip(seeds[name], records):
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


def test_verdict_against_a_baseline_paired_by_seed(tmp_path):
    """Losses, fp32 1.70, 1.72, 1.74 on seeds 0, 1, 2.
    q4p (seeds 0, 1, 2) 1.75, 1.72, 1.83: differences 0.05, 0.00, 0.09, mean +0.0467, sd 0.0451,
      half-width t_{0.975,2} 4.3027 * 0.04509 / sqrt(3) = 0.11201: CI [-0.0653, +0.1587] -> not resolved;
      2 of 3 seeds positive (0.00 has no sign); seeds needed: t_{n-1} * 0.0451 / sqrt(n) at n = 6 is
      2.5706 * 0.0451 / 2.449 = 0.0473 (not < 0.0467), at n = 7 2.4469 * 0.0451 / 2.646 = 0.0417: ~7.
    q4 (seeds 0, 1) 1.80, 1.84: differences 0.10, 0.12, mean +0.1100, sd 0.01414, half-width
      t_{0.975,1} 12.706 * 0.01414 / sqrt(2) = 0.1271: CI [-0.0171, +0.2371]; n = 3: 4.3027 * 0.01414 / 1.732
      = 0.0351 < 0.11: ~3 seeds.
    q8 (seeds 0, 1, 2) 1.71, 1.73, 1.76: differences 0.01, 0.01, 0.02, mean 0.01333, sd 0.00577, half-width
      0.01434: CI [-0.0010, +0.0277] -> not resolved (~4 seeds: 3.1824 * 0.00577 / 2 = 0.0092 < 0.0133).
    q2 (seeds 0, 1, 2) 1.90, 1.93, 1.93: differences 0.20, 0.21, 0.19, mean 0.2, sd 0.01, half-width 0.0248:
      CI [+0.1752, +0.2248] -> worse (a higher loss)."""
    summaries = {"fp32": [{"final_test_loss": v} for v in (1.70, 1.72, 1.74)],
                 "q4": [{"final_test_loss": v} for v in (1.80, 1.84)],
                 "q4p": [{"final_test_loss": v} for v in (1.75, 1.72, 1.83)],
                 "q8": [{"final_test_loss": v} for v in (1.71, 1.73, 1.76)],
                 "q2": [{"final_test_loss": v} for v in (1.90, 1.93, 1.93)]}
    verdict = {"_target_": T + "Verdict", "key": "final_test_loss", "baseline": "fp32", "digits": 4}
    table = {"_target_": T + "RunTable", "header": ["run", "vs fp32"],
             "rows": {"fp32": ["fp32"], "q4": ["4-bit"], "q4p": ["paired"], "q8": ["8-bit"], "q2": ["2-bit"]},
             "columns": [verdict]}
    text = experiment_report(folder_with(tmp_path, [table], summaries))
    assert table_lines(text)[2:] == [
        "| fp32 | baseline |", "| 4-bit | +0.1100 [-0.0171, +0.2371] 2/2 not resolved (~3 seeds) |",
        "| paired | +0.0467 [-0.0653, +0.1587] 2/3 not resolved (~7 seeds) |",
        "| 8-bit | +0.0133 [-0.0010, +0.0277] 3/3 not resolved (~4 seeds) |",
        "| 2-bit | +0.2000 [+0.1752, +0.2248] 3/3 worse |"]
    assert ("Verdicts pair runs by seed (row − fp32; final_test_loss): mean difference [95% CI, Student t over the "
            "seeds], seeds agreeing in sign / seeds, verdict (lower is better)") in text


def test_verdict_per_row_baselines_and_two_figures_of_one_record(tmp_path):
    """cpt vs static on accuracy (x100): differences 0.01, 0.02, 0.03 -> +2.00, sd 1.00 points, CI
    [-0.48, +4.48]; a mask step's reconstructed vs magnitude accuracy on seeds 0, 1: differences 0.10, 0.12:
    +11.00 [-1.71, +23.71] (the q4 example above, in points)."""
    summaries = {"static": [{"final_test_acc": v} for v in (0.90, 0.91, 0.92)],
                 "cpt": [{"final_test_acc": v} for v in (0.91, 0.93, 0.95)]}
    steps = {"mask": {"m": {"run": "static", "seed": None}}}
    records = {("mask", "m", s, "mask.json"): {"accuracy": {"magnitude": mag, "reconstructed": mag + gain}}
               for s, (mag, gain) in enumerate(((0.5, 0.10), (0.6, 0.12), (0.7, 0.11)))}
    rows = {"static": ["static"], "cpt": ["CPT"]}
    tables = [{"_target_": T + "RunTable", "header": ["run", "vs static"], "rows": rows, "columns": [
                  {"_target_": T + "Verdict", "key": "final_test_acc", "scale": 100, "baselines": {"cpt": "static"}}]},
              {"_target_": T + "GridTable", "header": ["conversion", "reconstructed vs magnitude"], "rows": {
                  "2:4": ["m"]}, "cell": {"_target_": T + "Verdict", "key": "accuracy.reconstructed", "scale": 100,
                                          "baseline_key": "accuracy.magnitude"}}]
    text = experiment_report(folder_with(tmp_path, tables, summaries, steps, records))
    lines = table_lines(text)
    assert lines[2:4] == ["| static | baseline |", "| CPT | +2.00 [-0.48, +4.48] 3/3 not resolved (~4 seeds) |"]
    # 0.10, 0.12, 0.11: mean 0.11, sd 0.01, half-width 0.02484 -> [+8.52, +13.48] points, better
    assert lines[6] == "| 2:4 | +11.00 [+8.52, +13.48] 3/3 better |"
    assert "(cpt − static; final_test_acc ×100)" in text
    assert "(accuracy.reconstructed − accuracy.magnitude of the same run ×100)" in text


def claim(**kw) -> dict:
    return {"claim": "q4 worse than fp32", "source": "a paper (spec/x.md)", "a": "q4", "b": "fp32",
            "key": "final_test_acc", "scale": 100, "expect": "worse", **kw}


def test_claims_table(tmp_path):
    """Accuracies fp32 0.90, 0.92, 0.91; q4 0.85, 0.88, 0.86: differences -0.05, -0.04, -0.05, mean -4.67
    points, sd 0.577, half-width 4.3027 * 0.577 / 1.732 = 1.434: CI [-6.10, -3.23] -> worse. q8 0.91, 0.91,
    0.92: differences +0.01, -0.01, +0.01, mean +0.33, sd 1.155, half-width 2.869: CI [-2.54, +3.20]."""
    summaries = {"fp32": [{"final_test_acc": v, "gbitops": 10.0} for v in (0.90, 0.92, 0.91)],
                 "q4": [{"final_test_acc": v, "gbitops": 4.0} for v in (0.85, 0.88, 0.86)],
                 "q8": [{"final_test_acc": v} for v in (0.91, 0.91, 0.92)]}
    claims = [claim(),
              claim(claim="q4 better than fp32", expect="better"),
              claim(claim="q4 no worse than fp32", expect="no_worse", margin=1.0),
              claim(claim="q8 no worse than fp32", a="q8", expect="no_worse", margin=3.0),
              claim(claim="q8 better than fp32", a="q8", expect="better"),
              claim(claim="q4 fewer GBitOPs", key="gbitops", scale=1.0, digits=1, expect="better")]
    text = experiment_report(folder_with(tmp_path, [], summaries, claims=claims))
    lines = table_lines(text)
    assert lines[0] == ("| claim | source | measured | figure | difference [95% CI] | seeds agreeing | verdict | "
                        "the claim is |")
    fig = "final_test_acc ×100, higher is better"
    assert lines[2:] == [
        f"| q4 worse than fp32 | a paper (spec/x.md) | q4 − fp32 | {fig} | -4.67 [-6.10, -3.23] | 3/3 | worse | "
        "supported |",
        f"| q4 better than fp32 | a paper (spec/x.md) | q4 − fp32 | {fig} | -4.67 [-6.10, -3.23] | 3/3 | worse | "
        "contradicted |",
        f"| q4 no worse than fp32 (margin 1) | a paper (spec/x.md) | q4 − fp32 | {fig} | -4.67 [-6.10, -3.23] | "
        "3/3 | worse | contradicted |",
        # worse end -2.54 within 3 points
        f"| q8 no worse than fp32 (margin 3) | a paper (spec/x.md) | q8 − fp32 | {fig} | +0.33 [-2.54, +3.20] | "
        "2/3 | not resolved (~49 seeds) | supported |",
        # t_{n-1} * 1.1547 / sqrt(n) < 0.3333 first at n = 49: 2.0106 * 1.1547 / 7 = 0.3317 (n = 48: 2.0117 *
        # 1.1547 / 6.928 = 0.3353)
        f"| q8 better than fp32 | a paper (spec/x.md) | q8 − fp32 | {fig} | +0.33 [-2.54, +3.20] | 2/3 | "
        "not resolved (~49 seeds) | not resolved (~49 seeds) |",
        "| q4 fewer GBitOPs | a paper (spec/x.md) | q4 − fp32 | gbitops, lower is better | -6.0 [-6.0, -6.0] | 3/3 | "
        "better | supported |"]
    assert text.startswith("#### The papers' claims, measured\n") and "within the margin" in text


def test_claims_that_cannot_be_measured_are_one_line(tmp_path):
    summaries = {"fp32": [{"final_test_acc": 0.9}] * 3, "q4": [{"final_test_acc": 0.8}] * 3}
    for bad, message in (
            (claim(a="q5"), r"claims\[0\] \('q4 worse than fp32'\): a=q5 is no variant or step: use one of fp32, q4$"),
            (claim(b="q4"), r"compares q4 with itself"),
            (claim(margin=1.0), r"margin=1.0: a margin is 0 or more and only reads with expect=no_worse"),
            (claim(key="steps"), r"claims\[0\] \('q4 worse than fp32'\): which way of steps is better is not known")):
        with pytest.raises(ConfigError, match=message):
            experiment_report(folder_with(tmp_path / str(len(message)), [], summaries, claims=[bad]))
    with pytest.raises(ConfigError, match=r"q4 \[3, 4, 5\] and fp32 \[0, 1, 2\] share no seed, and a paired 95% "
                                          r"interval needs 2 or more: run both on the same seeds"):
        experiment_report(folder_with(tmp_path / "apart", [], summaries, claims=[claim()], seeds={"q4": [3, 4, 5]}))
    with pytest.raises(ConfigError, match=r"share only seed 2, and a paired 95% interval needs 2 or more"):
        experiment_report(folder_with(tmp_path / "one", [], summaries, claims=[claim()], seeds={"q4": [2, 3, 4]}))


def test_a_verdict_without_shared_seeds_or_a_direction_is_one_line(tmp_path):
    summaries = {"fp32": [{"final_test_acc": 0.9}] * 2, "q4": [{"final_test_acc": 0.8}] * 2}
    verdict = {"_target_": T + "Verdict", "key": "final_test_acc", "baseline": "fp32"}
    table = {"_target_": T + "RunTable", "header": ["run", "v"], "rows": {"q4": ["q4"]}, "columns": [verdict]}
    # refused from the spec alone (build_blocks runs before `fqtrun reproduce` trains anything)
    with pytest.raises(ConfigError, match=r"^experiment.tables\[0\] of tiny: q4 \[5, 6\] vs fp32 \[0, 1\] share no seed, "
                                          r"and a paired 95% interval needs 2 or more: run both on the same seeds$"):
        experiment_report(folder_with(tmp_path / "a", [table], summaries, seeds={"q4": [5, 6]}))
    with pytest.raises(ConfigError, match=r"q4 \[1, 2\] vs fp32 \[0, 1\] share only seed 1, and a paired 95%"):
        experiment_report(folder_with(tmp_path / "b", [table], summaries, seeds={"q4": [1, 2]}))
    for cell, message in (({**verdict, "key": "steps"}, "which way of steps is better"),
                          ({**verdict, "baseline": None}, "compares nothing: set baseline, baselines or baseline_key")):
        with pytest.raises(ConfigError, match=rf"experiment.tables\[0\] of tiny cannot be built .*{message}"):
            experiment_report(folder_with(tmp_path / message[:5], [{**table, "columns": [cell]}], summaries))
    unknown = {**table, "columns": [{**verdict, "baselines": {"q4": "fp16"}}]}
    with pytest.raises(ConfigError, match=r"names 'fp16', which is no variant or step: use one of fp32, q4$"):
        experiment_report(folder_with(tmp_path / "c", [unknown], summaries))


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
