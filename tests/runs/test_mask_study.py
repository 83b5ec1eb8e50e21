"""The mask study (fqtrun.runs.mask, `fqtrun mask`): mask report and dense -> N:M conversion
(spec sparsity.md) on a tiny trained CNN."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from fqtrun.build import load_train_run
from fqtrun.commands.common import user_error
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.runs.mask import run_mask_study
from fqtrun.runs.reproduce import compose_config
from fqtrun.runs.train import run_training
from fqtrun.sparsity.conversion import calibration_batches
from fqtrun.sparsity.diversity import log10_mask_diversity
from fqtrun.sparsity.masks import nm_mask, transposable_mask
from fqtrun.sparsity.policy import MaskPolicy

MASKED = ["features.2", "features.4"]  # 32 -> 32 channel convs: both dimensions multiples of 4 and 8


def _compose(config_name: str, *overrides: str):
    return compose_config(config_name, overrides)[0]  # as the experiments compose it: no command imported


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, data_cache) -> Path:
    """A run folder as `fqtrun train` leaves it (last.pt + .hydra/config.yaml): cnn1d, 32 channels, 1 epoch."""
    folder = tmp_path_factory.mktemp("dense")
    cfg = _compose("train", "logger.wandb.mode=disabled", "logger.progress=none", f"dataset.cache_dir={data_cache}",
                   "model.channels=32", "epochs=1", "batch_size=200", "optim.lr=0.01", "threads=1")
    run_training(cfg, folder)
    (folder / ".hydra").mkdir()
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml", resolve=True)
    return folder / "last.pt"


def _mask_cfg(checkpoint, *overrides: str):
    return _compose("mask", f"checkpoint={checkpoint}", "convert.calibration_batches=4", "threads=1", *overrides)


def _layout(mask: torch.Tensor) -> torch.Tensor:
    """(out, k * in): groups along input channels at one kernel position, as the hardware reads them."""
    out, cin = mask.shape[:2]
    return mask.reshape(out, cin, -1).transpose(1, 2).reshape(out, -1)


def _check_mask(mask: torch.Tensor, kind: str, n: int, m: int, exact: bool) -> None:
    w = _layout(mask).int()
    if kind == "nm":
        assert (w.reshape(-1, m).sum(1) == n).all()
        return
    r, c = w.shape[0] // m, w.shape[1] // m
    blocks = w.reshape(r, m, c, m).permute(0, 2, 1, 3)  # (r, c, m, m)
    rows, cols = blocks.sum(3), blocks.sum(2)
    if exact:
        assert (rows == n).all() and (cols == n).all()
    else:  # greedy may leave a row or column below n, never above
        assert (rows <= n).all() and (cols <= n).all()


CASES = [("transposable", 2, 4, "exact"), ("transposable", 4, 8, "greedy"), ("nm", 2, 4, "exact")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}:{c[2]}-{c[3]}")
def converted(request, dense_run, tmp_path_factory):
    kind, n, m, method = request.param
    out = tmp_path_factory.mktemp(f"mask_{kind}{n}{m}")
    summary = run_mask_study(_mask_cfg(dense_run, f"sparsity.kind={kind}", f"sparsity.n={n}", f"sparsity.m={m}",
                                 f"sparsity.method={method}"), out)
    return request.param, out, summary


def test_report_written_with_sane_ratios(converted, dense_run):
    (kind, n, m, method), out, s = converted
    data = json.loads((out / "mask.json").read_text())
    assert (out / "mask.md").is_file() and data["masked"] == s["masked"]
    assert s["masked"] == ["features.0", *MASKED] and list(s["kept_dense"]) == ["head"]
    dense = load_train_run(str(dense_run), "test").model
    for r in data["layers"]:
        assert 0 < r["kept_vs_unstructured"] <= 1 + 1e-9
        if kind == "transposable":
            assert 0 < r["greedy_vs_exact"] <= 1 + 1e-9  # exact keeps at least the greedy magnitude
        if r["layer"] in MASKED:
            # independent: the exact mask's kept |w| over the sum of the largest density * T |w|
            w = dense.get_submodule(r["layer"]).weight.detach().abs()
            mask = nm_mask(w, n, m) if kind == "nm" else transposable_mask(w, n, m, "exact")
            top = w.flatten().sort(descending=True).values[: int(mask.sum())].sum()
            assert r["kept_vs_unstructured"] == pytest.approx(float((w * mask).sum() / top), rel=1e-5)
            assert r["log10_md"] == pytest.approx(log10_mask_diversity(kind, w.numel(), n, m))
            assert r["log10_md"] < r["log10_md_unstructured"]
    acc = s["accuracy"]
    assert all(0 <= acc[k] <= 1 for k in ("dense", "magnitude", "reconstructed"))


def test_converted_checkpoint_loads_with_valid_masks(converted):
    (kind, n, m, method), out, s = converted
    run = load_train_run(str(out / "sparse" / "last.pt"), "test")
    cfg, ckpt, model, bundle = run.cfg, run.checkpoint, run.model, run.bundle
    assert cfg.sparsity.kind == kind and (cfg.sparsity.n, cfg.sparsity.m) == (n, m)
    policy = instantiate(cfg.sparsity)  # the recipe trains on: `fqtrun train` builds the same policy from it
    assert isinstance(policy, MaskPolicy) and (policy.kind, policy.n, policy.m) == (kind, n, m)
    masks = {k.rsplit(".", 1)[0]: v for k, v in ckpt["model"].items() if k.endswith("weight_mask")}
    assert sorted(masks) == sorted(s["masked"])  # the classifier stays dense
    for name in MASKED:
        mask = model.get_submodule(name).weight_mask
        assert torch.equal(mask, masks[name])
        _check_mask(mask, kind, n, m, exact=method == "exact")
        if method == "exact":
            assert float(mask.float().mean()) == n / m
    # the loaded model is the converted one: its test accuracy is the one reported
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in torch.utils.data.DataLoader(bundle.test, 1000))
    assert correct / len(bundle.test) == pytest.approx(s["accuracy"]["reconstructed"], abs=1e-9)


def _layer_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    got: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: got[n].append(a[0]))
             for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_reconstruction_reduces_layer_output_error(converted, dense_run):
    """Measured by running the convs: ||W X - W_rec X|| < ||W X - (S ⊙ W) X|| on the calibration batches."""
    (kind, n, m, method), out, s = converted
    dense_loaded = load_train_run(str(dense_run), "test")
    dense, bundle = dense_loaded.model, dense_loaded.bundle
    sparse = load_train_run(str(out / "sparse" / "last.pt"), "test").model
    batches = calibration_batches(bundle.train, 4, 100, 0, torch.device("cpu"))
    inputs = _layer_inputs(sparse, s["masked"], batches)  # X each layer saw when it was refitted
    for r in s["layers"]:
        d, sp = dense.get_submodule(r["layer"]), sparse.get_submodule(r["layer"])
        x, mask = inputs[r["layer"]], sp.weight_mask

        def conv(w, b, x=x, d=d):
            return F.conv1d(x, w.detach(), b.detach(), d.stride, d.padding)

        target = conv(d.weight, d.bias)
        err_mag = float((target - conv(d.weight * mask, d.bias)).square().sum())
        err_rec = float((target - conv(sp.weight * mask, sp.bias)).square().sum())
        if mask.all():  # nm on the 1-channel stem: groups of one real weight keep it, nothing to refit
            assert err_mag == 0 and err_rec < 1e-8 * float(target.square().sum())
            continue
        assert err_rec < err_mag, r["layer"]
        total = float(target.square().sum())
        assert r["rel_err_magnitude"] == pytest.approx(err_mag / total, rel=1e-3)
        assert r["rel_err_reconstructed"] == pytest.approx(err_rec / total, rel=1e-3, abs=1e-7)


def test_bad_inputs(dense_run, tmp_path, data_cache):
    with pytest.raises(ConfigError, match=r"^sparsity.n=4 must be < sparsity.m=4"):
        run_mask_study(_mask_cfg(tmp_path / "absent.pt", "sparsity.n=4", "sparsity.m=4"), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_mask_study(_mask_cfg(tmp_path / "absent.pt"), tmp_path)
    with pytest.raises(ConfigError, match="convert.enabled=true needs convert.calibration_batches"):
        run_mask_study(_mask_cfg(dense_run, "convert.enabled=true", "convert.calibration_batches=0"), tmp_path)
    with pytest.raises(Exception) as info:
        run_mask_study(_compose("mask"), tmp_path)
    assert str(user_error(info.value)) == "checkpoint is required and not set: pass checkpoint=<value>"
    # a checkpoint of another model: cnn1d weights in a folder whose config builds an MLP
    other = tmp_path / "other"
    (other / ".hydra").mkdir(parents=True)
    shutil.copy(dense_run, other / "last.pt")
    mlp = _compose("train", "model=mlp", f"dataset.cache_dir={data_cache}", "logger.wandb.mode=disabled")
    OmegaConf.save(mlp, other / ".hydra" / "config.yaml", resolve=True)
    with pytest.raises(CheckpointError, match="was written for model=cnn1d"):
        run_mask_study(_mask_cfg(other / "last.pt"), tmp_path)


def test_cli_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fqtrun", "mask", "checkpoint=x.pt", "sparsity.n=4", "sparsity.m=4",
                        f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: sparsity.n=4 must be < sparsity.m=4: N is the number kept in every group of M"]
