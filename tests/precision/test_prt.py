"""Precision range test (spec/cpt.md): the scripted procedure, then a toy task that low precision cannot learn."""

import pytest
import torch
import torch.nn.functional as F

from fqtrun.precision.prt import accuracy_delta, precision_range_test
from fqtrun.quant.grid import dequantize, minmax_grid, quantize_nearest


def test_prt_stops_at_first_precision_that_improves_and_reports_trace():
    curves = {2: [0.5] * 10, 3: [0.5] * 8 + [0.55] * 2, 4: [0.4, 0.5] + [0.5] * 6 + [0.7, 0.8], 5: [0.0] * 10}
    calls = []

    def train_steps(bits, k):
        calls.append((bits, k))
        return curves[bits]

    res = precision_range_test(train_steps, b_start=2, b_max=8, steps_per_bits=10, window=2, threshold=0.1)
    assert calls == [(2, 10), (3, 10), (4, 10)]  # nothing trained past q_min
    assert res.q_min == 4 and res.found
    assert res.trace[3].delta == pytest.approx(0.05)  # (0.55 + 0.55)/2 - (0.5 + 0.5)/2
    assert res.trace[4].delta == pytest.approx(0.3)  # (0.7 + 0.8)/2 - (0.4 + 0.5)/2
    assert res.trace[4].accs == tuple(curves[4])
    assert res.override == "schedule=cyclic schedule.min_bits=4 schedule.max_bits=8"
    assert "q_min=4" in res.summary()


def test_prt_without_improvement_says_so():
    res = precision_range_test(
        lambda b, k: [0.5] * k, b_start=3, b_max=5, steps_per_bits=6, window=3, threshold=0.0
    )
    assert res.q_min is None and not res.found and res.override is None
    assert sorted(res.trace) == [3, 4, 5]  # delta == tau is not an improvement
    assert "no precision in 3..5" in res.summary()


def test_accuracy_delta_is_last_minus_first_window():
    assert accuracy_delta([1, 2, 3, 4, 5, 6], 2) == pytest.approx(5.5 - 1.5)


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"b_start": 5, "b_max": 4}, "prt.b_start=5"),
        ({"b_start": 0}, "prt.b_start"),
        ({"steps_per_bits": 10, "window": 6}, "prt.steps_per_bits=10"),
        ({"window": 0}, "prt.window"),
        (
            {"steps_per_bits": 4, "window": 2, "train_steps": lambda b, k: [0.5] * (k - 1)},
            "returned 3 accuracies",
        ),
    ],
)
def test_prt_bad_settings_raise(kwargs, setting):
    kwargs = {"train_steps": lambda b, k: [0.5] * k, **kwargs}
    with pytest.raises(ValueError, match=setting.replace("[", "\\[")):
        precision_range_test(**kwargs)


# --- A real toy problem --------------------------------------------------------------
# XOR of two signs: features s_1 m_1, s_2 m_2 with s = +-1, m in [0.8, 1.2], label s_1 s_2,
# plus an outlier channel, zero except one +M and one -M per batch, which sets the per-tensor
# min-max input range [-M, M] (outliers are why low-bit min-max grids fail). The grid step
# 2M / (2^b - 1) rounds every informative value to 0 while it exceeds 2 * 1.2 and none once
# it is below 2 * 0.8: a precision either erases the signal (chance) or keeps all of it.
# A 2-layer MLP has its inputs, hidden activations and weights fake-quantized (straight-through).


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread avoids contention on a shared machine (seconds -> fractions).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_quant(x, bits):
    scale, zero = minmax_grid(x, bits)
    x_hat = dequantize(quantize_nearest(x, scale, zero, bits), scale, zero)
    return x + (x_hat - x).detach()


def make_batch(gen, n, outlier):
    signs = torch.randint(0, 2, (n, 2), generator=gen) * 2 - 1
    informative = signs * (0.8 + 0.4 * torch.rand(n, 2, generator=gen))  # (n, 2)
    spikes = torch.zeros(n, 1)
    spikes[0], spikes[1] = outlier, -outlier
    return torch.cat([informative, spikes], 1), (signs.prod(1) > 0).float()


class QuantMLP:
    def __init__(self, seed, hidden=16):
        gen = torch.Generator().manual_seed(seed)
        self.w1 = (torch.randn(hidden, 3, generator=gen) / 3**0.5).requires_grad_()
        self.b1 = torch.zeros(hidden, requires_grad=True)
        self.w2 = (torch.randn(hidden, generator=gen) / hidden**0.5).requires_grad_()
        self.b2 = torch.zeros((), requires_grad=True)
        self.params = [self.w1, self.b1, self.w2, self.b2]

    def logits(self, x, bits):
        h = F.relu(fake_quant(x, bits) @ fake_quant(self.w1, bits).T + self.b1)  # (n, hidden)
        return fake_quant(h, bits) @ fake_quant(self.w2, bits) + self.b2

    def train(self, gen, bits, steps, outlier, lr, batch=64):
        """SGD steps at `bits`; returns each step's batch accuracy (before its update)."""
        accs = []
        for _ in range(steps):
            x, y = make_batch(gen, batch, outlier)
            z = self.logits(x, bits)
            accs.append(((z > 0).float() == y).float().mean().item())
            for p in self.params:
                p.grad = None
            F.binary_cross_entropy_with_logits(z, y).backward()
            with torch.no_grad():
                for p in self.params:
                    p -= lr * p.grad
        return accs

    def test_accuracy(self, bits, outlier):
        x, y = make_batch(torch.Generator().manual_seed(99), 2000, outlier)
        with torch.no_grad():
            return ((self.logits(x, bits) > 0).float() == y).float().mean().item()


@pytest.mark.parametrize("outlier", [10.0, 40.0])
def test_prt_finds_the_first_precision_that_can_learn(outlier):
    steps = {b: 2 * outlier / (2**b - 1) for b in range(2, 9)}  # input grid step per precision
    assert all(s < 1.6 or s > 2.4 for s in steps.values())  # no partly-erased precision

    # Independent check: train every precision separately from scratch with a stronger
    # budget (5x the learning rate, 150 steps) and test it on held-out data.
    final = {}
    for bits in range(2, 9):
        model = QuantMLP(seed=0)
        model.train(torch.Generator().manual_seed(1), bits, 150, outlier, lr=0.05)
        final[bits] = model.test_accuracy(bits, outlier)
    learnable = [b for b, acc in final.items() if acc > 0.95]
    assert learnable == list(range(learnable[0], 9))
    assert all(abs(final[b] - 0.5) < 0.05 for b in range(2, learnable[0]))  # chance below
    assert learnable[0] == min(b for b, s in steps.items() if s < 1.6)  # as the grid step predicts

    # The PRT as in the paper: one model trained on while the precision rises.
    model, gen = QuantMLP(seed=3), torch.Generator().manual_seed(4)
    res = precision_range_test(
        lambda bits, k: model.train(gen, bits, k, outlier, lr=0.01),
        b_start=2,
        b_max=8,
        steps_per_bits=100,
        window=10,
        threshold=0.15,
    )
    assert res.q_min == learnable[0]
    assert all(abs(res.trace[b].delta) < 0.1 for b in range(2, res.q_min))
    assert res.override == f"schedule=cyclic schedule.min_bits={learnable[0]} schedule.max_bits=8"
