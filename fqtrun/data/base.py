"""What every dataset builder returns, and the one error a missing or malformed dataset raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hydra.utils import instantiate
from torch.utils.data import Dataset

from fqtrun.errors import CheckpointError, FqtrunError


class DatasetError(FqtrunError, ValueError):
    """A dataset folder or file is missing or malformed.

    The message is one line: the setting, what was expected where, and how to get it.
    """


@dataclass
class DataBundle:
    """A train and a test split plus what the model builder needs to know about them.

    `task` names the objective the data is for (fqtrun.tasks.TASKS). A bundle whose models only fit
    this very data (a language model's vocabulary) says so in `signature()`, which checkpoints
    record and `check_signature` compares; `facts()` is what summary.json records about the data.
    """

    train: Dataset
    test: Dataset
    num_classes: int  # classes; the vocabulary size for a language model
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    name: str
    task = "classification"

    def signature(self) -> dict:
        """{setting: value} a checkpoint trained on this data must match (nothing for fixed datasets)."""
        return {}

    def facts(self) -> dict:
        return {}

    def task_options(self) -> dict:
        """Keyword arguments the task is built with besides the run's (a language model's bytes per token)."""
        return {}

    def tokenizer_json(self) -> str | None:
        """A tokenizer this data was tokenised with that a run must keep (its checkpoints carry it, so
        resume, sample and variance rebuild the same ids instead of training another); None: nothing to keep."""
        return None


def build_bundle(node, checkpoint: dict | None = None) -> DataBundle:
    """The dataset of a `dataset` config node; a checkpoint that carries a tokenizer (DataBundle.tokenizer_json)
    hands it to the builder as `saved_tokenizer`, which uses it as it is."""
    saved = (checkpoint or {}).get("tokenizer")
    return instantiate(node, **({"saved_tokenizer": saved} if saved else {}))


def check_signature(theirs: dict, ours: dict, path) -> None:
    """Refuse a checkpoint trained on other data (DataBundle.signature), naming the setting that differs."""
    for key, value in ours.items():
        if key in theirs and theirs[key] != value:
            raise CheckpointError(f"checkpoint {path} was trained with {key} giving {_shown(theirs[key], value)}, "
                                  f"this run gives {_shown(value, theirs[key])}: pass the {key} the run was "
                                  "trained with (its .hydra/config.yaml), or another checkpoint")


def _shown(value, other) -> str:
    """A signature value for a message: a long vocabulary as its size and where it differs from `other`."""
    if not isinstance(value, str) or len(value) <= 12:
        return repr(value)
    at = next((i for i, (a, b) in enumerate(zip(value, other)) if a != b), min(len(value), len(other)))
    return f"a {len(value)}-symbol vocabulary ({value[at:at + 1]!r} at index {at})"


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
