"""trainer.compile: a quantized model's step under torch.compile (training/compiled.py, quant/ops.py).

The GPT's FQT step and a format recipe (NVFP4 with RHT and stochastic rounding) trace as one graph, zero
breaks. A compiled run tracks the eager run to float tolerance at first; inductor reorders the float ops
around the quantizer ops, so now and then a value on a stochastic-rounding boundary rounds the other way,
and over a few hundred steps the two runs drift apart by about as much as two eager runs that differ only
in the noise seed (the tiny GPT below, 200 steps, mean relative loss difference: per_sample 8-bit 7.4e-4
compiled vs eager, 3.0e-4 and 5.9e-4 to two other noise seeds; NVFP4 RHT SR 5.4e-3 vs 5.3e-3). A
non-finite value met inside the compiled step is still reported naming its layer and slot; torch.export
sees the quantizers as fqtrun ops.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from omegaconf import OmegaConf

from fqtrun.build import build_recipe, quantize_model
from fqtrun.errors import TrainingError
from fqtrun.models.gpt import GPT
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig
from fqtrun.runs.train import run_training
from fqtrun.tasks import TASKS

RECIPES = {
    "fqt per_sample 8": dict(grad="per_sample", bits_w=8, bits_a=8, bits_dx=8, bits_dw=8),
    "nvfp4 rht sr": dict(format="nvfp4", grad_transform="rht", rounding_w="stochastic", bits_w=4, bits_a=4,
                         bits_dx=4, bits_dw=4),
}
VOCAB, WINDOW = 32, 16


def tiny_gpt(recipe: str, seed: int = 0) -> tuple[torch.nn.Module, NoiseContext]:
    torch.manual_seed(seed)
    model = GPT(VOCAB, (WINDOW,), n_layer=1, n_head=2, n_embd=16, block_size=WINDOW)
    noise = NoiseContext(seed=seed)
    quantize_model(build_recipe(OmegaConf.structured(QuantConfig(name=recipe, **RECIPES[recipe]))), False, model,
                   noise)
    return model, noise


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return TASKS["language_model"]().random_batch(8, (WINDOW,), VOCAB, g)


def loss_fn(model):
    task = TASKS["language_model"]()
    return lambda x, y: task.loss(model(x).float(), y)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compiled_step_has_no_graph_breaks(recipe):
    model, _ = tiny_gpt(recipe)
    explained = torch._dynamo.explain(loss_fn(model))(*batch(0))
    assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
    assert explained.graph_count == 1


def train_losses(recipe: str, steps: int, compiled: bool, noise_seed: int = 0) -> list[float]:
    model, noise = tiny_gpt(recipe)
    noise.seed = noise_seed
    fn = loss_fn(model)
    fn = torch.compile(fn) if compiled else fn
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        noise.step = step
        opt.zero_grad(set_to_none=True)
        loss = fn(*batch(step % 4))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def mean_relative_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(u - v) / abs(u) for u, v in zip(a, b)) / len(a)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_compiled_run_tracks_the_eager_run(recipe):
    steps = 200
    eager, compiled = train_losses(recipe, steps, False), train_losses(recipe, steps, True)
    assert eager[0] == pytest.approx(compiled[0], rel=1e-5)  # one step: float reordering only
    assert max(abs(a - b) / a for a, b in zip(eager[:10], compiled[:10])) < 1e-3  # before any drift
    # then about as far apart as runs with another noise seed (which differ by 1-2x among themselves); a
    # wrong seed or bit-width would already show in the first steps
    seed_gap = max(mean_relative_gap(eager, train_losses(recipe, steps, False, noise_seed=s)) for s in (1, 2))
    assert mean_relative_gap(eager, compiled) < 3 * seed_gap
    assert eager[-1] < eager[0] - 0.1  # it trained: the comparison is not of two flat lines


def test_compiled_train_run_names_the_layer_of_a_non_finite_weight(compose_train, tmp_path):
    """The compiled step meets inf in a weight; the trainer re-runs the step eager for the layer's name."""
    # the poisoning hook of test_nonfinite_run.py (pytest puts this folder on sys.path)
    from test_nonfinite_run import AT, RUN, poison_specs

    cfg = compose_train(*RUN, "model=mlp", "trainer.compile=true")
    with pytest.raises(TrainingError) as err:
        run_training(cfg, tmp_path, hook_specs=poison_specs("net.3", "weight", float("inf")))
    assert f"of layer net.3, slot w at step {AT} " in str(err.value)


def test_export_sees_the_quantizers_as_ops():
    """torch.export of a quantized model: the quantizers are fqtrun ops in the graph, and it gives the
    eager model's outputs."""
    model, _ = tiny_gpt("nvfp4 rht sr")
    model.eval()
    x = batch(0)[0]
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        targets = {str(n.target) for n in exported.graph.nodes}
        assert "fqtrun.format_fake.default" in targets
        assert torch.equal(exported.module()(x), model(x))


def test_compile_with_portable_numerics_is_refused_in_one_line(compose_train):
    from fqtrun.config import validate_train
    from fqtrun.errors import ConfigError

    cfg = compose_train("trainer.compile=true", "numerics.portable=true")
    with pytest.raises(ConfigError, match=r"^trainer.compile=true with numerics.portable=true: .*drop one$"):
        validate_train(cfg)
