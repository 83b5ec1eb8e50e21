"""The per-layer mask report (sparsity/report.py): kept-|w| ratios, diversity where a layer tiles,
why a layer stayed dense."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fqtrun.quant.convert import convert
from fqtrun.quant.layers import NoiseContext
from fqtrun.sparsity.diversity import count_transposable_blocks
from fqtrun.sparsity.policy import MaskPolicy
from fqtrun.sparsity.report import kept_dense, mask_report, masked_layer_rows


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 8), nn.ReLU(),
                          nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    convert(model, lambda slot, module: None, NoiseContext(seed=0), exclude=["4"])  # "4" stays a plain layer
    return model


def test_kept_ratio_is_against_the_largest_weights_at_the_same_density():
    model = _model()
    rows = mask_report(model, 2, 4, "nm")
    assert [r["layer"] for r in rows] == ["0", "2", "4", "6", "8"]  # every linear, masked or not
    for r in rows:
        w = model.get_submodule(r["layer"]).weight.detach().abs()
        assert r["greedy_vs_exact"] is None and r["greedy_ms"] is None
        if w.shape[1] % 4:  # padded edge groups: covered by the mask tests
            continue
        kept = w.reshape(-1, 4).sort(dim=1, descending=True).values[:, :2].sum()  # the 2 largest of every 4
        top = w.flatten().sort(descending=True).values[: w.numel() // 2].sum()  # unstructured at density 1/2
        assert r["density"] == 0.5
        assert r["kept_vs_unstructured"] == pytest.approx(float(kept / top), rel=1e-6)


def test_masked_rows_give_diversity_only_where_the_layer_tiles():
    model = _model()
    policy = MaskPolicy("transposable", 2, 4, exclude=["6"])
    policy.attach(model)
    rows = {r["layer"]: r for r in masked_layer_rows(model, policy)}
    assert list(rows) == ["0", "2"]  # "4" is not sparse-capable, "6" excluded, "8" the classifier
    assert rows["0"]["log10_md"] == pytest.approx(128 / 16 * math.log10(count_transposable_blocks(2, 4)))
    assert rows["0"]["log10_md_unstructured"] == pytest.approx(math.log10(math.comb(128, 64)))
    assert rows["2"]["log10_md"] is None  # 6 output rows: not a multiple of 4, the padded blocks follow no formula
    assert rows["2"]["log10_md_unstructured"] == pytest.approx(math.log10(math.comb(96, 48)))
    assert kept_dense(model, policy) == {
        "4": "not sparse-capable: the run's quant settings kept it a plain layer",
        "6": "matches sparsity.exclude",
        "8": "classifier (sparsity.keep_last)",
    }
