"""Random Gaussian inputs of any shape labelled by a fixed random linear teacher (learnable).

For tests and benchmarks: no files, any input shape, instant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from fqtrun.data.base import DataBundle, shape_tuple


def build(input_shape: Sequence[int] = (40,), num_classes: int = 10, n_train: int = 1000,
          n_test: int = 200, seed: int = 0) -> DataBundle:
    """x ~ N(0, 1) of shape (n, *input_shape); y = argmax(flatten(x) @ W) with W ~ N(0, 1) fixed by seed."""
    shape = shape_tuple(input_shape, "dataset.input_shape")
    if num_classes < 2:
        raise ValueError(f"dataset.num_classes={num_classes} must be >= 2")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if n < 1:
            raise ValueError(f"dataset.{name}={n} must be >= 1")
    g = torch.Generator().manual_seed(int(seed))
    dim = int(torch.tensor(shape).prod())
    teacher = torch.randn(dim, num_classes, generator=g)

    def split(n: int) -> TensorDataset:
        x = torch.randn(n, *shape, generator=g)
        y = (x.reshape(n, dim) @ teacher).argmax(dim=1)
        return TensorDataset(x, y)

    train, test = split(int(n_train)), split(int(n_test))
    return DataBundle(train=train, test=test, num_classes=int(num_classes), input_shape=shape,
                      name="synthetic")
