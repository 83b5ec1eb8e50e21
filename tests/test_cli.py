"""The `fqtrun` command as a user runs it: help, one-line errors with exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fqtrun.runs.train import run_training

FQTRUN = [sys.executable, "-m", "fqtrun"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "FQTRUN_DEBUG": ""}


def fqtrun(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*FQTRUN, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_help_lists_commands_from_any_folder(tmp_path):
    out = fqtrun("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("train", "variance", "prt", "mask", "intbn", "report", "reproduce", "bench", "sample"):
        assert f"  {command}" in out.stdout


def test_train_help_is_hydras_with_config_groups(tmp_path):
    out = fqtrun("train", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert "== Configuration groups ==" in out.stdout and "quant: " in out.stdout


@pytest.mark.parametrize("args,expected", [
    (["nosuch"], "unknown command 'nosuch'"),
    (["train", "model=foo"], "model=foo is unknown: use one of cnn1d,"),
    (["train", "-m", "+quant=qat,bar"], "quant=bar is unknown: use one of bhq,"),
    (["train", "bits=0"], "bits=0 is out of range"),
    (["train", "dataset=cifar10"], "dataset.root is required"),
    (["train", "dataset=cifar10", "dataset.root=/nonexistent"], "dataset.root=/nonexistent: expected"),
    (["train", "hydra.run.dir=/proc/fqtrun/x"], "output folder /proc/fqtrun/x cannot be written"),
    (["train", "model=gpt", "dataset=text", "dataset.root=/nonexistent"], "dataset.root=/nonexistent does not exist"),
    (["sample"], "checkpoint is required and not set: pass checkpoint=<value>"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    out = fqtrun(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], out.stderr


def test_sigterm_saves_a_checkpoint_and_resume_matches(compose_train, tmp_path, data_cache):
    """A preempted run (SIGTERM mid-epoch) resumes to exactly the uninterrupted run's metrics."""
    overrides = ["epochs=3", "batch_size=100", "logger.log_every=5", "+quant=per_sample", "bits=4"]
    full = tmp_path / "full"
    run_training(compose_train(*overrides), full)

    cut = tmp_path / "cut"
    args = ["train", *overrides, f"hydra.run.dir={cut}", f"dataset.cache_dir={data_cache}",
            "logger.wandb.mode=disabled", "logger.progress=none", "threads=1"]
    proc = subprocess.Popen([*FQTRUN, *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived (machine too fast for this timing)")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved to" in err and (cut / "last.pt").is_file()

    run_training(compose_train(*overrides, "resume=true"), cut)
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if "time" not in k} for x in p.read_text().splitlines()]
    assert strip(cut / "metrics.jsonl") == strip(full / "metrics.jsonl")


@pytest.mark.parametrize("args,expected", [
    (["train", "bits=4.5"], "Value '4.5' of type 'float' could not be converted to Integer (setting bits)"),
    (["train", "dataset.rooot=3"], "Key 'rooot' not in 'Mnist1dConfig' (setting dataset.rooot)"),
])
def test_schema_errors_are_one_line(tmp_path, args, expected):
    out = fqtrun(*args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {expected}: see `fqtrun train --help` " \
        "for the settings and their types", out.stderr


@pytest.mark.parametrize("args,expected", [
    (["bits=4"], "bits=4 sets quantizer bits but the run has no quantization recipe: add +quant="),
    (["quant.bits_w=4"], "quant.bits_w=4 sets the quant recipe but none is chosen: add +quant=<qat|"),
    (["+sparsity=nm", "sparsity.method=greedy"],
     "sparsity.method does not exist for the chosen sparsity option: it belongs to sparsity=transposable"),
    (["lr.min_lr_ratio=0.1"], "lr.min_lr_ratio does not exist for the chosen lr option: it belongs to lr=cosine"),
])
def test_settings_that_would_do_nothing_refuse(tmp_path, capsys, args, expected):
    """In-process (the subprocess form is tested above): refused before any data or model is built."""
    from fqtrun.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"hydra.run.dir={tmp_path}", "logger.wandb.mode=disabled"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "metrics.jsonl").exists()
