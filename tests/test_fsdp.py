"""FSDP (trainer.strategy=fsdp) under torchrun, 2 CPU ranks on gloo, against one process and against DDP.

The reference is the trainer itself in one process with the same global batch. Sharding changes only
float summation order, so losses agree to 1e-5 and weights to 1e-4 wherever the quantization does not
depend on how the batch is split (an order difference can carry an element across a rounding boundary,
which moves a few weights by ~1e-5, as measured on the Llama case): MXFP8 (every operand of every GEMM
in blocks of 32 along its reduction dim, round to nearest) with 32-token windows keeps each block inside
one window, so no block straddles the two ranks' slices. Recipes whose grids span the batch (per-tensor
activation ranges, per-column dY for dW) or that round stochastically (each rank draws its own noise)
quantize each rank's slice, as DDP does: those are compared with DDP, which must give the same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fqtrun.build import load_train_run
from fqtrun.config import compose_conf
from fqtrun.errors import CheckpointError
from fqtrun.runs.sample import load_sampler
from fqtrun.runs.train import run_training

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TOL = 1e-5  # losses
WEIGHT_TOL = 1e-4
STEPS = 12
GPT = ["model=gpt", "model.n_layer=2", "model.n_head=2", "model.n_embd=16", "model.block_size=32",
       "batch_size=8"]
LOOP = [f"trainer.max_steps={STEPS}", "trainer.eval_every=4", "optim=sgd", "optim.lr=0.5", "grad_clip=0.5",
        "logger.log_every=1", "threads=1", "logger.wandb.mode=disabled", "logger.progress=none"]
MX_MASKED = ["+quant=mxfp8", "+sparsity=nm", "sparsity.every=3"]  # masks refresh at steps 0, 3, 6, 9


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    return path


def settings(corpus: Path, *extra: str) -> list[str]:
    return [*GPT, "dataset=text", "dataset.tokenizer=char", f"dataset.root={corpus}", *LOOP, *extra]


def torchrun(strategy: str, *args: str, cwd: Path, wait: bool = True):
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "fqtrun", "train",
           f"trainer.strategy={strategy}", *args]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, check=False, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    """The uninterrupted sharded run (tiny GPT, MXFP8, 2:4 masks, gradient clipping, SGD with momentum)."""
    root = tmp_path_factory.mktemp("fsdp")
    res = torchrun("fsdp", *settings(corpus, *MX_MASKED), "hydra.run.dir=run", cwd=root)
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.count("fqtrun train: summary") == 1
    return root / "run"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same records (steps, splits), losses within TOL, the same masks and weights within WEIGHT_TOL."""
    ra, rb = records(a), records(b)
    assert [(r["step"], r["split"]) for r in ra] == [(r["step"], r["split"]) for r in rb]
    worst = max(abs(x["loss"] - y["loss"]) for x, y in zip(ra, rb))
    assert worst < TOL, f"loss trajectories differ by {worst:.2e} (> {TOL})"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    masks = [k for k in wa if k.endswith("weight_mask")]
    assert masks and all(torch.equal(wa[k], wb[k]) for k in masks)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa if k not in masks)
    assert worst < WEIGHT_TOL, f"weights differ by {worst:.2e} (> {WEIGHT_TOL})"


