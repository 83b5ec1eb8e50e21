"""Datasets: each builder returns a DataBundle; make_loader iterates one deterministically."""

from fqtrun.data.base import DataBundle, DatasetError
from fqtrun.data.loader import make_loader

DATASETS = ["mnist1d", "digits", "synthetic", "cifar10", "cifar100", "imagenet", "text", "tokens"]

__all__ = ["DATASETS", "DataBundle", "DatasetError", "make_loader"]
