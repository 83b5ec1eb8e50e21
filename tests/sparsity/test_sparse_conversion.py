"""One-shot conversion pieces: folding a sparse run's masks, calibration batches, the conversion steps,
the sparse checkpoint's recipe (spec sparsity.md, "Training with masks")."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from fqtrun.quant.convert import convert
from fqtrun.quant.layers import NoiseContext
from fqtrun.sparsity.checkpoint import sparse_recipe
from fqtrun.sparsity.config import TransposableSparsity
from fqtrun.sparsity.conversion import calibration_batches, convert_to_sparse, fold_masks
from fqtrun.sparsity.policy import MaskPolicy


def _capable(model: nn.Module) -> nn.Module:
    """The model with mask-capable (plain, unquantized) layers, as a sparse run builds it."""
    convert(model, lambda slot, module: None, NoiseContext(seed=0))
    return model.eval()


def _mlp(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    return _capable(nn.Sequential(nn.Linear(8, 16), *([nn.BatchNorm1d(16)] if bn else []), nn.ReLU(),
                                  nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)))


def test_fold_masks_multiplies_them_into_the_weights():
    model = _mlp(bn=False)
    dense = [layer.weight.detach().clone() for layer in (model[0], model[2])]
    policy = MaskPolicy("nm", 1, 4)
    policy.attach(model)
    masks = [model.get_submodule(n).weight_mask.clone() for n in policy.names]
    assert fold_masks(model) == 2 and fold_masks(model) == 0
    for layer, w, mask in zip((model[0], model[2]), dense, masks):
        assert layer.weight_mask is None
        assert torch.equal(layer.weight.detach(), w * mask)


def test_calibration_batches_are_the_first_of_a_seeded_shuffle():
    data = TensorDataset(torch.arange(50.0).reshape(50, 1), torch.zeros(50, dtype=torch.long))
    got = calibration_batches(data, 3, 8, seed=5, device=torch.device("cpu"))
    assert [len(x) for x in got] == [8, 8, 8]
    assert torch.equal(torch.cat(got), torch.cat(calibration_batches(data, 3, 8, 5, torch.device("cpu"))))
    assert len(set(torch.cat(got).flatten().tolist())) == 24  # distinct samples, no repeats
    assert not torch.equal(torch.cat(got), torch.cat(calibration_batches(data, 3, 8, 6, torch.device("cpu"))))
    assert len(calibration_batches(data, 20, 8, 5, torch.device("cpu"))) == 7  # 50 samples: 7 batches at most


@pytest.mark.parametrize("bn", [True, False])
def test_convert_to_sparse_measures_bn_alone_only_where_there_is_bn(bn):
    model = _mlp(bn)
    policy = MaskPolicy("nm", 2, 4)
    policy.attach(model)
    batches = [torch.randn(32, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    seen = []

    def accuracy(m: nn.Module) -> float:
        seen.append(m)
        return 0.5

    done = convert_to_sparse(model, policy.names, batches, 0.01, True, accuracy)
    assert list(done["accuracy"]) == (["magnitude_bn", "reconstructed"] if bn else ["reconstructed"])
    assert seen[-1] is model and all(m is not model for m in seen[:-1])  # BN alone runs on a copy
    assert sorted(done["errors"]) == sorted(policy.names)
    for e in done["errors"].values():
        assert e["rel_err_reconstructed"] <= e["rel_err_magnitude"]
    assert done["calibration"] == {"batches": 3, "samples": 96, "damping": 0.01, "bn_layers_reestimated": int(bn)}


def test_sparse_recipe_keeps_the_run_settings_and_the_schema_target():
    # a run folder written before the policy's rename: its _target_ must not survive into the recipe
    run_cfg = OmegaConf.create({"sparsity": {"_target_": "fqtrun.sparsity.training.SparsityHook", "kind": "nm",
                                             "n": 2, "m": 4, "every": 7, "srste_decay": 0.5}})
    policy = MaskPolicy("transposable", 4, 8, method="greedy", exclude=["stem"], keep_last=False)
    recipe = sparse_recipe(run_cfg, policy)
    assert recipe == TransposableSparsity(kind="transposable", n=4, m=8, every=7, srste_decay=0.5,
                                          keep_last=False, exclude=["stem"], method="greedy")
    built = instantiate(OmegaConf.structured(recipe))
    assert isinstance(built, MaskPolicy) and (built.every, built.method, built.exclude) == (7, "greedy", ["stem"])
    nm = sparse_recipe(OmegaConf.create({"sparsity": None}), MaskPolicy("nm", 1, 4))
    assert "method" not in OmegaConf.structured(nm)  # nm has no method key
