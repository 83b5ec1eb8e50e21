"""`fqtrun reproduce <name>`: train an experiment's grid, run its follow-up steps, write its tables.

Every (variant, seed) is one `fqtrun train` run in <out>/runs/<variant>/seed<k> (experiment/layout.py),
with the overrides `<common> <variant's> <reproduce overrides> seed=<k>` (later ones win). A run that
finished with the same overrides is reused and one with other overrides is refused: the one rule of
runs.train.finished_summary. With jobs > 1 the trainings run in `jobs` spawned processes; every run
starts from one torch thread (its `threads` setting may change that), so no figure depends on jobs.
The steps (`fqtrun variance`, `mask`, `intbn` on trained runs) are short and run again every time.
numerics.portable=true (the default) adds numerics.portable=true to every run's overrides and sets it in every
step: the process was pinned by the CLI (fqtrun/numerics_mode.py) and job processes inherit its environment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fqtrun.config import compose_conf, register_configs
from fqtrun.errors import ConfigError
from fqtrun.experiment.layout import run_dir, save_spec, step_dir
from fqtrun.experiment.spec import check_experiment, step_seeds, steps, variant_seeds
from fqtrun.experiment.spec import register_configs as register_reproduce_schema
from fqtrun.numerics_mode import portable_scope
from fqtrun.report.experiment import build_blocks, experiment_report
from fqtrun.runs.intbn import register_intbn_schema, run_intbn_study
from fqtrun.runs.mask import run_mask_study
from fqtrun.runs.train import finished_summary, run_training
from fqtrun.runs.variance import register_variance_schema, run_study


def compose_config(config_name: str, overrides: Sequence[str]) -> tuple[DictConfig, dict[str, str]]:
    """The config `fqtrun <config_name> <overrides>` runs with, and its config-group choices (model=...)."""
    register_configs()
    register_variance_schema()
    register_intbn_schema()
    register_reproduce_schema()
    cfg = compose_conf(config_name, overrides, return_hydra_config=True)
    choices = {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if v is not None and "/" not in k}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@dataclass(frozen=True)
class RunTask:
    """One training of the grid (plain values: it travels to a worker process)."""

    variant: str
    seed: int
    overrides: tuple[str, ...]
    folder: str


def train_one(task: RunTask) -> tuple[dict, bool]:
    """(summary, reused): the finished run in task.folder, or a new training there from one torch thread."""
    folder = Path(task.folder)
    if (done := finished_summary(folder, task.overrides)) is not None:
        return done, True
    cfg, choices = compose_config("train", task.overrides)
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)  # what `fqtrun train` leaves: the steps and
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # `fqtrun report` rebuild the run from it
    OmegaConf.save(OmegaConf.create(list(task.overrides)), folder / ".hydra" / "overrides.yaml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_training(cfg, folder, overrides=task.overrides, choices=choices), False
    finally:
        torch.set_num_threads(threads)


def grid_tasks(cfg: DictConfig, out: Path) -> list[RunTask]:
    exp = cfg.experiment
    portable = ["numerics.portable=true"] if cfg.numerics.portable else []  # native runs keep their overrides
    return [RunTask(name, seed, (*exp.common, *variant.overrides, *cfg.overrides, *portable, f"seed={seed}"),
                    str(run_dir(out, name, seed)))
            for name, variant in exp.variants.items() for seed in variant_seeds(exp, name)]


def train_grid(tasks: list[RunTask], jobs: int, log: Callable[[str], None]) -> int:
    """Train (or reuse) every task, `jobs` at a time; returns how many were reused."""
    reused = 0

    def done(task: RunTask, summary: dict, again: bool) -> None:
        nonlocal reused
        reused += again
        how = "reused" if again else f"{summary['wall_time_s']:.0f} s"
        log(f"{task.variant} seed {task.seed}: test loss {summary['final_test_loss']:.4f}, "
            f"acc {summary['final_test_acc']:.4f} ({how})")

    if jobs == 1:
        for task in tasks:
            done(task, *train_one(task))
        return reused
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_one, task): task for task in tasks}
        try:
            for future in as_completed(futures):
                done(futures[future], *future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return reused


def _variance(cfg: DictConfig, folder: Path, run: Path) -> dict:
    """`fqtrun variance` on a trained run, with the run's own model and dataset settings."""
    trained = OmegaConf.create(OmegaConf.to_container(OmegaConf.load(run / ".hydra" / "config.yaml"), resolve=True))
    cfg.dataset, cfg.model = trained.dataset, trained.model
    name = json.loads((run / "summary.json").read_text(encoding="utf-8"))["model"]
    return run_study(cfg, folder, name)[0]


STEP_RUNNERS: dict[str, Callable[[DictConfig, Path, Path], dict]] = {
    "variance": _variance,
    "mask": lambda cfg, folder, run: run_mask_study(cfg, folder),
    "intbn": lambda cfg, folder, run: run_intbn_study(cfg, folder),
}


def run_steps(cfg: DictConfig, out: Path, log: Callable[[str], None]) -> None:
    """Every follow-up step on every seed it names, in this process."""
    exp = cfg.experiment
    for kind, name, step in steps(exp):
        for seed in step_seeds(exp, step):
            run = run_dir(out, step.run, seed)
            step_cfg, _ = compose_config(kind, step.overrides)
            step_cfg.checkpoint = str(run / "last.pt")
            step_cfg.numerics.portable = cfg.numerics.portable
            log(f"{kind} {name} on {step.run} seed {seed}")
            STEP_RUNNERS[kind](step_cfg, step_dir(out, kind, name, seed), run)


def check_composes(cfg: DictConfig, tasks: list[RunTask]) -> None:
    """Compose every run and step of the experiment before anything runs: a bad or unread setting in any
    variant is a one-line ConfigError naming the variant, not a failure after hours of training."""
    exp = cfg.experiment
    where = [(f"variant {t.variant}", "train", t.overrides) for t in tasks if t.seed == variant_seeds(exp, t.variant)[0]]
    where += [(f"step {name}", kind, step.overrides) for kind, name, step in steps(exp)]
    for what, command, overrides in where:
        try:
            compose_config(command, overrides)
        except Exception as e:  # noqa: BLE001 (Hydra's override and schema errors too: one line, the variant named)
            raise ConfigError(f"experiment {exp.name}, {what}: {' '.join(str(e).split())[:300]}") from None


@portable_scope
def run_reproduction(cfg: DictConfig, log: Callable[[str], None] = print) -> dict:
    """Train the grid, run the steps, write reproduce.yaml and tables.md into cfg.out; returns what it did."""
    exp = cfg.experiment
    check_experiment(exp)
    build_blocks(exp)
    if cfg.jobs < 1:
        raise ConfigError(f"jobs={cfg.jobs} must be >= 1 (trainings at a time)")
    out = Path(cfg.out).expanduser()
    tasks = grid_tasks(cfg, out)
    check_composes(cfg, tasks)
    out.mkdir(parents=True, exist_ok=True)
    save_spec(out, cfg)
    reused = train_grid(tasks, cfg.jobs, log)
    run_steps(cfg, out, log)
    return {"out": str(out), "runs": len(tasks), "reused": reused, "tables": experiment_report(out)}
