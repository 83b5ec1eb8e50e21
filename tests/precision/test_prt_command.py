"""`fqtrun prt` end to end on MNIST-1D: outputs, the q_min rule applied to what was measured, errors."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from conftest import CONF
from fqtrun.commands.prt import run_prt
from fqtrun.errors import ConfigError

# 1 bit (a two-level min-max grid) is tried first, then 2, 3: K = 30 steps of 200 samples each.
TINY_PRT = ["prt.b_start=1", "prt.b_max=3", "prt.steps_per_bits=30", "prt.window=10", "prt.threshold=0.05",
            "prt.fresh_model=true", "batch_size=200", "optim.lr=0.01"]


def compose_prt(cache, *overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="prt", overrides=[f"dataset.cache_dir={cache}", *overrides])


def test_prt_end_to_end_writes_json_png_and_picks_q_min(data_cache, tmp_path, capsys):
    record = run_prt(compose_prt(data_cache, "+quant=per_sample", *TINY_PRT), tmp_path)
    saved = json.loads((tmp_path / "prt.json").read_text())
    assert (tmp_path / "prt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert saved["q_min"] == record["q_min"] and saved["trace"] == record["trace"]
    # the rule, re-applied to the per-step accuracies the file reports
    gains = {}
    for row in saved["trace"]:
        accs = row["accs"]
        assert len(accs) == 30
        gains[row["bits"]] = sum(accs[-10:]) / 10 - sum(accs[:10]) / 10
        assert row["gain"] == pytest.approx(gains[row["bits"]], abs=1e-12)
    picked = [b for b, g in gains.items() if g > 0.05]
    assert picked, f"no precision learned in 30 steps: gains {gains}"
    assert saved["q_min"] == picked[0] == max(gains)  # the first one above tau, and nothing after it was run
    assert list(gains) == list(range(1, saved["q_min"] + 1))
    line = f"schedule=cyclic schedule.min_bits={saved['q_min']} schedule.max_bits=3"
    assert saved["override"] == line and saved["q_max"] == 3
    assert line in capsys.readouterr().out  # printed on one line, ready to paste


def test_prt_needs_quantizers_and_sane_settings(data_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"\+quant=per_sample"):
        run_prt(compose_prt(data_cache, *TINY_PRT), tmp_path)
    with pytest.raises(ValueError, match="prt.steps_per_bits=10 .* 2 \\* prt.window=20"):
        run_prt(compose_prt(data_cache, "+quant=per_sample", *TINY_PRT, "prt.steps_per_bits=10"), tmp_path)
    with pytest.raises(ValueError, match="prt.b_start=9 must be <= prt.b_max=3"):
        run_prt(compose_prt(data_cache, "+quant=per_sample", *TINY_PRT, "prt.b_start=9"), tmp_path)
    assert not (tmp_path / "prt.json").exists()
