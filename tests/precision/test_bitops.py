"""BitOPs accounting (spec/cpt.md, "Cost accounting"): MACs by hand, the published savings through
the run's own hooks (the schedule sets the bits, the layers report what they used, the counter sums)."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from fqtrun.precision.bitops import measure_macs, step_bitops
from fqtrun.precision.hooks import bitops_hook, schedule_hook
from fqtrun.quant.convert import convert
from fqtrun.quant.layers import NoiseContext
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.tasks import Classification
from fqtrun.training.hooks import RunFacts


class QuantLinear(nn.Linear):
    """Stands in for a quantized subclass: must be counted like its base."""


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2 = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv1d(4, 6, kernel_size=5, groups=2, bias=False)
        self.fc = QuantLinear(10, 7)

    def forward(self, image, seq, tokens):
        a = self.bn(self.conv2(image)).sum()
        b = self.conv1(seq).sum()
        c = self.fc(self.fc(tokens)[..., :3].repeat(1, 1, 4)[..., :10]).sum()  # fc called twice
        return a + b + c


def _inputs():
    return (torch.randn(2, 3, 9, 9), torch.randn(3, 4, 20), torch.randn(4, 3, 10))


def test_measure_macs_matches_hand_count():
    net = Net().train()
    running_mean = net.bn.running_mean.clone()
    macs = measure_macs(net, _inputs())
    # conv2d: out (2, 8, 5, 5), fan-in 3 * 3 * 3       -> 2*8*25 * 27
    # conv1d: out (3, 6, 16), fan-in (4 / 2 groups) * 5 -> 3*6*16 * 10
    # linear: out (4, 3, 7) per call, fan-in 10, 2 calls -> 2 * 84 * 10
    assert macs == {"conv2": 2 * 8 * 25 * 27, "conv1": 3 * 6 * 16 * 10, "fc": 2 * 4 * 3 * 7 * 10}
    assert net.training and net.bn.training  # mode restored
    assert torch.equal(net.bn.running_mean, running_mean)  # no BatchNorm update


def test_measure_macs_agrees_with_torch_flop_counter():
    # FlopCounterMode counts 2 FLOPs per MAC of every mm / conv, an independent count.
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 4, 5, stride=2, groups=4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )
    x = torch.randn(5, 3, 16, 16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    assert 2 * sum(measure_macs(net, x).values()) == counter.get_total_flops()


def test_measure_macs_refuses_a_model_without_gemms():
    with pytest.raises(ValueError, match="no Linear"):
        measure_macs(nn.ReLU(), torch.randn(3))


def test_step_bitops_sums_three_gemms_per_layer():
    macs = {"a": 100, "b": 10}
    bits = {"a": (4, 4, 8), "b": (8, 6, 8)}
    # a: 100 * (16 + 32 + 32); b: 10 * (48 + 64 + 48)
    assert step_bitops(macs, bits) == 100 * 80 + 10 * 160
    assert step_bitops(macs, (8, 8, 8)) == 110 * 192
    with pytest.raises(ValueError, match="layers \\['b'\\]"):
        step_bitops(macs, {"a": (8, 8, 8)})


def _reference_savings(lo, hi, g, b, period, cycles=1):
    """The spec's formula written out with numpy (np.round is half-even too)."""
    t = np.arange(period * cycles)
    q = np.round(lo + 0.5 * (hi - lo) * (1 - np.cos(np.pi * (t % period) / period)))
    return 1 - np.mean(q**2 + 2 * g * q) / (b**2 + 2 * b * g)


def _limit_savings(lo, hi, g, b):
    """Infinitely long cycles: bit k holds for the u with its value in [k - .5, k + .5)."""

    def u(level):  # inverse of lo + (hi - lo)/2 (1 - cos(pi u)), clipped to the range
        level = min(max(level, lo), hi)
        return math.acos(1 - 2 * (level - lo) / (hi - lo)) / math.pi

    mean = sum((u(k + 0.5) - u(k - 0.5)) * (k * k + 2 * g * k) for k in range(lo, hi + 1))
    return 1 - mean / (b * b + 2 * b * g)


# (forward lo, hi, gradient g = static b) -> published savings at 2000-step cycles, long-cycle limit
PUBLISHED = [((3, 8), 36.67, 36.66), ((3, 6), 30.05, 30.03), ((4, 8), 30.11, 30.09), ((5, 8), 23.16, 23.14)]


def run_savings(lo: int, hi: int, period: int) -> float:
    """bitops_savings of `period` steps of a real quantized layer under CPT lo-hi/hi (one whole cycle).

    A cycle repeats, so one 2000-step cycle gives the figure of the reference's 32 x 2000 steps.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    noise = NoiseContext()
    convert(model, slot_factory(QuantConfig(grad="per_sample", bits_w=hi, bits_a=hi, bits_dx=hi, bits_dw=hi)), noise)
    x, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    facts = RunFacts(model=model, train_set=TensorDataset(x, y), task=Classification(), noise=noise,
                     total_steps=period, steps_per_epoch=1, batch_size=8, seed=0, log_every=1)
    node = OmegaConf.create({"_target_": "fqtrun.precision.schedules.Cyclic", "_partial_": True, "min_bits": lo,
                             "max_bits": hi, "cycles": 1})
    schedule, counter = schedule_hook(node, facts), bitops_hook(node, facts)
    for step in range(period):
        schedule.before_step(step)
        nn.functional.cross_entropy(model(x), y).backward()
        counter.after_step(step + 1, {})
    return counter.summary()["bitops_savings"]


@pytest.mark.parametrize("bounds, at_2000, limit", PUBLISHED)
def test_savings_at_2000_step_cycles_match_the_paper(bounds, at_2000, limit):
    lo, hi = bounds
    got = run_savings(lo, hi, 2000)
    assert round(100 * got, 2) == at_2000
    assert got == pytest.approx(_reference_savings(lo, hi, hi, hi, 2000), abs=1e-12)
    if bounds == (5, 8):
        assert abs(100 * got - 23.155) < 5e-4  # the spec's unrounded figure
    assert round(100 * _limit_savings(lo, hi, hi, hi), 2) == limit  # and the spec's long-cycle figures
