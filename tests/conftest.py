"""Shared fixtures: compose real Hydra configs and run commands in-process on tiny data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fqtrun.config import register_configs

# One thread: the suite's tensors are tiny, and two threads on a shared 2-core machine contend badly.
torch.set_num_threads(1)

CONF = str(Path(__file__).resolve().parents[1] / "fqtrun" / "conf")
register_configs()


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test leaves os.environ as it found it: an in-process `fqtrun reproduce` pins the portable
    numerics environment for its process (numerics_mode), which would change what later tests build (the
    C kernels' target, torch.compile's vector code)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One MNIST-1D cache for the whole session (generation takes about a second)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose_train(data_cache):
    """compose_train(*overrides) -> the composed train config (fast defaults for tests)."""

    def make(*overrides: str, config_name: str = "train"):
        base = ["logger.wandb.mode=disabled", "logger.progress=none", f"dataset.cache_dir={data_cache}"]
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(config_name=config_name, overrides=base + list(overrides))

    return make


# A tiny, fast training run: 2 epochs of 4000/200 = 20 steps each on MNIST-1D.
TINY = ["epochs=2", "batch_size=200", "logger.log_every=5", "optim.lr=0.01"]


def assert_causal(model: torch.nn.Module, vocab: int = 11, length: int = 12) -> None:
    """A language model's logits at positions <= t do not change when token t + 1 does, and those at t + 1 do."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab, (3, length), generator=g)
    base = model(idx)
    assert base.shape == (3, length, vocab)
    for t in range(length - 1):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1 + torch.randint(0, vocab - 1, (3,), generator=g)) % vocab
        out = model(changed)
        assert torch.equal(out[:, :t + 1], base[:, :t + 1]), t  # positions <= t do not see token t + 1
        assert not torch.allclose(out[:, t + 1], base[:, t + 1])  # position t + 1 does
