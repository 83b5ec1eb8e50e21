"""fqtrun reproduce end to end on a tiny experiment (1-epoch runs, every step kind): the tables, finished
runs reused, a run with other overrides refused, the same numbers with jobs=2, `fqtrun report` again."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from fqtrun.cli import main
from fqtrun.commands.report import ReportConfig, run_report
from fqtrun.commands.reproduce import prepare_argv
from fqtrun.errors import ConfigError, FqtrunError
from fqtrun.experiment.layout import run_dir, step_dir
from fqtrun.experiment.spec import ReproduceConfig
from fqtrun.runs.reproduce import run_reproduction

T = "fqtrun.report.experiment."
ACC = {"_target_": T + "MeanStd", "key": "final_test_acc", "scale": 100}
NUMBERS = ("final_test_acc", "best_test_acc", "final_train_loss", "steps")


def tiny(out, cache, jobs: int = 1, steps: bool = True, overrides: tuple[str, ...] = ()):
    """Two MNIST-1D variants x 2 seeds of 1 epoch (20 steps) and a 1-epoch ResNet-20 on digits, with a
    variance study, a mask conversion and integer BN on them."""
    mnist = [f"dataset.cache_dir={cache}", "batch_size=200", "optim.lr=0.01"]
    experiment = {
        "name": "tiny", "seeds": [0, 1],
        "common": ["logger.wandb.mode=disabled", "logger.progress=none", "threads=1", "epochs=1", "logger.log_every=5"],
        "variants": {"fp32": {"overrides": mnist}, "qat4": {"overrides": [*mnist, "+quant=qat", "bits=4"]}},
        "tables": [{"_target_": T + "RunTable", "header": ["run", "acc", "n"], "rows": {"fp32": ["fp32"], "qat4": ["QAT"]},
                    "columns": [ACC, {"_target_": T + "Count"}]}],
    }
    if steps:
        experiment["variants"]["resnet"] = {"overrides": ["model=resnet20", "dataset=digits", "+quant=qat", "bits=8"],
                                            "seeds": [0]}
        experiment |= {
            "variance": {"var": {"run": "qat4", "seed": 1, "overrides": [
                "variance.quantizers=[per_tensor]", "variance.bits=[4]", "variance.k=2", "variance.batches=2"]}},
            "mask": {"nm": {"run": "fp32", "overrides": ["sparsity.n=2", "sparsity.m=4", "convert.calibration_batches=1"]}},
            "intbn": {"bn": {"run": "resnet", "overrides": ["calib_samples=200"]}}}
        experiment["tables"] += [
            {"_target_": T + "VarianceTable", "source": "var"},
            {"_target_": T + "RunTable", "header": ["conversion", "dense", "magnitude"], "rows": {"nm": ["2:4"]},
             "columns": [{**ACC, "key": "accuracy.dense"}, {**ACC, "key": "accuracy.magnitude"}]},
            {"_target_": T + "IntbnTable", "source": "bn"}]
    # native numerics: this test process is not pinned (portable reproduce runs: tests/test_portable.py)
    return OmegaConf.merge(OmegaConf.structured(ReproduceConfig), {
        "experiment": experiment, "jobs": jobs, "out": str(out), "overrides": list(overrides),
        "numerics": {"portable": False}})


@pytest.fixture(scope="module")
def done(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("tiny")
    lines: list[str] = []
    return out, run_reproduction(tiny(out, data_cache), log=lines.append), lines


def summaries(out, variants=("fp32", "qat4"), seeds=(0, 1)) -> dict:
    return {(v, s): json.loads((run_dir(out, v, s) / "summary.json").read_text()) for v in variants for s in seeds}


def test_tiny_experiment_end_to_end(done):
    out, result, lines = done
    assert result["runs"] == 5 and result["reused"] == 0
    runs = summaries(out)
    for (variant, seed), s in runs.items():  # each run a `fqtrun train` folder, labelled by its overrides
        assert s["overrides"][-1] == f"seed={seed}" and s["steps"] == 20
        assert (run_dir(out, variant, seed) / ".hydra" / "config.yaml").is_file()
    tables = (out / "tables.md").read_text()
    assert tables == result["tables"]
    accs = [100 * runs[("qat4", s)]["final_test_acc"] for s in (0, 1)]
    mean, std = (accs[0] + accs[1]) / 2, abs(accs[0] - accs[1]) / 2 ** 0.5  # the sample std of two values
    assert f"| QAT | {mean:.2f} ± {std:.2f} | 2 |" in tables
    variance = json.loads((step_dir(out, "variance", "var", 1) / "variance.json").read_text())
    assert variance["settings"]["checkpoint"].endswith("runs/qat4/seed1/last.pt")
    assert f"| per_tensor | {variance['quantization']['per_tensor']['4']['total']:.2e} |" in tables
    for seed in (0, 1):
        mask = json.loads((step_dir(out, "mask", "nm", seed) / "mask.json").read_text())
        assert mask["accuracy"]["dense"] == runs[("fp32", seed)]["final_test_acc"]  # the trained run's model
    intbn = json.loads((step_dir(out, "intbn", "bn", 0) / "intbn.json").read_text())
    assert intbn["all_layers_exact"] and f"integer BN {100 * intbn['acc_integer_bn']:.2f} %" in tables
    assert "qat4 seed 1: test loss" in "\n".join(lines) and "intbn bn on resnet seed 0" in lines


def test_finished_runs_are_reused(done, data_cache, monkeypatch):
    out, first, _ = done
    before = {k: (run_dir(out, *k) / "summary.json").stat().st_mtime_ns for k in summaries(out)}
    monkeypatch.setattr("fqtrun.runs.reproduce.run_training", lambda *a, **k: pytest.fail("a finished run trained"))
    again = run_reproduction(tiny(out, data_cache), log=lambda line: None)
    assert again["reused"] == again["runs"] == 5 and again["tables"] == first["tables"]
    assert before == {k: (run_dir(out, *k) / "summary.json").stat().st_mtime_ns for k in summaries(out)}


def test_a_finished_run_with_other_overrides_is_refused(done, data_cache):
    out, _, _ = done
    with pytest.raises(FqtrunError, match="seed0 holds a finished run with other overrides .*pick a new output folder"):
        run_reproduction(tiny(out, data_cache, overrides=("optim.lr=0.02",)), log=lambda line: None)


def test_report_renders_the_same_tables_from_the_runs(done):
    out, result, _ = done
    (out / "tables.md").unlink()
    report = run_report(OmegaConf.structured(ReportConfig(dirs=[str(out)])))
    assert report["experiments"] == [str(out)] and (out / "tables.md").read_text() == result["tables"]


def test_two_jobs_give_the_same_numbers(done, tmp_path, data_cache):
    out, _, _ = done
    run_reproduction(tiny(tmp_path, data_cache, jobs=2, steps=False), log=lambda line: None)
    one, two = summaries(out), summaries(tmp_path)
    assert {k: [s[n] for n in NUMBERS] for k, s in one.items()} == {k: [s[n] for n in NUMBERS] for k, s in two.items()}


def test_a_table_naming_an_unknown_run_stops_before_any_training(tmp_path, data_cache):
    cfg = tiny(tmp_path, data_cache, steps=False)
    cfg.experiment.tables[0].rows["qat8"] = ["typo"]
    with pytest.raises(ConfigError, match="names 'qat8', which is no variant or step: use one of fp32, qat4$"):
        run_reproduction(cfg, log=lambda line: None)
    assert not (tmp_path / "runs").exists()


def test_positional_name_and_unknown_names(capsys, monkeypatch):
    assert prepare_argv(["fqt", "jobs=2"]) == ["jobs=2", "experiment=fqt"]
    assert prepare_argv(["--cfg", "job", "fqt"]) == ["--cfg", "job", "experiment=fqt"]
    with pytest.raises(ConfigError, match="takes one experiment name, got fqt cpt"):
        prepare_argv(["fqt", "cpt"])
    monkeypatch.setattr("sys.argv", ["fqtrun"])
    monkeypatch.delenv("FQTRUN_DEBUG", raising=False)
    for argv, message in ((["reproduce", "nosuch"], "error: experiment=nosuch is unknown: use one of cpt, fqt, lm, "
                                                    "lm_formats, lm_llama, qat, ridge, sparsity"),
                          (["reproduce", "fqt", "cpt"], "error: fqtrun reproduce takes one experiment name, got fqt "
                                                        "cpt: run them one by one"),
                          (["reproduce", "jobs=2"], "error: fqtrun reproduce needs an experiment name: fqtrun "
                                                    "reproduce <cpt|fqt|lm|lm_formats|lm_llama|qat|ridge|sparsity>")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
