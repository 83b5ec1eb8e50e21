"""Multi-layer perceptron over the flattened input."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn

from fqtrun.models import shape_of


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] per hidden size -> Linear(num_classes)."""

    def __init__(self, num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (100, 100)):
        super().__init__()
        shape = shape_of(input_shape, "mlp", (1, 2, 3))
        sizes = [math.prod(shape), *(int(h) for h in hidden)]
        if any(h < 1 for h in sizes[1:]):
            raise ValueError(f"model.hidden={list(hidden)} must hold positive layer widths")
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], int(num_classes)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
