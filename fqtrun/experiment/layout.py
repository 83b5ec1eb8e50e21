"""Where an experiment's runs and results live, and reading them back.

    <out>/reproduce.yaml                 the resolved config of the reproduction (the spec)
    <out>/runs/<variant>/seed<k>/        a `fqtrun train` run folder (.hydra/, summary.json, metrics.jsonl, ...)
    <out>/<kind>/<step>/seed<k>/         a follow-up step's folder (variance.json, mask.json, intbn.json)
    <out>/tables.md                      the rendered tables (and the figures they show)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fqtrun.errors import ConfigError, FqtrunError
from fqtrun.experiment.spec import ReproduceConfig, step_seeds, steps, variant_seeds

SPEC_FILE = "reproduce.yaml"
TABLES_FILE = "tables.md"
RESULT_FILES = {"variance": "variance.json", "mask": "mask.json", "intbn": "intbn.json"}  # what each kind writes


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed{seed}"


def step_dir(out: Path, kind: str, name: str, seed: int) -> Path:
    return Path(out) / kind / name / f"seed{seed}"


def is_experiment(folder: Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def save_spec(out: Path, cfg: DictConfig) -> Path:
    path = Path(out) / SPEC_FILE
    OmegaConf.save(cfg, path, resolve=True)
    return path


def load_spec(folder: Path) -> DictConfig:
    """The reproduce config saved in an experiment folder, checked against its schema."""
    path = Path(folder) / SPEC_FILE
    try:
        return OmegaConf.merge(OmegaConf.structured(ReproduceConfig), OmegaConf.load(path))
    except Exception as e:
        raise ConfigError(f"{path} is not a fqtrun reproduce spec ({' '.join(str(e).split())[:160]}): "
                          "run fqtrun reproduce <name> into that folder again") from None


@dataclass
class Results:
    """What an experiment folder holds: its spec and one record per seed of every source (variant or step)."""

    folder: Path
    spec: DictConfig
    records: dict[str, list[dict]]  # variant -> summary.json per seed; step -> its result file per seed
    folders: dict[str, list[Path]]  # source -> the folder of each record


def load_results(folder: Path) -> Results:
    """Read every run's summary.json and every step's result; a missing one is a one-line error."""
    folder = Path(folder)
    spec = load_spec(folder)
    exp = spec.experiment
    folders = {name: [run_dir(folder, name, s) for s in variant_seeds(exp, name)] for name in exp.variants}
    folders |= {name: [step_dir(folder, kind, name, s) for s in step_seeds(exp, step)] for kind, name, step in steps(exp)}
    files = {name: "summary.json" for name in exp.variants} | {name: RESULT_FILES[kind] for kind, name, _ in steps(exp)}
    records = {name: [_read(f / files[name], exp.name, folder) for f in paths] for name, paths in folders.items()}
    return Results(folder, spec, records, folders)


def _read(path: Path, name: str, folder: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FqtrunError(f"{path} is missing or unreadable: finish the experiment with "
                          f"fqtrun reproduce {name} out={folder}") from None
