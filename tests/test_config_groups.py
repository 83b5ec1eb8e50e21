"""Every option of every config group composes with conf/train.yaml, and the built objects work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF
from fqtrun.config import validate_train

GROUPS = {"optim": "", "lr": "", "logger": "", "schedule": "", "quant": "+", "sparsity": "+"}
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((Path(CONF) / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_group_option_composes_and_validates(compose_train, group, option):
    extra = ["+quant=per_sample"] if group == "schedule" else []
    cfg = compose_train(f"{GROUPS[group]}{group}={option}", *extra)
    assert cfg[group] is not None
    validate_train(cfg)
    if group == "optim":
        opt = instantiate(cfg.optim)(params=[torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(opt, torch.optim.Optimizer)


def test_aliases_equal_their_targets(compose_train):
    for alias, name in (("ptq", "per_tensor"), ("psq", "per_sample"), ("bhq", "householder")):
        assert compose_train(f"+quant={alias}").quant == compose_train(f"+quant={name}").quant


def test_bits_feeds_every_slot_and_a_slot_overrides_alone(compose_train):
    q = compose_train("+quant=householder", "bits=5", "quant.bits_dw=8").quant
    assert (q.bits_w, q.bits_a, q.bits_dx, q.bits_dw) == (5, 5, 5, 8)
