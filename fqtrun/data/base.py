"""What every dataset builder returns, and the one error a missing or malformed dataset raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from fqtrun.errors import FqtrunError


class DatasetError(FqtrunError, ValueError):
    """A dataset folder or file is missing or malformed.

    The message is one line: the setting, what was expected where, and how to get it.
    """


@dataclass
class DataBundle:
    """A train and a test split plus what the model builder needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    name: str


def one_line(exc: BaseException) -> str:
    """An exception as a short single line, for embedding in a DatasetError message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def shape_tuple(shape: Sequence[int], setting: str) -> tuple[int, ...]:
    """A list/ListConfig of positive ints as a tuple; one-line ValueError naming the setting otherwise."""
    out = tuple(int(s) for s in shape)
    if not out or any(s < 1 for s in out):
        raise ValueError(f"{setting}={list(shape)} must be a non-empty list of positive sizes")
    return out
