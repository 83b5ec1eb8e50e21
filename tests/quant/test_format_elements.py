"""Element codecs (spec/formats.md, "Element formats"): every representable value round-trips, RTN equals
torch's own float8 casts, E2M1 is exactly {0, 0.5, 1, 1.5, 2, 3, 4, 6}, and SR is unbiased with the
closed-form variance between the two neighbours."""

from __future__ import annotations

import pytest
import torch

from fqtrun.quant.formats.elements import E2M1, E2M3, E3M2, E4M3, E5M2, ELEMENTS
from fqtrun.quant.grid import uniform_noise

# the spec's table: (largest normal, smallest normal, smallest subnormal)
SPEC = {"e4m3": (448.0, 2.0**-6, 2.0**-9), "e5m2": (57344.0, 2.0**-14, 2.0**-16), "e3m2": (28.0, 2.0**-2, 2.0**-4),
        "e2m3": (7.5, 1.0, 2.0**-3), "e2m1": (6.0, 1.0, 0.5)}


@pytest.mark.parametrize("name", list(ELEMENTS))
def test_every_representable_value_round_trips(name):
    e = ELEMENTS[name]
    codes = torch.arange(1 << e.bits, dtype=torch.int32)
    values = e.decode(codes)
    finite = values.abs() <= e.max  # E4M3's NaN and E5M2's inf/NaN patterns decode above max
    assert torch.equal(e.round(values[finite]), values[finite])
    assert torch.equal(e.encode(values[finite]).to(torch.int32), codes[finite])
    largest, normal, sub = SPEC[name]
    pos = e.values()
    assert pos.max() == largest and pos[1] == sub and pos[pos >= normal].min() == normal
    assert len(pos) == len(set(pos.tolist()))  # one code per magnitude (+0 aside)


def test_fp4_magnitudes_are_exactly_the_spec_set():
    assert E2M1.values().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    v = torch.linspace(-7, 7, 2001)
    assert set(E2M1.round(v).abs().tolist()) == {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def _edge_inputs(e, dtype):
    """Random values over the whole range, exact ties between neighbours, subnormals, saturation."""
    g = torch.Generator().manual_seed(0)
    grid = e.values().double()
    mids = ((grid[1:] + grid[:-1]) / 2).float()  # ties: round half to even
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-20, 18, (20000,), generator=g).float())
    sub = torch.rand(500, generator=g) * float(grid[grid > 0].min()) * 8
    over = torch.tensor([e.max, e.max * 1.01, e.max * 1.1, 1e30, float(torch.finfo(dtype).max)])
    v = torch.cat([rand, mids, sub, over, torch.tensor([0.0, -0.0])])
    return torch.cat([v, -v])


@pytest.mark.parametrize("elem,dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)])
def test_fp8_nearest_equals_torch_casts(elem, dtype):
    v = _edge_inputs(elem, dtype)
    # the spec's conversions saturate; torch's E5M2 cast rounds overflow to inf, so it sees clamped values
    ref = v.clamp(-elem.max, elem.max).to(dtype)
    ours = elem.round(v)
    assert torch.equal(ours.view(torch.int32), ref.float().view(torch.int32))  # -0 included
    assert torch.equal(elem.encode(ours), ref.view(torch.uint8))


def test_e4m3_saturates_like_torch_without_clamping():
    v = torch.tensor([448.0, 460.0, 464.0, 500.0, 1e10, -1e10])
    assert torch.equal(E4M3.round(v), v.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("elem", [E4M3, E5M2, E3M2, E2M3, E2M1])
def test_stochastic_rounding_is_unbiased_with_the_closed_form_variance(elem):
    """Each x between two grid neighbours lo < hi: E[SR(x)] = x, Var = (x - lo)(hi - x) (z-test, MC)."""
    grid = elem.values()
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(grid) - 1, (64,), generator=g)
    lo, hi = grid[idx], grid[idx + 1]
    x = lo + (hi - lo) * torch.rand(64, generator=g)
    x = torch.where(torch.rand(64, generator=g) < 0.5, -x, x)
    draws = 4000
    noise = uniform_noise((draws, 64), seed=5)
    q = elem.round(x.expand(draws, 64), "stochastic", noise).double()
    assert ((q.abs() == lo.double()) | (q.abs() == hi.double())).all()  # only the two neighbours
    var = ((x.abs() - lo) * (hi - x.abs())).double()
    z = (q.mean(0) - x.double()) / (var.clamp(min=1e-30) / draws).sqrt()
    assert z.abs().max() < 4.5
    emp = ((q - x.double()) ** 2).mean(0)
    keep = var > 0
    assert torch.allclose(emp[keep], var[keep], rtol=0.25)
    assert (emp.mean() / var.mean() - 1).abs() < 0.05
