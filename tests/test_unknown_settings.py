"""A setting that nothing reads is refused: with or without +, at every level of every command, in one line.

The walk below finds the levels itself (every typed node of each command's composed config, every
option of every config group a command uses), so a new setting or group cannot reintroduce the hole.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError

from fqtrun import cli
from fqtrun.config import compose_conf
from fqtrun.config_keys import unknown_settings

COMMANDS = [name for name in cli.COMMANDS if (cli.CONF / f"{name}.yaml").is_file()]
BOGUS = "zz_not_a_setting"
NEEDS = {"reproduce": ["experiment=qat"]}  # what a command cannot start without


def typed_levels(cfg: DictConfig) -> list[str]:
    """Dotted paths of every typed (dataclass) node of a composed config, the root as ''."""
    out = []

    def walk(node: DictConfig, path: str) -> None:
        if node._is_none() or node._is_missing():
            return
        out.append(path)
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (None, dict):
                walk(child, f"{path}.{key}" if path else str(key))

    walk(cfg, "")
    return out


def refusal(argv: list[str], capsys) -> str:
    """The CLI's one line for argv (it must exit 2 before any command runs)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def group_options(command: str) -> list[tuple[str, str, bool]]:
    """(group, option, optional) for every option of every conf/ group the command composes."""
    importlib.import_module(cli.COMMANDS[command][0])  # its schemas
    choices = compose_conf(command, NEEDS.get(command, []), return_hydra_config=True).hydra.runtime.choices
    groups = {g for g in choices if "/" not in g and (cli.CONF / g).is_dir()}
    cfg = compose_conf(command, NEEDS.get(command, []))
    groups |= {g for g in cli.OPTIONAL_GROUPS if g in cfg and cfg[g] is None}  # chosen with +group=option
    return [(g, p.stem, choices.get(g) is None) for g in sorted(groups) for p in sorted((cli.CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_level_refuses_an_unknown_key(command, capsys):
    importlib.import_module(cli.COMMANDS[command][0])
    levels = typed_levels(compose_conf(command, NEEDS.get(command, [])))
    assert "" in levels, levels
    for level in levels:
        key = f"{level}.{BOGUS}" if level else BOGUS
        line = refusal([command, *NEEDS.get(command, []), f"+{key}=1"], capsys)
        assert f"{key} is not a setting of" in line, line


@pytest.mark.parametrize("command", COMMANDS)
def test_every_group_option_refuses_an_unknown_key(command, capsys):
    seen = 0
    for group, option, optional in group_options(command):
        choose = f"{'+' if optional else ''}{group}={option}"
        line = refusal([command, *NEEDS.get(command, []), choose, f"+{group}.{BOGUS}=1"], capsys)
        assert f"{group}.{BOGUS} is not a setting of {group}={option}" in line, line
        seen += 1
    assert seen > 40 or command != "train", seen  # the walk found train's groups (model, dataset, quant, ...)


def test_typo_names_the_setting_meant(capsys):
    line = refusal(["train", "+trainer.max_step=100"], capsys)
    assert "trainer.max_step is not a setting of trainer" in line and "did you mean trainer.max_steps?" in line
    line = refusal(["train", "model=gpt", "dataset=text", "+model.n_layers=2"], capsys)
    assert "did you mean model.n_layer?" in line and "model=gpt" in line


def test_a_sweep_is_checked_for_every_group_option(capsys):
    """-m with several quant recipes: the key must exist in each (bits_w exists in all, grad_grid too)."""
    line = refusal(["train", "-m", "+quant=qat,per_sample", "bits=4,5", "+quant.bogus=1"], capsys)
    assert "quant.bogus is not a setting of quant=qat" in line
    assert cli.check_composes("train", ["-m", "+quant=qat,per_sample", "bits=4,5", "quant.grad_grid=minmax"]) is None


def test_sweep_forms_only_a_sweeper_expands_are_left_to_hydra():
    """glob and interval sweeps are not composable values: the pre-check leaves them to Hydra's sweeper."""
    assert cli.sweep_combinations(["+quant=glob(per_*)", "seed=range(0,3)"]) is None
    assert cli.check_composes("train", ["-m", "+quant=glob(per_*)", "seed=range(0,3)"]) is None
    assert cli.check_composes("train", ["-m", "optim.lr=interval(0.001,0.01)"]) is None
    assert len(cli.sweep_combinations(["seed=range(0,3)", "bits=4,8", "+quant=qat,per_sample"])) == 2


def test_known_settings_and_hydra_keys_still_compose():
    for args in (["+quant=per_sample", "bits=4", "trainer.max_steps=3"], ["hydra.run.dir=/tmp/x", "seed=3"],
                 ["+quant=qat", "quant.bits_w=4", "+sparsity=nm", "sparsity.n=2"]):
        assert cli.check_composes("train", args) is None, args
    cfg = compose_conf("train", ["+quant=per_sample"])
    assert unknown_settings(cfg) == []
    with pytest.raises(ConfigAttributeError):  # struct mode still refuses a key without +, as Hydra does
        cfg.trainer.bogus  # noqa: B018


def test_experiment_variants_are_checked_before_anything_runs(tmp_path):
    from fqtrun.runs.reproduce import compose_config, run_reproduction

    cfg, _ = compose_config("reproduce", ["experiment=qat", f"out={tmp_path / 'exp'}", "numerics.portable=false"])
    cfg.experiment.variants["cnn1d_fp32"].overrides.append("+trainer.bogus=1")
    with pytest.raises(Exception, match="variant cnn1d_fp32: trainer.bogus is not a setting of trainer"):
        run_reproduction(cfg, log=lambda _: None)
    assert not (tmp_path / "exp").exists()


def test_construction_errors_are_one_line():
    """A component that does not take its settings (here a keyword its class has no parameter for) is
    reported as one line naming the node and the class, not Hydra's multi-line 'Error in call to target'."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from fqtrun.commands.common import user_error

    node = OmegaConf.create({"model": {"_target_": "fqtrun.models.cnn1d.CNN1D", "bogus": 2}})
    with pytest.raises(InstantiationException) as err:
        instantiate(node.model, num_classes=10, input_shape=(1, 40))
    line = str(user_error(err.value))
    assert "\n" not in line and "fqtrun.models.cnn1d.CNN1D" in line and "bogus" in line, line


@pytest.mark.parametrize("args,expected", [
    (["train", "+foo=1"], "foo is not a setting of fqtrun train"),
    (["train", "+trainer.bogus=1"], "trainer.bogus is not a setting of trainer"),
    (["train", "+model.bogus=2"], "model.bogus is not a setting of model=cnn1d"),
    (["train", "+quant=qat", "+quant.bogus=3"], "quant.bogus is not a setting of quant=qat"),
    (["variance", "+variance.grad_grid=zero_aligned"], "variance.grad_grid is not a setting of variance"),
    (["train", "-m", "+quant=qat,per_sample", "+trainer.max_step=5"], "did you mean trainer.max_steps?"),
])
def test_the_cli_refuses_in_one_line_and_writes_nothing(tmp_path, args, expected):
    env = {**os.environ, "WANDB_MODE": "disabled", "FQTRUN_DEBUG": ""}
    out = subprocess.run([sys.executable, "-m", "fqtrun", *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], out.stderr
    assert list(Path(tmp_path).iterdir()) == []  # no outputs/, multirun/ or wandb/ folder
