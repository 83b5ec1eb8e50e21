"""CIFAR-10 / CIFAR-100 from the official python batches in a local folder (never downloaded).

Loading and parsing are torchvision's; only its md5 check is relaxed (see LocalCIFAR10).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from torchvision import datasets, transforms

from fqtrun.data.base import DataBundle, DatasetError, one_line

URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def _no_md5(files: list[list[str]]) -> list[list[str | None]]:
    return [[name, None] for name, _ in files]


# Why these subclasses: torchvision compares each file's md5 with the official archive's, which
# any other copy of the format fails (the tiny fixtures the tests write, a re-pickled subset).
# With md5 None, torchvision's own check_integrity (used by _check_integrity and _load_meta) only
# tests that each expected file exists; a file that exists but does not parse is caught in _load
# and reported as a DatasetError. Loading and parsing stay torchvision's.
class LocalCIFAR10(datasets.CIFAR10):
    """torchvision CIFAR10 whose integrity check is 'every expected file exists'."""

    train_list = _no_md5(datasets.CIFAR10.train_list)
    test_list = _no_md5(datasets.CIFAR10.test_list)
    meta: ClassVar[dict] = {**datasets.CIFAR10.meta, "md5": None}


class LocalCIFAR100(datasets.CIFAR100):
    """torchvision CIFAR100 whose integrity check is 'every expected file exists'."""

    train_list = _no_md5(datasets.CIFAR100.train_list)
    test_list = _no_md5(datasets.CIFAR100.test_list)
    meta: ClassVar[dict] = {**datasets.CIFAR100.meta, "md5": None}


@dataclass(frozen=True)
class _Variant:
    name: str
    label: str        # for messages
    tv_class: type
    archive: str
    num_classes: int
    mean: tuple[float, float, float]  # per-channel mean / std of the 50000 training images in [0, 1]
    std: tuple[float, float, float]

    @property
    def folder(self) -> str:
        return self.tv_class.base_folder

    @property
    def files(self) -> list[str]:
        cls = self.tv_class
        return [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


CIFAR10 = _Variant("cifar10", "CIFAR-10", LocalCIFAR10, "cifar-10-python.tar.gz", 10,
                   (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100 = _Variant("cifar100", "CIFAR-100", LocalCIFAR100, "cifar-100-python.tar.gz", 100,
                    (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _transforms(v: _Variant, augment: bool) -> tuple[transforms.Compose, transforms.Compose]:
    """Standard CIFAR recipe: train = RandomCrop(32, pad 4) + horizontal flip; both normalised."""
    tail = [transforms.ToTensor(), transforms.Normalize(v.mean, v.std)]
    aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose(aug + tail), transforms.Compose(tail)


def _load(v: _Variant, root: str, train: bool, transform):
    """torchvision's loader on `root`, with parse failures turned into a one-line DatasetError."""
    where = Path(root).expanduser() / v.folder
    fix = f"re-extract {v.archive} from {URL} into {Path(root).expanduser()}"
    try:
        ds = v.tv_class(str(Path(root).expanduser()), train=train, transform=transform, download=False)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError,
            AttributeError, RuntimeError, OSError) as exc:
        raise DatasetError(f"dataset.root={root}: the {v.label} files in {where} do not parse as the "
                           f"python-pickle batches ({one_line(exc)}); {fix}") from exc
    targets = np.asarray(ds.targets)
    if len(targets) != len(ds.data) or targets.min(initial=0) < 0 or targets.max(initial=0) >= v.num_classes:
        raise DatasetError(f"dataset.root={root}: the {v.label} labels in {where} are not "
                           f"{len(ds.data)} integers in [0, {v.num_classes}); {fix}")
    return ds


def _build(v: _Variant, root: str, augment: bool) -> DataBundle:
    where = Path(root).expanduser() / v.folder
    missing = [f for f in v.files if not (where / f).is_file()]
    if missing:
        found = "folder not found" if not where.is_dir() else f"missing {', '.join(missing)}"
        raise DatasetError(f"dataset.root={root}: expected the {v.label} python batches "
                           f"({', '.join(v.files)}) in {where} ({found}); download "
                           f"{v.archive} from {URL} and extract it in {Path(root).expanduser()}")
    train_tf, test_tf = _transforms(v, augment)
    return DataBundle(train=_load(v, root, True, train_tf), test=_load(v, root, False, test_tf),
                      num_classes=v.num_classes, input_shape=(3, 32, 32), name=v.name)


def build_cifar10(root: str, augment: bool = True) -> DataBundle:
    """CIFAR-10 from root/cifar-10-batches-py."""
    return _build(CIFAR10, root, augment)


def build_cifar100(root: str, augment: bool = True) -> DataBundle:
    """CIFAR-100 (fine labels) from root/cifar-100-python."""
    return _build(CIFAR100, root, augment)
