"""fqtrun reproduce <name>: one documented experiment (conf/experiment/<name>.yaml) end to end.

    fqtrun reproduce fqt jobs=2                    (the name is positional; or experiment=fqt)
    fqtrun reproduce qat out=results/qat_smoke 'overrides=["epochs=1"]'   (quoted: Hydra's list syntax)

Trains every variant at every seed into <out>/runs (finished runs are reused), runs the
experiment's follow-up steps, writes <out>/reproduce.yaml and <out>/tables.md and prints the tables.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from fqtrun.commands.common import run_reporting_errors, split_positionals
from fqtrun.errors import ConfigError
from fqtrun.experiment.spec import register_configs
from fqtrun.runs.reproduce import run_reproduction

register_configs()
EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"


def prepare_argv(args: list[str]) -> list[str]:
    """A positional experiment name -> experiment=<name>; Hydra flags and overrides pass through."""
    names, out = split_positionals(args)
    if len(names) > 1:
        raise ConfigError(f"fqtrun reproduce takes one experiment name, got {' '.join(names)}: run them one by one")
    if not names and not any(a.startswith(("-", "experiment=")) for a in out):
        known = "|".join(sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
        raise ConfigError(f"fqtrun reproduce needs an experiment name: fqtrun reproduce <{known}>")
    return out + [f"experiment={n}" for n in names]


def reproduce(cfg: DictConfig, out_dir: Path) -> dict:
    result = run_reproduction(cfg, log=lambda line: print(line, flush=True))
    print(result["tables"])
    print(f"{result['runs']} runs ({result['reused']} reused); written {Path(result['out']) / 'tables.md'}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="reproduce")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(reproduce, cfg)
