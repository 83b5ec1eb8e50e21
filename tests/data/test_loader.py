"""make_loader: deterministic from the seed, every sample once per epoch, skip_batches = dropping batches."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from fqtrun.data import make_loader


def numbered(n: int) -> TensorDataset:
    """x[i] = (i, -i) so a batch tells which samples it holds; y[i] = i % 3."""
    i = torch.arange(n)
    return TensorDataset(torch.stack([i, -i], dim=1).float(), i % 3)


class PlainDataset(Dataset):
    """Same samples as `numbered`, through __getitem__ (forces the DataLoader path)."""

    def __init__(self, n: int, noise: bool = False):
        self.base, self.noise = numbered(n), noise

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x + torch.rand(()) if self.noise else x), y  # like a random augmentation


def ids(batches) -> list[list[int]]:
    return [x[:, 0].long().tolist() for x, _ in batches]


@pytest.mark.parametrize("n,bs,drop_last", [(10, 3, False), (10, 3, True), (12, 4, False), (5, 8, False)])
def test_every_sample_once_per_epoch(n, bs, drop_last):
    loader = make_loader(numbered(n), bs, shuffle=True, seed=1, drop_last=drop_last)
    batches = ids(loader)
    assert len(loader) == len(batches) == (n // bs if drop_last else math.ceil(n / bs))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    if drop_last:
        assert all(len(b) == bs for b in batches) and len(flat) == n - n % bs
    else:
        assert sorted(flat) == list(range(n))
    for x, y in loader:  # labels travel with their samples
        assert torch.equal(y, x[:, 0].long() % 3)


def test_deterministic_from_the_seed():
    data = numbered(50)
    a, b = ids(make_loader(data, 8, True, seed=3)), ids(make_loader(data, 8, True, seed=3))
    assert a == b
    assert a != ids(make_loader(data, 8, True, seed=4))
    assert ids(make_loader(data, 8, False, seed=3)) == [list(range(k, min(k + 8, 50))) for k in range(0, 50, 8)]
    loader = make_loader(data, 8, True, seed=3)
    assert ids(loader) == ids(loader)  # iterating again replays the epoch


@pytest.mark.parametrize("skip", [0, 1, 4, 7])
def test_skip_batches_equals_dropping_the_first_batches(skip):
    data = numbered(50)
    full = list(make_loader(data, 8, True, seed=9))
    resumed = make_loader(data, 8, True, seed=9, skip_batches=skip)
    assert len(resumed) == 7  # batches per epoch, whatever was skipped
    assert ids(resumed) == ids(full[skip:])


def test_dataloader_path_gives_the_same_batches_as_the_fast_path():
    fast = list(make_loader(numbered(23), 5, True, seed=2, skip_batches=1))
    slow = list(make_loader(PlainDataset(23), 5, True, seed=2, skip_batches=1))
    assert len(fast) == len(slow) == 4
    for (xf, yf), (xs, ys) in zip(fast, slow):
        assert torch.equal(xf, xs) and torch.equal(yf, ys)


def test_random_augmentation_replays_with_the_seed_and_spares_the_global_rng():
    data = PlainDataset(20, noise=True)
    state = torch.get_rng_state()
    a = [x for x, _ in make_loader(data, 6, True, seed=5)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    b = [x for x, _ in make_loader(data, 6, True, seed=5, skip_batches=2)]
    c = [x for x, _ in make_loader(data, 6, True, seed=6)]
    assert all(torch.equal(u, v) for u, v in zip(a[2:], b))  # resumed mid-epoch: same augmentation
    noise_a = torch.cat(a)[:, 0] - torch.cat(a)[:, 0].floor()
    noise_c = torch.cat(c)[:, 0] - torch.cat(c)[:, 0].floor()
    assert not torch.equal(noise_a.sort().values, noise_c.sort().values)


def test_worker_processes_give_the_same_batches():
    data = PlainDataset(12, noise=True)
    a = list(make_loader(data, 5, True, seed=8, num_workers=0))
    b = list(make_loader(data, 5, True, seed=8, num_workers=1))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("kwargs,needle", [({"batch_size": 0}, "batch_size=0"),
                                           ({"batch_size": 4, "skip_batches": 4}, "skip_batches=4"),
                                           ({"batch_size": 4, "num_workers": -1}, "num_workers=-1")])
def test_bad_settings_raise_one_line(kwargs, needle):
    with pytest.raises(ValueError) as e:
        make_loader(numbered(10), shuffle=True, seed=0, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
