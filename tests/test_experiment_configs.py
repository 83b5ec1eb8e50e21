"""conf/experiment/*.yaml: every README experiment composes under `fqtrun reproduce`, every run and step
it names composes as its command's config, and every table block builds; bad specs are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF
from fqtrun.errors import ConfigError
from fqtrun.experiment.spec import ReproduceConfig, check_experiment, steps
from fqtrun.report.experiment import ClaimsTable, Verdict, build_blocks
from fqtrun.runs.reproduce import compose_config, grid_tasks

EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))


def test_the_readme_experiments_are_there():
    assert EXPERIMENTS == ["cpt", "fqt", "lm", "lm_formats", "lm_llama", "qat", "ridge", "sparsity"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_every_run_step_and_table(name, tmp_path):
    cfg, _ = compose_config("reproduce", [f"experiment={name}"])
    exp = cfg.experiment
    assert exp.name == name and cfg.out == f"results/{name}" and cfg.jobs == 1
    check_experiment(exp)
    tasks = grid_tasks(cfg, tmp_path)
    assert len({t.folder for t in tasks}) == len(tasks) == sum(len(v.seeds or exp.seeds) for v in exp.variants.values())
    for task in tasks:  # the seed comes last, after the common and the variant's overrides
        assert task.overrides[-1] == f"seed={task.seed}" and "threads=1" in task.overrides
    first = {t.variant: t for t in tasks}  # one seed of each variant: the others differ only in seed=
    for task in first.values():
        train, choices = compose_config("train", task.overrides)
        assert train.threads == 1 and {"model", "dataset"} <= set(choices)  # they label the run's summary
    for kind, _, step in steps(exp):
        step_cfg, _ = compose_config(kind, step.overrides)
        assert step_cfg.threads == 1
    assert all(callable(block.render) for block in build_blocks(exp))  # labels are text, sources known


def test_fqt_strict_table_takes_the_8_bit_column_from_the_paper_runs():
    """At 8 bits the two protocols are one run: the strict grid's last column is the paper variant."""
    exp = compose_config("reproduce", ["experiment=fqt"])[0].experiment
    strict = next(t for t in exp.tables if "Stricter" in t.get("title", ""))
    assert [row[-1] for row in strict.rows.values()] == ["paper_ptq_dx8", "paper_psq_dx8", "paper_bhq_dx8"]
    assert all(f"strict_{q}_dx8" not in exp.variants for q in ("ptq", "psq", "bhq"))


def test_every_experiment_has_verdicts_and_claims():
    """Each README experiment shows paired verdicts in its tables and measures its papers' claims."""
    for name in EXPERIMENTS:
        exp = compose_config("reproduce", [f"experiment={name}"])[0].experiment
        blocks = build_blocks(exp)
        cells = [c for b in blocks for c in [*getattr(b, "columns", []), getattr(b, "cell", None)]]
        assert any(isinstance(c, Verdict) for c in cells), name
        assert isinstance(blocks[-1], ClaimsTable) and exp.claims, name


CLAIM = {"claim": "a beats b", "source": "a paper", "a": "a", "b": "b", "key": "final_test_acc", "expect": "better"}


def spec(**experiment):
    base = {"name": "tiny", "variants": {"a": {"overrides": []}}}
    if "claims" in experiment:  # a second variant and a one-seed step to compare with
        base = {**base, "variants": {"a": {}, "b": {}}, "variance": {"v": {"run": "a", "seed": 1}}}
    return OmegaConf.merge(OmegaConf.structured(ReproduceConfig), {"experiment": {**base, **experiment}}).experiment


@pytest.mark.parametrize("experiment, message", [
    ({"variants": {}}, "experiment tiny has no variants"),
    ({"seeds": []}, "variant a has no seeds"),
    ({"mask": {"m": {"run": "b"}}}, r"experiment.mask.m.run=b is not a variant: use one of a$"),
    ({"intbn": {"i": {"run": "a", "seed": 7}}}, r"experiment.intbn.i.seed=7 is not a seed of variant a \(\[0, 1, 2\]\)"),
    ({"variance": {"a": {"run": "a"}}}, "the name a is used twice"),
    ({"claims": [CLAIM | {"b": "fp16"}]}, r"claims\[0\] \('a beats b'\): b=fp16 is no variant or step: use one of a, "
                                          r"b, v$"),
    ({"claims": [CLAIM | {"a": "b"}]}, r"claims\[0\] \('a beats b'\) compares b with itself"),
    ({"claims": [CLAIM | {"b": "v"}]}, r"a \[0, 1, 2\] and v \[1\] share only seed 1, and a paired 95% interval "
                                      r"needs 2 or more: run both on the same seeds"),
    ({"claims": [CLAIM], "variants": {"a": {}, "b": {"seeds": [5, 6]}}},
     r"a \[0, 1, 2\] and b \[5, 6\] share no seed"),
    ({"claims": [CLAIM | {"margin": 0.5}]}, r"margin=0.5: a margin is 0 or more and only reads with expect=no_worse"),
])
def test_bad_specs_are_one_line(experiment, message):
    with pytest.raises(ConfigError, match=message):
        check_experiment(spec(**experiment))
