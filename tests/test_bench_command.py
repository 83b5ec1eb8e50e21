"""fqtrun bench in quick mode: runs end to end, writes bench.json with every figure (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fqtrun.cli import main
from fqtrun.commands.bench import run_bench
from fqtrun.errors import ConfigError

CONF = str(Path(__file__).resolve().parents[1] / "fqtrun" / "conf")


def bench_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="bench", overrides=["bench.quick=true", *overrides])


def test_quick_bench_writes_every_figure(tmp_path):
    result = run_bench(bench_cfg("batch_size=24"), tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["batch_size"] == 24 and len(saved["runs"]) == 1 == len(result["runs"])
    assert saved["int8_gemm"] in ("int_mm", "fp32") and saved["cpu_capability"] and "native_kernels" in saved
    run = saved["runs"][0]
    assert run["threads"] == 1 and len(run["load"]) == 3
    for name in ("clone", "per_tensor SR", "per_sample SR", "householder SR", "per_column SR codes",
                 "per_sample + per_column codes, one pass", "forward int8 codes"):
        assert run["quantizers"][name]["x_clone"] > 0
    assert run["quantizers"]["householder SR"]["x_psq"] > 0 and run["quantizers"]["householder SR codes"]["x_psq"] > 0
    for fmt in ("fp8_e4m3", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4", "nvfp4", "fp8_e4m3_b128"):
        for mode in ("RTN", "SR", "SR+RHT16"):
            assert run["formats"][f"{fmt} {mode}"]["x_clone"] > 0
    for part in ("linear", "cnn"):
        steps = run[part]["steps"]
        for recipe in ("fp32", "bf16 autocast", "FQT simulate", "FQT int8"):
            assert steps[recipe]["x_fp32"] > 0
        assert steps["fp32"]["x_fp32"] == 1.0
        assert steps["FQT int8"]["speedup_vs_bf16"] > 0
        if importlib.util.find_spec("torchao") is None:
            assert steps["torchao int8 mixed precision"] == {"status": "not installed"}
    # the MLP's Linears all run their GEMMs as int8; the report names every quantized layer
    assert run["linear"]["int8_layers"] == {"body.0": "int8", "body.2": "int8", "head": "int8"}
    assert run["cnn"]["int8_layers"]["features.0"].startswith("simulate (conv GEMM too small")
    masks = run["masks"]  # the mask search on a 64 x 64 weight, each operation against clone()
    assert masks["size"] == 64 and masks["rows"]["clone() (floor)"]["x_clone"] == 1.0
    assert set(masks["rows"]) == {"clone() (floor)", "row-wise 2:4", "transposable 2:4, exact",
                                  "transposable 4:8, greedy", "transposable 4:8, exact (min-cost flow)"}
    assert all(r["median_ms"] > 0 for r in masks["rows"].values())
    assert masks["rows"]["transposable 2:4, exact"]["target_ms"] == 100.0


def test_masks_can_be_left_out(tmp_path):
    run = run_bench(bench_cfg("bench.masks=false", "batch_size=8"), tmp_path)["runs"][0]
    assert "masks" not in run


def test_bench_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="bench.reps=0 must be >= 1"):
        run_bench(bench_cfg("bench.reps=0", "bench.quick=false"), tmp_path)


def test_quick_mode_refuses_a_size_it_would_ignore(tmp_path, monkeypatch, capsys):
    """`fqtrun bench bench.quick=true bench.reps=5`: one line naming the fix, exit 2, nothing measured."""
    monkeypatch.setattr("sys.argv", ["fqtrun"])  # the CLI rewrites it for Hydra
    monkeypatch.delenv("FQTRUN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "bench.quick=true", "bench.reps=5", f"hydra.run.dir={tmp_path}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: bench.reps=5 is ignored with bench.quick=true (quick mode uses its own tiny sizes): "
        "drop bench.reps or bench.quick"]
    assert not (tmp_path / "bench.json").exists()


def test_quick_bench_of_the_language_model(tmp_path):
    """model=gpt: the train-step rows of the LM (token windows, next-token loss) next to the CNN's."""
    result = run_bench(bench_cfg("model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
                                 "model.block_size=16", "batch_size=4"), tmp_path)
    lm = result["runs"][0]["linear"]
    assert lm["model"] == f"GPT (16-token windows, vocabulary {result['settings']['vocab']})"
    for recipe in ("fp32", "bf16 autocast", "FQT simulate", "FQT int8"):
        assert lm["steps"][recipe]["x_fp32"] > 0
    block = ["attn.q", "attn.k", "attn.v", "attn.out", "fc1", "fc2"]
    assert lm["int8_layers"] == {f"blocks.0.{n}": "int8" for n in block}  # the head stays fp (quant.keep_last)
