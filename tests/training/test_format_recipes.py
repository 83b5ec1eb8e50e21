"""Every number-format recipe trains a CNN and a transformer a few steps without NaN, the summary says what
ran, and a resumed run replays the stochastic rounding and the Hadamard signs exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fqtrun.runs.train import run_training
from fqtrun.training.checkpoint import load_checkpoint

RECIPES = ["fp8_tensorwise", "fp8_rowwise", "deepseek_fp8", "mxfp8", "mxfp6", "mxfp4", "mxfp4_sr", "mxfp4_rht_sr",
           "nvfp4"]
FAST = ["trainer.max_steps=4", "trainer.eval_every=4", "batch_size=50", "logger.log_every=2", "eval_batch_size=500"]
MODELS = {"cnn1d": [], "transformer": ["model.dim=32", "model.depth=2", "model.heads=2"]}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_without_nan(compose_train, tmp_path, recipe, model):
    cfg = compose_train(*FAST, f"model={model}", *MODELS[model], f"+quant={recipe}", "threads=1")
    summary = run_training(cfg, tmp_path)
    train = [r for r in records(tmp_path) if r["split"] == "train"]
    assert summary["steps"] == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    bits = {"fp8": 8, "mxfp8": 8, "mxfp6": 6, "mxfp4": 4, "nvfp4": 4, "deepseek": 8}[recipe.split("_")[0]]
    assert summary["bits_used"]["w"] == bits and set(summary["bits_used"]) == {"w", "a", "dx", "dw"}
    assert summary["layers_quantized"]


@pytest.mark.parametrize("recipe", ["mxfp4_rht_sr", "nvfp4"])
def test_resume_replays_rounding_and_transform_signs(compose_train, tmp_path, recipe):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = ["trainer.max_steps=6", "trainer.eval_every=3", "batch_size=50", "logger.log_every=1",
                 "eval_batch_size=500", "model=transformer", "model.dim=32", "model.heads=2", f"+quant={recipe}",
                 "checkpoint.keep_all=true", "threads=1"]
    run_training(compose_train(*overrides), full)
    shutil.copytree(full, cut)
    shutil.copy(cut / "step_0000003.pt", cut / "last.pt")  # as if the run had died after step 3
    (cut / "summary.json").unlink()
    run_training(compose_train(*overrides, "resume=true"), cut)
    strip = lambda recs: [{k: v for k, v in r.items() if "time" not in k} for r in recs]
    assert strip(records(cut)) == strip(records(full))
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(cut / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
