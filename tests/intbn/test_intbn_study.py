"""fqtrun intbn end to end (fqtrun.runs.intbn, the command's tables): a quantized ResNet-20 on digits,
integer BN bit-exact (spec/denoise_bn.md B); the accumulator and the exact op against direct float math."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF
from fqtrun.build import load_train_run
from fqtrun.commands.intbn import print_summary  # registers intbn_schema
from fqtrun.errors import FqtrunError
from fqtrun.intbn.blocks import find_blocks
from fqtrun.intbn.calibrate import calibrate, freeze_activations
from fqtrun.intbn.convert import Accumulator, check_convertible
from fqtrun.intbn.derive import bn_affine
from fqtrun.intbn.requant import ExactBNRequant
from fqtrun.runs.intbn import run_intbn_study
from fqtrun.runs.train import run_training
from fqtrun.training.checkpoint import save_checkpoint

CPU = torch.device("cpu")


def _train_run(compose_train, folder: Path, *overrides: str) -> Path:
    """A run folder like `fqtrun train` leaves it: last.pt and .hydra/config.yaml."""
    cfg = compose_train("epochs=1", "batch_size=100", "threads=1", *overrides)
    run_training(cfg, folder)
    (folder / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml", resolve=True)
    return folder / "last.pt"


def _intbn_cfg(checkpoint: Path, *overrides: str):
    """The composed `fqtrun intbn` config (conf/intbn.yaml over its schema)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="intbn", overrides=[f"checkpoint={checkpoint}", "calib_samples=500", *overrides])


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory) -> Path:
    def make(*overrides):
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config_name="train", overrides=["logger.wandb.mode=disabled", "logger.progress=none",
                                                           *overrides])

    return _train_run(make, tmp_path_factory.mktemp("rn20"), "model=resnet20", "dataset=digits", "+quant=qat",
                      "bits=8")


@pytest.fixture(scope="module")
def study(resnet_ckpt, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("intbn")
    return run_intbn_study(_intbn_cfg(resnet_ckpt), out), out


def test_integer_bn_is_bit_exact_and_accuracy_equal(study):
    s, out = study
    assert json.loads((out / "intbn.json").read_text()) == json.loads(json.dumps(s))
    assert s["converted"] == 9 and len(s["kept_float"]) == 10  # bn1 of every block; bn2 feeds a residual add
    assert s["all_layers_exact"] and all(r["verified_exact"] for r in s["layers"])
    assert all(r["code_mismatches"] == 0 and r["codes_compared"] > 0 for r in s["layers"])
    assert s["predictions_equal"] and s["acc_integer_bn"] == s["acc_float_bn_requant"]
    assert all(r["shift_max"] <= r["shift_naive_max"] for r in s["layers"] if r["shift_naive_max"] is not None)
    # the exact reference path is a float BN: it agrees with torch's float32 BN on the static model
    assert abs(s["acc_float_bn_requant"] - s["acc_static_float32_bn"]) <= 0.01


def test_command_prints_both_tables(study, capsys):
    s, out = study
    print_summary(s, out)
    printed = capsys.readouterr().out
    assert "per converted BN" in printed and "accuracy on the test split" in printed
    assert all(r["bn"] in printed for r in s["layers"])


def test_accumulator_and_reference_against_direct_float_math(resnet_ckpt):
    """The integer accumulator times s_in is the float conv output; the exact op is floor(a x + b) by hand."""
    run = load_train_run(str(resnet_ckpt), "intbn", require=check_convertible)
    model, bundle = run.model, run.bundle
    layer_name, bn_name, consumer, relu = find_blocks(model)[0][0]
    freeze_activations(model, calibrate(model, bundle.train, 200, 200, CPU), 8)
    layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
    x = torch.stack([bundle.test[i][0] for i in range(8)])
    h = torch.nn.functional.relu(model.bn1(model.conv1(x)))  # the input of stages.0.conv1
    conv_out = layer(h)  # float32 fake-quant conv
    acc = Accumulator(layer)(h)
    s_in = float(layer.slots["a"].scale) * Accumulator(layer).s_w
    torch.testing.assert_close(acc.double() * s_in, conv_out.double(), rtol=1e-5, atol=1e-5)
    out_q = model.get_submodule(consumer).slots["a"]
    a, b = bn_affine(bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var, bn.eps,
                     s_in, float(out_q.scale))
    y = ExactBNRequant(a, b, 255)(acc)
    rng = random.Random(0)
    for _ in range(300):
        n, c, i, j = (rng.randrange(d) for d in acc.shape)
        direct = min(max((a[c] * int(acc[n, c, i, j]) + b[c]).__floor__(), 0), 255)
        assert int(y[n, c, i, j]) == direct
    assert relu  # stages.0.conv1 -> bn1 -> relu -> conv2


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(FqtrunError) as e:
        run_intbn_study(_intbn_cfg(tmp_path / "nope" / "last.pt"), tmp_path)
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_checkpoint_without_run_config_is_one_line(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"model": {}, "model_name": "cnn1d"})
    with pytest.raises(FqtrunError, match=r"\.hydra/config\.yaml does not exist") as e:
        run_intbn_study(_intbn_cfg(tmp_path / "last.pt"), tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["+quant=qat", "bits=8"], "model=cnn1d has no BatchNorm.*model=resnet20 dataset=digits"),  # MNIST-1D cnn1d
    ([], "the run is not quantized.*\\+quant=qat"),
    (["+quant=qat", "bits=4", "quant.dequant=ridge"], "quant.dequant=ridge: intbn needs"),
])
def test_runs_it_cannot_convert_name_the_fix(compose_train, tmp_path, overrides, message):
    cfg = compose_train(*overrides)
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml", resolve=True)
    save_checkpoint(tmp_path / "last.pt", {"model": {}, "model_name": "cnn1d"})
    with pytest.raises(FqtrunError, match=message) as e:
        run_intbn_study(_intbn_cfg(tmp_path / "last.pt"), tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("acc_range=x", "acc_range='x' is unknown: use reachable or full"),
    ("bits=12", "bits=12 is too wide for integer BN: use 1..10"),  # a forward width, but too many thresholds
    ("bits=17", "bits=17 is out of range: use 1..16 bits"),  # the shared forward range (fqtrun.quant.bits)
    ("bits=0", "bits=0 is out of range"),
    ("acc_bits=64", "acc_bits=64 must be in 2..48"),
])
def test_bad_settings_are_one_line(tmp_path, override, message):
    """Settings are checked before the run is read: a missing checkpoint does not mask them."""
    with pytest.raises(FqtrunError, match=message) as e:
        run_intbn_study(_intbn_cfg(tmp_path / "none" / "last.pt", override), tmp_path)
    assert "\n" not in str(e.value)