def test_fsdp_matches_one_process_with_mx_quantization_and_masks(fsdp_run, corpus, tmp_path):
    single = tmp_path / "single"
    run_training(compose_conf("train", settings(corpus, *MX_MASKED)), single)
    assert_same_run(fsdp_run, single)

    summary = json.loads((fsdp_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sparsity"]["density"]["blocks.1.fc2"] == 0.5
    assert summary["layers_quantized"] == json.loads((single / "summary.json").read_text())[
        "layers_quantized"]
    # each rank wrote its own shard into one complete folder, which last.pt names; nothing else was left
    shards = [p for p in fsdp_run.iterdir() if p.name.startswith("last.dcp-")]
    assert len(shards) == 1
    assert torch.load(fsdp_run / "last.pt", weights_only=True)["sharded"] == shards[0].name
    assert (shards[0] / ".metadata").is_file() and len(list(shards[0].glob("*.distcp"))) == 2
    assert sorted(p.name for p in fsdp_run.parent.iterdir()) == ["run"]


def test_fsdp_run_folder_reads_like_any_run(fsdp_run):
    """last.pt holds the consolidated weights: rebuilt in one process they give the sharded run's last
    evaluation, and `fqtrun sample` reads the folder."""
    run = load_train_run(str(fsdp_run), "test")
    metrics = run.task.evaluate(run.model, run.bundle.test, 256, torch.device("cpu"))
    logged = json.loads((fsdp_run / "summary.json").read_text())["final_test_loss"]
    assert abs(metrics["loss"] - logged) < 1e-6
    model, tokenizer = load_sampler(str(fsdp_run))
    out = model.generate(tokenizer.encode("the")[None], 5, 1.0, None, torch.Generator().manual_seed(0))
    assert out.shape == (1, 8)


def test_a_sharded_checkpoint_resumes_only_sharded(fsdp_run, corpus, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fsdp_run, copy)
    cfg = compose_conf("train", settings(corpus, *MX_MASKED, f"trainer.max_steps={STEPS + 4}", "resume=true"))
    with pytest.raises(CheckpointError, match="by a trainer.strategy=fsdp run .* resume it with torchrun"):
        run_training(cfg, copy)


@pytest.mark.parametrize("args,expected", [
    (["trainer.strategy=fsdp"], "trainer.strategy=fsdp but RANK is not set: start the ranks with torchrun"),
    (["trainer.strategy=zero3"], "trainer.strategy='zero3' is unknown: use none (one process), ddp or fsdp"),
    (["trainer.strategy=fsdp", "variance.every=5"], "variance.every=5: the gradient-variance probe runs on"),
])
def test_bad_strategy_settings_are_one_line(tmp_path, capsys, monkeypatch, data_cache, args, expected):
    from fqtrun.cli import main

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"hydra.run.dir={tmp_path}", f"dataset.cache_dir={data_cache}",
              "logger.wandb.mode=disabled"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not any((tmp_path / name).exists() for name in ("metrics.jsonl", "last.pt", "summary.json"))


def test_sigterm_then_resume_equals_the_uninterrupted_sharded_run(fsdp_run, corpus, tmp_path):
    """SIGTERM to torchrun (as a scheduler preempts): every rank saves its shards, rank 0 last.pt, and the
    resumed run (model, SGD momentum, masks, step) logs exactly the uninterrupted run's records."""
    args = [*settings(corpus, *MX_MASKED), "hydra.run.dir=cut"]
    proc = torchrun("fsdp", *args, cwd=tmp_path, wait=False)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (metrics.exists()
                                                                  and metrics.read_text().count("\n") >= 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    done = [r["step"] for r in records(tmp_path / "cut")]
    if proc.returncode == 0 or max(done) == STEPS:
        pytest.skip("the run finished before SIGTERM arrived (machine too fast for this timing)")
    assert "interrupted by signal 15: checkpoint saved to" in err, err[-4000:]

    res = torchrun("fsdp", *args, "resume=true", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    strip = lambda run: [{k: v for k, v in r.items() if "time" not in k} for r in records(run)]  # noqa: E731
    assert strip(tmp_path / "cut") == strip(fsdp_run)
    assert torch.equal(torch.cat([w.flatten().float() for w in weights(tmp_path / "cut").values()]),
                       torch.cat([w.flatten().float() for w in weights(fsdp_run).values()]))


@pytest.mark.slow
def test_fsdp_matches_ddp_with_per_sample_gradients_and_srste(corpus, tmp_path):
    """PSQ at 4 bits (stochastic rounding, per-tensor activation ranges: both per rank slice) with 2:4 masks
    and SR-STE: sharding the parameters changes nothing DDP computes."""
    extra = ["+quant=per_sample", "bits=4", "+sparsity=nm", "sparsity.every=3", "sparsity.srste_decay=0.0002"]
    for strategy in ("fsdp", "ddp"):
        res = torchrun(strategy, *settings(corpus, *extra), f"hydra.run.dir={strategy}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-4000:]
    assert_same_run(tmp_path / "fsdp", tmp_path / "ddp")



@pytest.mark.slow
@pytest.mark.parametrize("case", ["llama", "cnn1d"])
def test_fsdp_matches_one_process_on_other_models(case, corpus, data_cache, tmp_path):
    """Llama: grouped-query attention, the head tied to the embedding (both in the root unit), transposable
    masks. cnn1d: no blocks, so the root is the only unit; batch 333 splits 167/166 (uneven slices)."""
    args = {
        "llama": ["model=llama", "model.n_layer=2", "model.n_head=2", "model.n_kv_head=1", "model.dim=16",
                  "model.block_size=32", "model.tie_weights=true", "dataset=text", "dataset.tokenizer=char", f"dataset.root={corpus}",
                  "batch_size=8", "+quant=mxfp8", "+sparsity=transposable", "sparsity.every=3"],
        "cnn1d": ["model=cnn1d", f"dataset.cache_dir={data_cache}", "batch_size=333", "+sparsity=nm",
                  "sparsity.every=3"],
    }[case] + LOOP
    res = torchrun("fsdp", *args, "hydra.run.dir=fsdp", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    run_training(compose_conf("train", args), tmp_path / "single")
    assert_same_run(tmp_path / "fsdp", tmp_path / "single")
