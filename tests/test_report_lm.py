"""fqtrun report over language-model runs: the LM metrics in the table, the gap to a named baseline (checked
against a hand computation from the summaries), loss plots per step."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from fqtrun.commands.report import ReportConfig, run_report
from fqtrun.errors import ConfigError
from fqtrun.runs.train import run_training

TINY_LM = ["model=gpt", "dataset=text", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=8",
           "batch_size=8", "trainer.max_steps=6", "trainer.eval_every=3", "dataset.val_windows=8",
           "logger.wandb.mode=disabled", "logger.progress=none"]


def job(folder: Path, corpus: Path, *overrides: str) -> dict:
    """A run folder as a sweep job leaves it: .hydra/config.yaml and overrides.yaml, metrics, summary."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY_LM, f"dataset.root={corpus}", *overrides])
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(list(overrides)), folder / ".hydra" / "overrides.yaml")
    return run_training(cfg, folder, list(overrides))


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm_report")
    corpus = root / "corpus.txt"
    corpus.write_text("a language model reads this sentence again. " * 40)
    for seed in (0, 1):
        job(root / "fp32" / str(seed), corpus, f"seed={seed}")
        for i, bits in enumerate((4, 8)):
            job(root / "sweep" / f"{seed}{i}", corpus, "+quant=per_sample", f"bits={bits}", f"seed={seed}")
    return root


def report(dirs, **kw) -> dict:
    return run_report(OmegaConf.structured(ReportConfig(dirs=[str(d) for d in dirs], **kw)))


def test_lm_table_and_gap_to_the_baseline_match_hand_computation(lm_runs, tmp_path):
    out = report([lm_runs / "sweep"], out=str(tmp_path), baseline=str(lm_runs / "fp32"))
    assert out["groups"] == 2 and out["done"] == 4
    base = statistics.fmean(json.loads((p / "summary.json").read_text())["final_test_loss"]
                            for p in (lm_runs / "fp32").iterdir())
    with open(tmp_path / "report.csv", encoding="utf-8") as f:
        rows = {r["bits"]: r for r in csv.DictReader(f)}
    for i, bits in enumerate(("4", "8")):
        summaries = [json.loads((lm_runs / "sweep" / f"{s}{i}" / "summary.json").read_text()) for s in (0, 1)]
        for key in ("final_test_loss", "best_test_loss", "final_test_bpc", "final_test_ppl"):
            assert float(rows[bits][f"{key}_mean"]) == pytest.approx(statistics.fmean(s[key] for s in summaries))
        loss = statistics.fmean(s["final_test_loss"] for s in summaries)
        assert float(rows[bits]["gap_to_baseline"]) == pytest.approx(loss - base, rel=1e-12)
        assert "final_test_acc_mean" not in rows[bits]
    md = (tmp_path / "report.md").read_text()
    assert "| gap in final test loss to baseline |" in md and f"its mean final test loss is {base:.4f}" in md
    assert "final test bpc" in md and "final test ppl" in md
    for name in ("loss_vs_bits", "loss_curves"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name


def test_a_baseline_folder_without_finished_runs_is_refused(lm_runs, tmp_path):
    with pytest.raises(ConfigError, match="baseline=.* holds no finished training run"):
        report([lm_runs / "sweep"], out=str(tmp_path), baseline=str(tmp_path / "nothing"))
