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
    run = saved["runs"][0]
    assert run["threads"] == 1 and len(run["load"]) == 3
    for name in ("clone", "per_tensor SR eager", "per_sample SR eager", "householder SR eager"):
        assert run["quantizers"][name]["x_clone"] > 0
    assert run["quantizers"]["householder SR eager"]["x_psq"] > 0
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
