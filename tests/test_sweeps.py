"""Sweeps through Hydra's multirun and its launchers, run as real `fqtrun train -m` subprocesses.

A joblib sweep of 4 jobs in parallel processes; a sweep with one bad job; a re-run that skips
the done jobs (skip_done=true); one job through submitit's local executor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fqtrun.errors import FqtrunError
from fqtrun.runs.train import finished_summary

FQTRUN = str(Path(sys.executable).with_name("fqtrun"))
QUIET = ["logger.wandb.mode=disabled", "logger.progress=none", "threads=1"]


def fqtrun(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    """`fqtrun <args>` in a subprocess with tiny-run settings; output captured."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([FQTRUN, *args, *QUIET, f"dataset.cache_dir={cache}"], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=300)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory, data_cache) -> Path:
    """4 jobs (bits 4,8 x seed 0,1) through hydra/launcher=parallel (joblib), 2 at a time."""
    root = tmp_path_factory.mktemp("joblib")
    res = fqtrun("train", "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep",
                 "+quant=qat", "bits=4,8", "seed=0,1", "epochs=1", "batch_size=400", "logger.log_every=5",
                 cwd=root, cache=data_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    return root / "sweep"


def test_joblib_sweep_finishes_four_jobs_without_clobbering(joblib_sweep):
    multirun = yaml.safe_load((joblib_sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["launcher"]["_target_"].endswith("JoblibLauncher")
    jobs = job_dirs(joblib_sweep)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        summary = json.loads((job / "summary.json").read_text())
        # each folder holds its own job's results: the summary was written by the job with these overrides
        assert summary["overrides"] == overrides
        cfg = dict(o.lstrip("+").split("=", 1) for o in overrides)
        assert summary["bits_used"] == {"w": int(cfg["bits"]), "a": int(cfg["bits"])}
        seen.add((cfg["bits"], cfg["seed"]))
        lines = (job / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert [r["split"] for r in records] == ["train", "train", "test"]  # 10 steps, log_every=5, 1 epoch
        assert all(r.get("bits_w", int(cfg["bits"])) == int(cfg["bits"]) for r in records)
        assert (job / "last.pt").stat().st_size > 0 and not (job / "failed.json").exists()
    assert seen == {("4", "0"), ("4", "1"), ("8", "0"), ("8", "1")}


def test_failed_job_is_recorded_and_rerun_skips_done_jobs(tmp_path, data_cache):
    args = ("train", "-m", "hydra.sweep.dir=sweep", "+quant=qat", "bits=4,40", "skip_done=true", "epochs=1",
            "batch_size=400")
    first = fqtrun(*args, cwd=tmp_path, cache=data_cache)
    assert first.returncode == 1, first.stderr[-3000:]  # the sweep went on, then reported the failure
    assert "error: 1 job(s) of the sweep" in first.stderr
    good, bad = job_dirs(tmp_path / "sweep")
    assert (good / "summary.json").is_file() and not (good / "failed.json").exists()
    failure = json.loads((bad / "failed.json").read_text())
    assert "bits=40" in failure["error"] and failure["user_error"] and "\n" not in failure["error"]
    assert "bits=40" in failure["overrides"]
    assert not (bad / "summary.json").exists()
    assert "recorded in failed.json" in first.stderr

    stamp = {f: (good / f).stat().st_mtime_ns for f in ("summary.json", "metrics.jsonl", "last.pt")}
    again = fqtrun(*args, cwd=tmp_path, cache=data_cache)
    assert again.returncode == 1, again.stderr[-3000:]
    assert f"skip: {good.resolve()} already holds summary.json" in again.stdout
    assert {f: (good / f).stat().st_mtime_ns for f in stamp} == stamp  # untouched
    assert json.loads((bad / "failed.json").read_text())["error"] == failure["error"]  # tried again, failed


def test_skip_done_refuses_a_finished_run_with_other_overrides(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"overrides": ["bits=4", "skip_done=true"],
                                                       "final_test_acc": 0.5}))
    with pytest.raises(FqtrunError, match="other overrides"):
        finished_summary(tmp_path, [])  # the current overrides [] != [bits=4]
    same = {"overrides": ["skip_done=true"], "final_test_acc": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(same))
    assert finished_summary(tmp_path, ["skip_done=true"])["final_test_acc"] == 0.5
    assert finished_summary(tmp_path / "absent", []) is None


def test_submitit_local_runs_one_job(tmp_path, data_cache):
    pytest.importorskip("submitit", reason="hydra-submitit-launcher (optional extra): pip install .[sweeps]")
    res = fqtrun("train", "-m", "hydra/launcher=local", "hydra.sweep.dir=sweep", "epochs=1", "batch_size=400",
                 cwd=tmp_path, cache=data_cache)
    assert res.returncode == 0, res.stderr[-3000:]
    (job,) = job_dirs(tmp_path / "sweep")
    summary = json.loads((job / "summary.json").read_text())
    assert summary["epochs"] == 1 and 0.0 <= summary["final_test_acc"] <= 1.0
    logs = list((tmp_path / "sweep" / ".submitit").glob("*/*_log.out"))
    assert logs, "submitit wrote no job log: the job did not run through submitit"


def test_cli_lets_hydra_own_launcher_names_through():
    from fqtrun.cli import check_group_choices

    for name in ("basic", "joblib", "submitit_local", "submitit_slurm", "parallel", "local", "slurm"):
        assert check_group_choices([f"hydra/launcher={name}"]) is None
    assert "unknown" in check_group_choices(["model=nope"])
