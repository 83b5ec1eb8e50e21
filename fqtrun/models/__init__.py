"""Models: every constructor takes keyword settings plus num_classes and input_shape (one sample).

Built from conf/model/<name>.yaml by hydra.utils.instantiate(cfg.model, num_classes=..., input_shape=...).
"""

from __future__ import annotations

from collections.abc import Sequence

MODELS = ["mlp", "cnn1d", "transformer", "gpt", "llama", "resnet20", "resnet32", "resnet44", "resnet56", "resnet74",
          "resnet110", "preact_resnet56", "resnet18", "resnet50", "mobilenet_v2"]


def shape_of(input_shape: Sequence[int], model: str, ndims: Sequence[int]) -> tuple[int, ...]:
    """input_shape (list, tuple or ListConfig) as a tuple of ints with one of the allowed lengths."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) not in ndims or any(s < 1 for s in shape):
        allowed = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"model={model} needs a {allowed} input_shape of positive sizes (one sample, "
                         f"no batch dim), got {list(shape)}: pick a dataset/model pair that fits")
    return shape


__all__ = ["MODELS", "shape_of"]
