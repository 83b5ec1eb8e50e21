"""MNIST-1D (Greydanus 2020): 4000 train / 1000 test 40-long 1-D signals, 10 classes.

Generated in code by the mnist1d package's make_dataset (never its get_dataset, which
downloads), then cached as an .npz keyed by the generator's arguments and package version.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from mnist1d.data import get_dataset_args, make_dataset
from torch.utils.data import TensorDataset

from fqtrun.data.base import DataBundle, DatasetError, one_line
from fqtrun.files import atomic_open

N_TRAIN, N_TEST, LENGTH, NUM_CLASSES = 4000, 1000, 40, 10
_EXPECTED = {"x": ((N_TRAIN, LENGTH), np.float32), "y": ((N_TRAIN,), np.int64),
             "x_test": ((N_TEST, LENGTH), np.float32), "y_test": ((N_TEST,), np.int64)}


def _args(seed: int):
    """mnist1d's default generator arguments with our seed (an ObjectView, as make_dataset wants)."""
    args = get_dataset_args()
    args.seed = seed
    return args


def cache_path(cache_dir: str, seed: int) -> Path:
    """Cache file for these generator arguments; a different mnist1d version gets a new file."""
    key = {k: v for k, v in vars(_args(seed)).items() if k != "url"}
    key["mnist1d"] = version("mnist1d")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"mnist1d-{digest}.npz"


def _generate(seed: int) -> dict[str, np.ndarray]:
    """Run make_dataset, restoring the global `random`/numpy RNG states it reseeds."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(_args(seed))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: data[k].astype(dtype) for k, (_, dtype) in _EXPECTED.items()}


def _load(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent, unreadable or the wrong shape."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in _EXPECTED}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for k, (shape, dtype) in _EXPECTED.items():
        if arrays[k].shape != shape or arrays[k].dtype != dtype:
            return None
    return arrays


def _save_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez through atomic_open: readers never see half a file."""
    with atomic_open(path) as f:
        np.savez(f, **arrays)


def build(cache_dir: str = "~/.cache/fqtrun", seed: int = 42) -> DataBundle:
    """MNIST-1D train/test as TensorDatasets: x float32 (n, 40), y int64 (n,)."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"dataset.seed={seed} must be in [0, 2**32): mnist1d seeds numpy with it")
    path = cache_path(cache_dir, seed)
    arrays = _load(path)
    if arrays is None:  # absent or corrupt: (re)generate
        arrays = _generate(seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(path, arrays)
        except OSError as exc:
            raise DatasetError(f"dataset.cache_dir={cache_dir}: cannot write the MNIST-1D cache "
                               f"{path} ({one_line(exc)}); set dataset.cache_dir to a writable folder") from exc
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return DataBundle(train=TensorDataset(t["x"], t["y"]), test=TensorDataset(t["x_test"], t["y_test"]),
                      num_classes=NUM_CLASSES, input_shape=(LENGTH,), name="mnist1d")
