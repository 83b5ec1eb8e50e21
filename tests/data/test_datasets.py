"""Dataset configs compose and instantiate; every builder gives the documented shapes, values and errors."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from mnist1d.data import get_dataset_args, make_dataset
from omegaconf.errors import MissingMandatoryValue
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from fqtrun.data import DATASETS, DatasetError, make_loader
from fqtrun.data import mnist1d as m1d
from fqtrun.data.cifar import CIFAR10, CIFAR100
from fqtrun.data.config import register_configs
from fqtrun.data.imagenet import MEAN as IN_MEAN
from fqtrun.data.imagenet import STD as IN_STD

CONF = Path(__file__).resolve().parents[2] / "conf"


def build(name: str, *overrides: str):
    """Compose conf/dataset/<name>.yaml with overrides and instantiate it.

    Hydra wraps a builder's exception in InstantiationException; re-raise the builder's own.
    """
    try:
        return instantiate(compose_dataset(name, *overrides))
    except InstantiationException as exc:
        raise exc.__cause__ from None


def compose_dataset(name: str, *overrides: str):
    register_configs(ConfigStore.instance())
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=None, overrides=[f"+dataset={name}", *overrides]).dataset


def assert_one_line_error(exc_info, *needles: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# ---------------------------------------------------------------- configs

def test_every_dataset_has_a_yaml_and_a_schema():
    assert sorted(p.stem for p in (CONF / "dataset").glob("*.yaml")) == sorted(DATASETS)
    for name in DATASETS:
        cfg = compose_dataset(name)
        assert cfg._target_.startswith("fqtrun.data.")


@pytest.mark.parametrize("override", ["dataset.cahce_dir=/x", "dataset.seed=abc", "dataset.root=/x"])
def test_misspelt_or_mistyped_setting_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_dataset("mnist1d", override)


def test_root_is_required():
    for name in ("cifar10", "cifar100", "imagenet", "tokens"):
        with pytest.raises(MissingMandatoryValue, match="dataset.root"):
            build(name)


# ---------------------------------------------------------------- mnist1d

@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """One generation shared by the module; records the global RNG draws right after it."""
    cache = tmp_path_factory.mktemp("cache")
    np.random.seed(7)
    random.seed(7)
    bundle = build("mnist1d", f"dataset.cache_dir={cache}")
    return cache, bundle, (np.random.rand(), random.random())


def test_mnist1d_shapes_dtypes_counts(mnist1d_cache):
    _, b, _ = mnist1d_cache
    assert (b.name, b.num_classes, b.input_shape) == ("mnist1d", 10, (40,))
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    assert x.shape == (4000, 40) and xt.shape == (1000, 40)
    assert x.dtype == xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))


def test_mnist1d_matches_the_package_and_leaves_global_rngs_alone(mnist1d_cache, tmp_path):
    _, b, draws_after_build = mnist1d_cache
    # make_dataset reseeds numpy and random globally; build restores them
    np.random.seed(7)
    random.seed(7)
    assert draws_after_build == (np.random.rand(), random.random())
    ref = make_dataset(get_dataset_args())  # the package itself, seed 42
    assert torch.equal(b.train.tensors[0], torch.from_numpy(ref["x"].astype(np.float32)))
    assert torch.equal(b.test.tensors[1], torch.from_numpy(ref["y_test"]))


def test_mnist1d_cache_is_reused_and_a_corrupt_one_regenerated(mnist1d_cache, monkeypatch):
    cache, b, _ = mnist1d_cache
    path = m1d.cache_path(str(cache), 42)
    assert path.is_file() and [p.name for p in cache.iterdir()] == [path.name]  # no temp files left
    real_generate = m1d._generate

    def forbidden(seed):
        raise AssertionError("regenerated although the cache is valid")

    monkeypatch.setattr(m1d, "_generate", forbidden)
    again = m1d.build(cache_dir=str(cache), seed=42)
    assert torch.equal(again.train.tensors[0], b.train.tensors[0])

    path.write_bytes(b"not an npz file")
    calls = []
    monkeypatch.setattr(m1d, "_generate", lambda seed: calls.append(seed) or real_generate(seed))
    fixed = m1d.build(cache_dir=str(cache), seed=42)
    assert calls == [42]
    assert torch.equal(fixed.test.tensors[0], b.test.tensors[0])
    assert m1d._load(path) is not None  # rewritten valid


def test_mnist1d_cache_key_depends_on_seed_and_expands_home():
    assert m1d.cache_path("/c", 1) != m1d.cache_path("/c", 2)
    assert "~" not in str(m1d.cache_path("~/x", 1))


# ---------------------------------------------------------------- digits

def rows_with_labels(rows: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """The multiset of (pixels..., label) rows, as a sorted list."""
    return sorted(map(tuple, np.column_stack([rows, labels]).tolist()))


def test_digits_split_is_seeded_complete_and_standardised():
    a, a2, c = build("digits"), build("digits"), build("digits", "dataset.seed=1")
    (x, y), (xt, yt) = a.train.tensors, a.test.tensors
    assert a.input_shape == (1, 8, 8) and x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert len(x) + len(xt) == 1797 and len(xt) == 360  # ceil(0.2 * 1797), sklearn's rounding
    assert torch.equal(x, a2.train.tensors[0]) and not torch.equal(x, c.train.tensors[0])
    # standardised with the train split's own statistics
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    # undo the scaling: train + test is exactly the original set of images and labels
    raw, labels = load_digits(return_X_y=True)
    both = torch.cat([x, xt]).reshape(-1, 64).double()
    lo = both.min()  # original pixel 0 maps to the minimum (every image has zero pixels)
    scale = (both.max() - lo) / 16.0  # pixel 16 maps to the maximum
    recovered = torch.round((both - lo) / scale).long().numpy()
    assert rows_with_labels(recovered, torch.cat([y, yt]).numpy()) == rows_with_labels(raw.astype(int), labels)
    assert np.bincount(yt.numpy()).min() >= 34  # stratified: each class ~36 in the test split


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_determinism():
    b = build("synthetic", "dataset.input_shape=[3,4,5]", "dataset.n_train=50", "dataset.n_test=7",
              "dataset.num_classes=3")
    x, y = b.train.tensors
    assert b.input_shape == (3, 4, 5) and x.shape == (50, 3, 4, 5) and b.test.tensors[0].shape == (7, 3, 4, 5)
    assert y.dtype == torch.int64 and y.max() < 3 and b.num_classes == 3
    again = build("synthetic", "dataset.input_shape=[3,4,5]", "dataset.n_train=50", "dataset.n_test=7",
                  "dataset.num_classes=3")
    assert torch.equal(x, again.train.tensors[0]) and torch.equal(y, again.train.tensors[1])


def test_synthetic_labels_come_from_one_learnable_teacher():
    b = build("synthetic", "dataset.input_shape=[20]", "dataset.n_train=2000", "dataset.n_test=500")
    (x, y), (xt, yt) = b.train.tensors, b.test.tensors
    clf = LogisticRegression(max_iter=2000).fit(x.numpy(), y.numpy())
    # linear teacher: a linear classifier trained on train generalises to test (chance = 0.1)
    assert clf.score(xt.numpy(), yt.numpy()) > 0.8


def test_synthetic_rejects_bad_settings():
    with pytest.raises(ValueError, match="dataset.num_classes"):
        build("synthetic", "dataset.num_classes=1")
    with pytest.raises(ValueError, match="dataset.input_shape"):
        build("synthetic", "dataset.input_shape=[3,0]")


# ---------------------------------------------------------------- CIFAR

def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar(root: Path, variant, n_per_file: int = 4, seed: int = 0) -> dict:
    """Tiny CIFAR files in the official pickle layout; returns the raw arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / variant.folder
    folder.mkdir(parents=True)
    written = {}
    label_key = "labels" if variant is CIFAR10 else "fine_labels"
    names = [n for n, _ in variant.tv_class.train_list + variant.tv_class.test_list]
    for name in names:
        data = rng.integers(0, 256, size=(n_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, variant.num_classes, size=n_per_file).tolist()
        entry = {"data": data, label_key: labels, "filenames": [f"{i}.png" for i in range(n_per_file)]}
        if variant is CIFAR100:
            entry["coarse_labels"] = [lab // 5 for lab in labels]
        _pickle(folder / name, entry)
        written[name] = (data, labels)
    meta_key = variant.tv_class.meta["key"]
    meta = {meta_key: [f"class{i}" for i in range(variant.num_classes)]}
    if variant is CIFAR100:
        meta["coarse_label_names"] = [f"super{i}" for i in range(20)]
    _pickle(folder / variant.tv_class.meta["filename"], meta)
    return written


def normalised(raw_row: np.ndarray, variant) -> torch.Tensor:
    """Reference: (pixel/255 - mean) / std per channel, from the (3072,) CHW row."""
    img = torch.from_numpy(raw_row.reshape(3, 32, 32).astype(np.float64)) / 255
    mean, std = torch.tensor(variant.mean).view(3, 1, 1), torch.tensor(variant.std).view(3, 1, 1)
    return ((img - mean) / std).float()


@pytest.mark.parametrize("variant", [CIFAR10, CIFAR100], ids=["cifar10", "cifar100"])
def test_cifar_loads_the_real_pickle_format(tmp_path, variant):
    written = write_cifar(tmp_path, variant)
    b = build(variant.name, f"dataset.root={tmp_path}")
    n_train = 4 * len(variant.tv_class.train_list)
    assert (len(b.train), len(b.test), b.num_classes, b.input_shape) == (n_train, 4, variant.num_classes,
                                                                         (3, 32, 32))
    test_name = variant.tv_class.test_list[0][0]
    data, labels = written[test_name]
    for i in range(4):  # test split: no augmentation, just normalisation
        x, y = b.test[i]
        assert y == labels[i]
        torch.testing.assert_close(x, normalised(data[i], variant), atol=1e-5, rtol=0)
    # train split: each sample is a 32x32 window of the zero-padded image, maybe flipped
    first = variant.tv_class.train_list[0][0]
    data, labels = written[first]
    padded = np.pad(data[0].reshape(3, 32, 32), ((0, 0), (4, 4), (4, 4)))
    windows = [padded[:, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    candidates = torch.stack([normalised(w.reshape(-1), variant) for w in windows])
    candidates = torch.cat([candidates, candidates.flip(-1)])
    for seed in range(3):
        (x,), (y,) = next(iter(make_loader(torch.utils.data.Subset(b.train, [0]), 1, False, seed)))
        assert y.item() == labels[0]
        assert (candidates - x).abs().amax(dim=(1, 2, 3)).min() < 1e-5


def test_cifar_without_augmentation_is_plain_normalisation(tmp_path):
    written = write_cifar(tmp_path, CIFAR10)
    b = build("cifar10", f"dataset.root={tmp_path}", "dataset.augment=false")
    data, _ = written["data_batch_1"]
    torch.testing.assert_close(b.train[0][0], normalised(data[0], CIFAR10), atol=1e-5, rtol=0)


def test_cifar_missing_folder_names_setting_place_and_source(tmp_path):
    with pytest.raises(DatasetError) as e:
        build("cifar10", f"dataset.root={tmp_path}")
    assert_one_line_error(e, f"dataset.root={tmp_path}", str(tmp_path / "cifar-10-batches-py"),
                          "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar.html")
    write_cifar(tmp_path, CIFAR100)
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetError) as e:
        build("cifar100", f"dataset.root={tmp_path}")
    assert_one_line_error(e, "missing meta", "cifar-100-python.tar.gz")


def test_cifar_malformed_files_give_the_one_line_error(tmp_path):
    write_cifar(tmp_path, CIFAR10)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DatasetError) as e:
        build("cifar10", f"dataset.root={tmp_path}")
    assert_one_line_error(e, "dataset.root=", "do not parse", "re-extract cifar-10-python.tar.gz")
    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3",
            {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})
    with pytest.raises(DatasetError) as e:
        build("cifar10", f"dataset.root={tmp_path}")
    assert_one_line_error(e, "labels", "[0, 10)")


# ---------------------------------------------------------------- ImageNet folder

COLOURS = {"ant": (255, 0, 0), "bee": (0, 128, 255)}


def write_image_folder(root: Path, size=(14, 11)) -> None:
    for split in ("train", "val"):
        for cls, colour in COLOURS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", size, colour).save(root / split / cls / f"{i}.png")


def test_imagenet_folder_loads_with_tiny_sizes(tmp_path):
    write_image_folder(tmp_path)
    b = build("imagenet", f"dataset.root={tmp_path}", "dataset.crop=8", "dataset.resize=10")
    assert (b.num_classes, b.input_shape, len(b.train), len(b.test)) == (2, (3, 8, 8), 4, 4)
    mean, std = torch.tensor(IN_MEAN).view(3, 1, 1), torch.tensor(IN_STD).view(3, 1, 1)
    for split in (b.train, b.test):
        for i in range(4):
            x, y = split[i]
            colour = torch.tensor(COLOURS[sorted(COLOURS)[y]], dtype=torch.float32).view(3, 1, 1)
            # solid images: any crop/resize/flip keeps the colour, so the output is known exactly
            torch.testing.assert_close(x, ((colour / 255 - mean) / std).expand(3, 8, 8), atol=1e-5, rtol=0)


def test_imagenet_missing_and_malformed_folders(tmp_path):
    with pytest.raises(DatasetError) as e:
        build("imagenet", f"dataset.root={tmp_path}")
    assert_one_line_error(e, f"dataset.root={tmp_path}", str(tmp_path / "train"), "image-net.org")
    write_image_folder(tmp_path)
    (tmp_path / "val" / "cat").mkdir()  # a class folder with no images
    with pytest.raises(DatasetError) as e:
        build("imagenet", f"dataset.root={tmp_path}")
    assert_one_line_error(e, "no readable images", str(tmp_path / "val"))
    Image.new("RGB", (4, 4)).save(tmp_path / "val" / "cat" / "0.png")
    with pytest.raises(DatasetError) as e:
        build("imagenet", f"dataset.root={tmp_path}")
    assert_one_line_error(e, "same class folders", "cat")


def test_imagenet_rejects_crop_larger_than_resize(tmp_path):
    with pytest.raises(ValueError, match="dataset.crop=32"):
        build("imagenet", f"dataset.root={tmp_path}", "dataset.crop=32", "dataset.resize=16")
