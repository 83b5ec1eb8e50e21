"""DDP under torchrun (2 CPU ranks, gloo) against one process with the same global batch.

The reference is the single-process trainer itself: with SGD the two runs differ only by float
summation order, so every logged train loss must agree to 1e-5 and the final weights to 1e-5.
(Adam's first steps are sign-like and amplify those rounding differences, so SGD is used here.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fqtrun.data.loader import make_loader
from fqtrun.errors import ConfigError
from fqtrun.runs.train import run_training
from fqtrun.training.distributed import ShardedLoader
from fqtrun.training.processes import setup

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# batch 333 on 4000 samples: per-rank slices of 167/166 and a last batch of 4 (2/2), so the
# loss weighting for uneven slices is exercised, not only the even case.
RUN = ["batch_size=333", "optim=sgd", "optim.lr=0.2", "lr=constant", "logger.log_every=1", "threads=1",
       "logger.wandb.mode=disabled", "logger.progress=none"]
TOL = 1e-5


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "fqtrun", "train",
                           "trainer.distributed=true", *args], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_trajectory(ddp: list[dict], single: list[dict]) -> None:
    assert [(r["step"], r["split"]) for r in ddp] == [(r["step"], r["split"]) for r in single]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, single))
    assert worst < TOL, f"loss trajectories differ by {worst:.2e} (> {TOL})"
    for a, b in zip(ddp, single):  # accuracies count the same global batch: at most one sample apart
        assert abs(a["acc"] - b["acc"]) <= 1.0 / 333 + 1e-12


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a / "last.pt", weights_only=True)["model"]
    wb = torch.load(b / "last.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < TOL


def test_sharded_loader_splits_each_global_batch_disjointly():
    data = TensorDataset(torch.arange(23), torch.zeros(23))
    single = [x for x, _ in make_loader(data, 7, shuffle=True, seed=5)]
    ranks = [[x for x, _ in ShardedLoader(data, 7, True, 5, rank=r, world_size=2)] for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 4
    for step, batch in enumerate(single):
        a, b = ranks[0][step], ranks[1][step]
        assert torch.equal(torch.cat([a, b]), batch)  # together: exactly the single-process batch
        assert abs(len(a) - len(b)) <= 1
    resumed = [x for x, _ in ShardedLoader(data, 7, True, 5, rank=1, world_size=2, skip_batches=2)]
    assert all(torch.equal(x, y) for x, y in zip(resumed, ranks[1][2:]))
    with pytest.raises(ConfigError, match="last batch of an epoch has 2 samples"):
        ShardedLoader(data, 7, True, 5, rank=0, world_size=3)


def test_setup_refuses_half_configured_runs(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="add trainer.strategy=ddp"):
        setup("none", "cpu")
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        setup("ddp", "cpu")


def test_torchrun_two_ranks_match_one_process(tmp_path, compose_train, data_cache):
    res = torchrun(*RUN, "epochs=2", f"dataset.cache_dir={data_cache}", "hydra.run.dir=ddp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    ddp = tmp_path / "ddp"
    single = tmp_path / "single"
    run_training(compose_train(*RUN, "epochs=2"), single)

    assert_same_trajectory(records(ddp), records(single))
    assert_same_weights(ddp, single)
    # rank 0 alone writes: one checkpoint, one log, one summary; rank 1 left nothing anywhere
    assert sorted(p.name for p in ddp.iterdir()) == [".hydra", "last.pt", "metrics.jsonl", "summary.json",
                                                      "train.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    assert res.stdout.count("fqtrun train: summary") == 1


@pytest.mark.slow
def test_torchrun_resume_continues_the_same_trajectory(tmp_path, compose_train, data_cache):
    for epochs, extra in ((1, []), (2, ["resume=true"])):
        res = torchrun(*RUN, f"epochs={epochs}", *extra, f"dataset.cache_dir={data_cache}",
                       "hydra.run.dir=ddp", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-4000:]
    single = tmp_path / "single"
    run_training(compose_train(*RUN, "epochs=2"), single)  # constant lr: the epoch count does not shape it
    assert_same_trajectory(records(tmp_path / "ddp"), records(single))
    assert_same_weights(tmp_path / "ddp", single)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_on_the_language_model(tmp_path):
    """The LM's windows shard like any batch (the training windows draw their offsets from the epoch seed and
    their index, so both ranks cut the single process's global batch); losses are per-window means."""
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    lm = ["model=gpt", "dataset=text", "dataset.tokenizer=char", f"dataset.root={corpus}", "model.n_layer=1", "model.n_head=2",
          "model.n_embd=16", "model.block_size=16", "batch_size=8", "trainer.max_steps=12", "trainer.eval_every=6",
          "optim=sgd", "optim.lr=0.5", "logger.log_every=1", "threads=1", "logger.wandb.mode=disabled",
          "logger.progress=none"]
    res = torchrun(*lm, "hydra.run.dir=ddp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=lm)
    run_training(cfg, tmp_path / "single")
    ddp, single = records(tmp_path / "ddp"), records(tmp_path / "single")
    assert [(r["step"], r["split"]) for r in ddp] == [(r["step"], r["split"]) for r in single]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, single)) < TOL
    assert_same_weights(tmp_path / "ddp", tmp_path / "single")
