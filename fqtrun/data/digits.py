"""scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes; no download)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from fqtrun.data.base import DataBundle

NUM_CLASSES = 10


def build(test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Stratified seeded split; x (1, 8, 8) scaled to [0, 1] then standardised with the train mean/std."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"dataset.test_fraction={test_fraction} must be in (0, 1)")
    if not 0 <= seed < 2**32:
        raise ValueError(f"dataset.seed={seed} must be in [0, 2**32)")
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32) / 16.0  # pixel values are 0..16
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    # one scalar mean/std from the train split: corner pixels are constant, so no per-pixel std
    mean, std = x_tr.mean(), x_tr.std()

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        xs = ((xs - mean) / std).astype(np.float32).reshape(-1, 1, 8, 8)
        return TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys.astype(np.int64)))

    return DataBundle(train=tensors(x_tr, y_tr), test=tensors(x_te, y_te), num_classes=NUM_CLASSES,
                      input_shape=(1, 8, 8), name="digits")
