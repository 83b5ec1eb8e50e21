"""The quantizers as torch custom ops (quant/ops.py): each op equals its quantizer's eager call bit for bit,
eager and compiled; fake implementations give the real output's shape and dtype (torch.library.opcheck);
the seed op equals grid.mix_seed; a layer's seeds are the same ints eager and traced."""

from __future__ import annotations

import pytest
import torch

from fqtrun.quant import ops
from fqtrun.quant.formats import make_format
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.gradient import make_gradient_quantizer
from fqtrun.quant.grid import mix_seed
from fqtrun.quant.layers import NoiseContext, QuantLinear
from fqtrun.quant.quantizers import MinMaxQuantizer
from fqtrun.quant.transforms import RandomHadamard


def _x(rows=48, cols=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    return x * torch.exp(2 * torch.randn(rows, 1, generator=g))  # rows of different scales


SEED = torch.tensor(12345, dtype=torch.int64)

# (op call, the eager quantizer call it must equal)
CASES = {
    "minmax tensor 4": (lambda x: ops.minmax_fake(x, 4, "tensor"), lambda x: MinMaxQuantizer(4).codes(x).dequantize()),
    "minmax channel 8": (lambda x: ops.minmax_fake(x, 8, "channel"),
                         lambda x: MinMaxQuantizer(8, "channel").codes(x).dequantize()),
    **{f"sr {name} {bits}": (
        lambda x, n=name, b=bits: ops.sr_fake(x, n, b, "", False, SEED),
        lambda x, n=name, b=bits: make_gradient_quantizer(n, b)(x, 12345))
       for name in ("per_tensor", "per_sample", "householder", "per_column") for bits in (4, 8)},
    "sr per_sample zero_aligned": (lambda x: ops.sr_fake(x, "per_sample", 5, "zero_aligned", False, SEED),
                                   lambda x: make_gradient_quantizer("per_sample", 5, grid="zero_aligned")(x, 12345)),
    **{f"format {name} {rounding}": (
        lambda x, n=name, r=rounding: ops.format_fake(x, n, "floor", False, r, 1, SEED, 0, "step", SEED),
        lambda x, n=name, r=rounding: make_format(n).fake(x, 1, r, 12345))
       for name in ("mxfp4", "nvfp4", "fp8_e4m3", "mxfp8_e4m3") for rounding in ("nearest", "stochastic")},
    "format mxfp4 rht16 dim 0": (
        lambda x: ops.format_fake(x, "mxfp4", "floor", False, "stochastic", 0, SEED, 16, "step", SEED + 1),
        lambda x: make_format("mxfp4").fake(x, 0, "stochastic", 12345, RandomHadamard(16), 12346)),
    "format nvfp4 2d": (lambda x: ops.format_fake(x, "nvfp4", "floor", True, "nearest", 1, SEED, 0, "step", SEED),
                        lambda x: make_format("nvfp4", block_2d=True).fake(x, 1, "nearest", 12345)),
    "rht forward": (lambda x: ops.rht(x, 1, 32, "step", SEED, False), lambda x: RandomHadamard(32).forward(x, 1, 12345)),
    "rht inverse": (lambda x: ops.rht(x, 0, 16, "fixed", SEED, True),
                    lambda x: RandomHadamard(16, "fixed").inverse(x, 0, 12345)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_equals_the_eager_quantizer(case):
    op, eager = CASES[case]
    x = _x()
    assert torch.equal(op(x), eager(x))


@pytest.mark.parametrize("case", ["minmax tensor 4", "sr per_sample 4", "sr householder 4", "format nvfp4 stochastic",
                                  "format mxfp4 rht16 dim 0"])
def test_compiled_op_gives_the_eager_codes(case):
    """Compiled (the op inside an inductor graph, with float ops around it) vs eager: the same values."""
    op, eager = CASES[case]
    x = _x(seed=1)
    compiled = torch.compile(lambda t: op(t * 2.0) + 1.0, fullgraph=True)
    assert torch.equal(compiled(x), eager(x * 2.0) + 1.0)


def test_fake_implementations_and_schemas():
    """opcheck: schema, fake implementation (shape, dtype), autograd registration and dispatch agree."""
    x = _x(8, 32)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.minmax_fake, (x, 4, "tensor"), test_utils=checks)
    torch.library.opcheck(ops.sr_fake, (x, "per_sample", 4, "", False, SEED), test_utils=checks)
    torch.library.opcheck(ops.format_fake, (_x(8, 24), "mxfp4", "floor", False, "nearest", 1, SEED, 16, "step", SEED),
                          test_utils=("test_schema", "test_faketensor"))  # 24 -> 32: the padded length
    torch.library.opcheck(ops.rht, (_x(8, 24), 1, 16, "step", SEED, False), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.mix_seed, (torch.tensor([1, 2, 3]), [4, 5]), test_utils=("test_schema", "test_faketensor"))


def test_straight_through_gradient():
    x = _x(4, 8).requires_grad_()
    ops.sr_fake(x, "per_tensor", 4, "", False, SEED).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_mix_seed_op_equals_python():
    counter = torch.tensor([7, 123456, 2])
    assert int(ops.mix_seed(counter, [3, 1])) == mix_seed(7, 123456, 2, 3, 1)
    assert int(ops.mix(ops.mix_seed(counter, [3, 1]), 9)) == mix_seed(mix_seed(7, 123456, 2, 3, 1), 9)
    assert ops.mix(5, 9) == mix_seed(5, 9)


def test_layer_seeds_traced_equal_eager():
    """grad_seed and transform_key: ints eager, tensors of the same value under torch.compile."""
    layer = QuantLinear(4, 4)
    noise = NoiseContext(seed=3, step=17, draw=1)
    layer.setup_quant({}, noise, index=5)
    eager = [layer.grad_seed("dx"), layer.transform_key(1, True), layer.transform_key(2, False)]

    def seeds(t):
        return t + torch.stack([layer.grad_seed("dx"), layer.transform_key(1, True), layer.transform_key(2, False)])

    traced = torch.compile(seeds, fullgraph=True)(torch.zeros(3, dtype=torch.int64))
    assert traced.tolist() == eager
    noise.step = 18  # the counter is an input: the same graph gives the next step's seeds
    assert traced.tolist() != (again := torch.compile(seeds, fullgraph=True)(torch.zeros(3, dtype=torch.int64)).tolist())
    assert again == [layer.grad_seed("dx"), layer.transform_key(1, True), layer.transform_key(2, False)]


def test_format_quantizer_uses_the_op_when_traced():
    q = FormatQuantizer(make_format("nvfp4"), "stochastic")
    x = _x(16, 32)
    compiled = torch.compile(lambda t: q.fake(t, 1, SEED), fullgraph=True)
    assert torch.equal(compiled(x), q.fake(x, 1, 12345))
