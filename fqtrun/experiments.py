"""Run a grid of training variants over seeds in-process and tabulate mean ± std.

The reproduction scripts in scripts/ are thin layers over this: a dict of named variants
(lists of Hydra overrides of `fqtrun train`), a list of seeds, and a markdown table out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fqtrun.config import register_configs
from fqtrun.markdown import markdown_table as markdown_table  # the scripts' tables

CONF = str(Path(__file__).resolve().parent / "conf")


def compose_config(overrides: Iterable[str], config_name: str = "train") -> DictConfig:
    """The config `fqtrun <config_name> <overrides>` would run with."""
    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def run_grid(variants: dict[str, list[str]], seeds: Iterable[int], common: list[str], out: Path,
             on_done: Callable[[str, int, dict], None] | None = None) -> dict[str, list[dict]]:
    """Train every variant at every seed into out/<variant>/seed<k>; reuse finished runs.

    Returns {variant: [summary per seed]}. A run whose summary.json exists is not redone,
    so an interrupted grid continues where it stopped.
    """
    from fqtrun.runs.train import finished_summary, run_training

    results: dict[str, list[dict]] = {}
    for label, overrides in variants.items():
        for seed in seeds:
            run_dir = Path(out) / label / f"seed{seed}"
            every = [*common, *overrides, f"seed={seed}"]
            summary = finished_summary(run_dir, every)
            if summary is None:
                summary = run_training(compose_config(every), run_dir, overrides=every)
            results.setdefault(label, []).append(summary)
            if on_done:
                on_done(label, seed, summary)
    return results


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (sample std; a single value has no ± part)."""
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"
