"""End-to-end runs of `fqtrun train` in-process: outputs, resume, checkpoints, NaN, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY
from fqtrun.errors import CheckpointError, ConfigError, TrainingError
from fqtrun.runs.train import run_training
from fqtrun.training.checkpoint import load_checkpoint, save_checkpoint


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def without_time(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if "time" not in k} for r in recs]


def test_outputs_of_a_run(compose_train, tmp_path):
    cfg = compose_train(*TINY, "+quant=qat", "bits=4")
    summary = run_training(cfg, tmp_path)
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "summary.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary["steps"] == 40
    recs = records(tmp_path)
    train = [r for r in recs if r["split"] == "train"]
    test = [r for r in recs if r["split"] == "test"]
    assert len(train) == 8 and len(test) == 2
    assert {"step", "epoch", "loss", "acc", "lr", "bits_w", "bits_a"} <= set(train[0])
    assert train[-1]["bits_w"] == 4 and train[-1]["bits_a"] == 4
    assert summary["bits_used"] == {"w": 4, "a": 4}
    assert len(summary["layers_quantized"]) == 4  # 3 convs + the classifier of cnn1d


def test_resume_reproduces_the_uninterrupted_run(compose_train, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    overrides = ["epochs=3", "batch_size=200", "logger.log_every=5", "+quant=per_sample", "bits=4",
                 "checkpoint.keep_all=true"]
    run_training(compose_train(*overrides), full)
    shutil.copytree(full, cut)
    shutil.copy(cut / "epoch_0001.pt", cut / "last.pt")  # as if the run had died after epoch 1
    (cut / "summary.json").unlink()
    run_training(compose_train(*overrides, "resume=true"), cut)
    assert without_time(records(cut)) == without_time(records(full))
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(cut / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"x": torch.ones(3)})
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"x": torch.zeros(3)})
    assert path.read_bytes() == before  # the old checkpoint survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_corrupt_and_foreign_checkpoints(compose_train, tmp_path):
    run_training(compose_train(*TINY), tmp_path)
    ckpt = tmp_path / "last.pt"
    mlp = compose_train(*TINY, "model=mlp", "resume=true")
    with pytest.raises(CheckpointError, match="model=cnn1d.*model=mlp"):
        run_training(mlp, tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        run_training(compose_train(*TINY, "resume=true"), tmp_path)


def test_resume_without_checkpoint(compose_train, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        run_training(compose_train(*TINY, "resume=true"), tmp_path)


def test_nan_loss_stops_with_step_and_checkpoint(compose_train, tmp_path):
    cfg = compose_train("epochs=3", "batch_size=200", "optim.lr=1e30")
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+"):
        run_training(cfg, tmp_path)


def test_nan_policy_skip(compose_train, tmp_path):
    summary = run_training(compose_train("epochs=1", "batch_size=200", "optim.lr=1e30", "nan_policy=skip"), tmp_path)
    assert summary["skipped_steps"] > 0


@pytest.mark.parametrize("override,match", [
    ("bits=0", "bits=0 is out of range"),
    ("bits=33", "bits=33 is out of range"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("epochs=-1", "epochs=-1 must be >= 0"),
    ("+quant=qat quant.bits_w=40", "quant.bits_w=40 is out of range"),
])
def test_bad_settings(compose_train, tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        run_training(compose_train(*override.split()), tmp_path)


def test_wandb_offline_run_files(compose_train, tmp_path):
    cfg = compose_train("epochs=1", "batch_size=400", "logger.wandb.mode=offline")
    run_training(cfg, tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
