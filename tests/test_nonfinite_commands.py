"""`fqtrun variance` and `fqtrun bench` stop on NaN/inf with one line naming the layer and slot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import CONF
from fqtrun.bench import suite
from fqtrun.commands.bench import run_bench
from fqtrun.commands.common import user_error
from fqtrun.commands.variance import variance as run_variance
from fqtrun.errors import NumericsError
from fqtrun.models.cnn1d import CNN1D
from fqtrun.quant.numerics import NonFiniteError
from fqtrun.training.checkpoint import model_signature, save_checkpoint


def compose_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_variance_of_a_checkpoint_with_nan_weights(tmp_path: Path):
    torch.manual_seed(0)
    model = CNN1D(10, (40,), channels=4)
    with torch.no_grad():
        model.features[2].weight[0, 0, 0] = float("nan")
    ckpt = save_checkpoint(tmp_path / "run" / "last.pt", {"model": model.state_dict(), "model_name": "cnn1d",
                                                         "signature": model_signature(model)})
    cfg = compose_cfg("variance", "dataset=synthetic", "dataset.n_train=400", "variance.k=1",
                      "variance.batches=2", "variance.batch_size=50", "variance.bits=[4]", "model.channels=4",
                      f"checkpoint={ckpt}")
    with pytest.raises(NumericsError) as err:
        run_variance(cfg, tmp_path / "out")
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"non-finite values (NaN or inf) in the weights of layer features.2, slot w while "
                           f"measuring the gradient variance of checkpoint {ckpt}: ")


def test_bench_names_the_layer_that_met_nan(tmp_path: Path, monkeypatch):
    build = suite.linear_model

    def poisoned(*args):
        name, model, shape, classes = build(*args)
        with torch.no_grad():
            model.head.weight.fill_(float("inf"))
        return name, model, shape, classes

    monkeypatch.setattr(suite, "linear_model", poisoned)
    with pytest.raises(NumericsError, match="weights of layer head, slot w while benchmarking at 1 thread"):
        run_bench(compose_cfg("bench", "bench.quick=true", "batch_size=24"), tmp_path)


def test_any_command_reports_a_quantizer_nan_as_one_line():
    """A command that does not catch NonFiniteError itself (mask, intbn) prints one line, no traceback."""
    err = NonFiniteError("weights", "features.2", "w")
    assert user_error(err) is err
    assert str(err) == "non-finite values (NaN or inf) in the weights of layer features.2, slot w"
