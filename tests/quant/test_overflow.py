"""Finite gradients near float32's limit stay finite through every gradient quantizer (BHQ above all), and a
non-finite error says whether the input or a value computed from it was non-finite."""

from __future__ import annotations

import pytest
import torch

from fqtrun.quant.gradient import make_gradient_quantizer, overflow_shift
from fqtrun.quant.numerics import NonFiniteError

FMAX = torch.finfo(torch.float32).max
QUANTIZERS = ("per_tensor", "per_sample", "householder")


def torch_form(q):
    """The quantizer with its C path switched off (the torch form, as on a machine with no compiler)."""
    q._native = lambda *a, **k: None
    return q


def both_forms(name: str, bits: int):
    return [make_gradient_quantizer(name, bits), torch_form(make_gradient_quantizer(name, bits))]


def extreme_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    huge = (torch.rand(4, 16, generator=g) * 2 - 1) * 3.4e38
    return {
        "constant 3e38 block": torch.full((12, 16), 3e38),
        "constant rows of both signs": torch.cat([torch.full((6, 16), 3e38), torch.full((6, 16), -3e38)]),
        "float32 max": torch.full((8, 16), FMAX),
        "huge and tiny rows": torch.cat([huge, torch.randn(8, 16, generator=g) * 1e-38]),
        "constant huge rows among tiny ones": torch.cat([torch.full((2, 16), 3.3e38),
                                                        torch.randn(10, 16, generator=g) * 1e-30]),
        "a row spanning -3.4e38..3.4e38": torch.cat([torch.linspace(-1, 1, 16).view(1, -1) * 3.4e38,
                                                    torch.randn(5, 16, generator=g)]),
    }


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("case", list(extreme_inputs()))
def test_finite_inputs_near_the_limit_stay_finite(name, case):
    x = extreme_inputs()[case]
    assert torch.isfinite(x).all()
    for q in both_forms(name, 4):
        assert torch.isfinite(q(x, 3)).all()
        assert torch.isfinite(q.quantize(x, 3).dequantize()).all()


def test_constant_rows_are_exact_on_their_grid():
    """Rows of equal values (a 3e38 block, BHQ's reported case) come back exactly: T mixes nothing that
    a min-max grid could not hold."""
    x = torch.cat([torch.full((6, 16), 3e38), torch.full((6, 16), -1.5e38)])
    for name in QUANTIZERS:
        for q in both_forms(name, 4):
            assert torch.equal(q(x, 1), x), name


def test_random_magnitudes_across_the_whole_float32_range():
    """300 random (N, D) gradients whose rows take exponents from -126 to 127 (some constant): every
    quantizer, both forms, finite values and codes."""
    g = torch.Generator().manual_seed(1)
    for trial in range(60):
        n, d = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        exponent = torch.randint(-126, 128, (n, 1), generator=g).float()
        mantissa = torch.rand(n, d, generator=g) * 2 - 1
        constant = torch.rand(n, 1, generator=g) < 0.3
        x = (torch.where(constant, mantissa[:, :1].expand(n, d), mantissa) * torch.exp2(exponent)).clamp(-FMAX, FMAX)
        for name in QUANTIZERS:
            for q in both_forms(name, int(torch.randint(2, 9, (1,), generator=g))):
                assert torch.isfinite(q(x, trial)).all(), (name, trial)
                assert torch.isfinite(q.quantize(x, trial).dequantize()).all(), (name, trial)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_the_overflow_path_gives_the_codes_of_exact_arithmetic(name):
    """A power of two moves every min-max grid along: x near the limit is quantized as 2^-k x, so its codes
    are those of 2^-k x and its grid is 2^k times that one's."""
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(16, 24, generator=g) * 2 - 1) * 3.3e38
    k = overflow_shift(x, name)
    assert k > 0
    small = torch.ldexp(x, torch.tensor(-float(k)))
    for q in both_forms(name, 4):
        big, ref = q.quantize(x, 7), q.quantize(small, 7)
        assert torch.equal(big.codes, ref.codes)
        assert torch.equal(big.scale, ref.scale * 2.0**k)
        assert torch.isfinite(big.dequantize()).all()


def test_normal_inputs_never_take_the_overflow_path():
    x = torch.randn(64, 32) * 1e30
    for q in both_forms("householder", 4):
        with pytest.raises(NonFiniteError, match="overflow inside the quantizer"):
            overflow_shift(x, q.name)  # x has room: no shift would help, so none is tried


@pytest.mark.parametrize("name", QUANTIZERS)
def test_a_non_finite_input_is_named_as_the_input(name):
    x = torch.randn(8, 16)
    x[3, 5] = float("inf")
    for q in both_forms(name, 4):
        with pytest.raises(NonFiniteError) as err:
            q(x, 0)
        assert not err.value.intermediate and "in the gradient" in str(err.value)
        assert "computed from" not in str(err.value)


def test_an_intermediate_is_named_as_such():
    err = NonFiniteError("gradient", "fc1", "dx", intermediate=True)
    assert str(err) == ("non-finite values (NaN or inf) computed from the finite gradient of layer fc1, slot dx: "
                        "an overflow inside the quantizer (please report it)")
