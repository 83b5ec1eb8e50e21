"""torchvision's resnet18 / resnet50 / mobilenet_v2, randomly initialised (weights=None: no download)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision import models

from fqtrun.models import shape_of

ARCHS = {"resnet18": models.resnet18, "resnet50": models.resnet50, "mobilenet_v2": models.mobilenet_v2}


def _replace_stem(model: nn.Module, arch: str, in_channels: int) -> None:
    """Swap the first conv for one with in_channels inputs and otherwise the same geometry."""
    parent, name = (model, "conv1") if arch.startswith("resnet") else (model.features[0], "0")
    old: nn.Conv2d = getattr(parent, name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                    bias=old.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits it
    setattr(parent, name, new)


def build(num_classes: int, input_shape: Sequence[int], arch: str = "resnet18") -> nn.Module:
    """torchvision `arch` with num_classes outputs and a stem for input_shape[0] channels."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(ARCHS)}")
    cin = shape_of(input_shape, arch, (3,))[0]
    model = ARCHS[arch](weights=None, num_classes=int(num_classes))
    if cin != 3:
        _replace_stem(model, arch, cin)
    return model
