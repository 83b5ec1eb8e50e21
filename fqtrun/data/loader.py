"""Seeded batch iteration: the same seed gives the same batches, so a resumed run replays exactly.

The trainer passes a seed derived from the run seed and the epoch; `skip_batches` drops the
first batches of that epoch (resume mid-epoch) without loading them. Both paths below draw the
sample order from the same seeded permutation, so they yield the same batches for one seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): a well-spread per-sample seed in [0, 2**63)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class _SeededSamples(Dataset):
    """Each sample's random augmentation is drawn from torch's RNG seeded by (seed, index).

    torchvision transforms draw from torch's global RNG; seeding per sample inside a forked RNG
    makes augmentation a function of (seed, index) alone: the same with 0 or N workers, after a
    resume, and without disturbing the caller's RNG stream.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, index))
            return self.dataset[index]


class BatchDataset(Dataset):
    """A dataset that makes whole batches itself: `batch(indices, seed)` -> the tensors of those samples.

    For samples drawn at random (text windows at random offsets), vectorised: sample i under a seed
    must be a pure function of (seed, i), e.g. of sample_seed(seed, i), so a resume and the DDP
    shards see the same samples; the loader's seed changes with the epoch.
    """

    def batch(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class Loader:
    """Batches (x, y) of one epoch; `len()` is the number of batches in a whole epoch.

    Iterating yields len() - skip_batches batches, the same ones every time.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int,
                 drop_last: bool = False, num_workers: int = 0, skip_batches: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), bool(shuffle)
        self.seed, self.drop_last, self.num_workers = int(seed), bool(drop_last), int(num_workers)
        n = len(dataset)
        self.num_batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if not 0 <= skip_batches <= self.num_batches:
            raise ValueError(f"skip_batches={skip_batches} must be in [0, {self.num_batches}] "
                             f"(batches per epoch at batch_size={batch_size})")
        self.skip_batches = int(skip_batches)

    def __len__(self) -> int:
        return self.num_batches

    def _batch_indices(self) -> list[torch.Tensor]:
        """Index tensors of the batches still to yield this epoch."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        else:
            order = torch.arange(n)
        bs = self.batch_size
        return [order[i * bs:(i + 1) * bs] for i in range(self.skip_batches, self.num_batches)]

    def __iter__(self) -> Iterator:
        batches = self._batch_indices()
        if isinstance(self.dataset, BatchDataset):
            for idx in batches:
                yield self.dataset.batch(idx, self.seed)
            return
        if isinstance(self.dataset, TensorDataset):
            # fast path: slice the in-memory tensors, no per-sample collate
            tensors = self.dataset.tensors
            for idx in batches:
                yield tuple(t[idx] for t in tensors)
            return
        loader = DataLoader(
            _SeededSamples(self.dataset, self.seed),
            batch_sampler=[idx.tolist() for idx in batches],
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
        )
        for batch in loader:
            yield tuple(batch)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False,
                num_workers: int = 0, skip_batches: int = 0) -> Loader:
    """A deterministic iterable of (x, y) batches over `dataset` for one epoch (see Loader)."""
    return Loader(dataset, batch_size, shuffle, seed, drop_last, num_workers, skip_batches)
