"""dataset=tokens: nanoGPT token folders written by hand (uint16 and uint32, meta.pkl and meta.json), the
plain-data unpickler, reading window by window (resident memory far below the file), seeded resumable
windows, and a one-line error for each bad input."""

from __future__ import annotations

import collections
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF
from fqtrun.commands.common import user_error
from fqtrun.data import DatasetError, make_loader
from fqtrun.data.token_files import TokenFile, load_plain_pickle
from fqtrun.data.tokens import build
from fqtrun.errors import ConfigError
from fqtrun.runs.sample import run_sample
from fqtrun.runs.train import run_training

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def nanogpt_char_folder(folder: Path, text: str = TEXT) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What nanoGPT's data/shakespeare_char/prepare.py writes: uint16 ids, meta.pkl with vocab_size, itos, stoi."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    ids[:cut].tofile(folder / "train.bin")
    ids[cut:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return ids[:cut], ids[cut:], chars


def one_line(exc_info) -> str:
    msg = str(user_error(exc_info.value))
    assert "\n" not in msg, msg
    return msg


def test_a_nanogpt_char_folder_reads_back_its_ids_and_vocabulary(tmp_path):
    train, val, chars = nanogpt_char_folder(tmp_path / "shakespeare_char")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=gpt", "dataset=tokens", "model.block_size=16",
                                                      f"dataset.root={tmp_path / 'shakespeare_char'}"])
    b = instantiate(cfg.dataset)
    assert (b.num_classes, b.input_shape, b.dtype, b.meta, b.task) == (len(chars), (16,), "uint16", "meta.pkl",
                                                                      "language_model")
    assert isinstance(b.train.tokens, TokenFile) and np.array_equal(b.train.tokens[:], train)
    x, y = b.test.tensors  # consecutive windows from the start of val.bin
    assert x.dtype == torch.int64 and [int(x[0, 0])] + y.reshape(-1).tolist() == val[:1 + y.numel()].tolist()
    assert b.tokenizer.kind == "char" and b.tokenizer.symbols == "".join(chars)
    assert b.tokenizer.decode(train[:60].tolist()) == TEXT[:60]
    assert cfg.trainer.max_steps == 400 and cfg.lr.warmup_epochs == 0.0  # sized in steps (with_dataset/tokens)


def test_uint32_ids_when_the_vocabulary_needs_them(tmp_path):
    vocab = 70_000
    ids = (np.arange(3000, dtype=np.int64) * 7919 % vocab).astype("<u4")
    assert ids.max() > 65535
    ids[:2500].tofile(tmp_path / "train.bin")
    ids[2500:].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    b = build(str(tmp_path), block_size=32)
    assert (b.dtype, b.num_classes, b.tokenizer) == ("uint32", vocab, None)
    x, y = next(iter(make_loader(b.train, 4, shuffle=True, seed=0)))
    starts = [int(np.flatnonzero(ids[:2500] == int(x[i, 0]))[0]) for i in range(4)]  # ids are distinct
    for i, s in enumerate(starts):
        assert x[i].tolist() == ids[s:s + 32].tolist() and y[i].tolist() == ids[s + 1:s + 33].tolist()
    assert b.task_options() == {}  # no tokenizer: the bytes per id are unknown, so no bits per byte


def test_gpt2_token_files_without_meta_take_dataset_vocab_size(tmp_path):
    ids = np.arange(500, dtype=np.uint16) * 97 % 50257
    ids.tofile(tmp_path / "train.bin")
    ids.tofile(tmp_path / "val.bin")
    b = build(str(tmp_path), block_size=8, vocab_size=50304)  # nanoGPT's padded GPT-2 vocabulary
    assert (b.num_classes, b.meta, b.dtype) == (50304, "", "uint16")
    assert b.signature() == {"model.block_size": 8, "dataset.root (its vocabulary size)": 50304}


def test_windows_are_seeded_and_a_resume_skips_to_the_same_batches(tmp_path):
    nanogpt_char_folder(tmp_path)
    b = build(str(tmp_path), block_size=16)
    full = list(make_loader(b.train, 4, shuffle=True, seed=11))
    tail = list(make_loader(b.train, 4, shuffle=True, seed=11, skip_batches=3))
    assert len(full) == len(b.train) // 4 + (len(b.train) % 4 > 0) and len(tail) == len(full) - 3
    assert all(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]) for a, c in zip(full[3:], tail))
    other = next(iter(make_loader(b.train, 4, shuffle=True, seed=12)))
    assert not torch.equal(full[0][0], other[0])
    x, y = full[0]
    assert torch.equal(x[:, 1:], y[:, :-1])


# ---------------------------------------------------------------- meta.pkl: plain data only

@pytest.mark.parametrize("payload,needle", [
    ({"vocab_size": 65, "run": os.system}, f"it names {os.system.__module__}.system"),  # a function reference
    (collections.OrderedDict(vocab_size=65), "it names collections.OrderedDict"),  # a class instance
    ({"vocab_size": 65, "tags": {"a", "b"}}, "it holds a set"),  # built without naming a class, still refused
    ({"vocab_size": 65, "raw": b"\x00"}, "it holds a bytes"),
])
def test_a_meta_pkl_that_names_a_class_or_function_is_refused(tmp_path, payload, needle):
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(payload))  # pickling a reference stores its name; nothing runs
    with pytest.raises(DatasetError) as info:
        load_plain_pickle(path, "dataset.root")
    msg = one_line(info)
    assert needle in msg and "meta.pkl is refused" in msg and "meta.json" in msg, msg
    (tmp_path / "train.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match="meta.pkl is refused"):
        build(str(tmp_path), block_size=4)


def test_plain_meta_pkl_data_loads_with_every_pickle_protocol(tmp_path):
    loop: list = [1]
    loop.append(loop)  # a list nested in itself: plain, and must not hang the check
    data = {"vocab_size": 65, "itos": {0: "a"}, "t": (1, 2.5, None, True), "loop": loop}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "meta.pkl").write_bytes(pickle.dumps(data, protocol=protocol))
        got = load_plain_pickle(tmp_path / "meta.pkl", "dataset.root")
        assert got["itos"] == {0: "a"} and got["t"] == (1, 2.5, None, True) and got["loop"][1] is got["loop"]


# ---------------------------------------------------------------- bad input: one line each

def write(folder: Path, train=None, val=None, meta: dict | None = None, raw: dict | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train.bin", train), ("val.bin", val)):
        if ids is not None:
            np.asarray(ids, dtype=np.uint16).tofile(folder / name)
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    for name, data in (raw or {}).items():
        (folder / name).write_bytes(data)


OK = np.arange(200) % 10


@pytest.mark.parametrize("setup,kwargs,needles", [
    ({}, {"root": "{tmp}/nowhere"}, ["dataset.root={tmp}/nowhere is not a folder", "fqtrun prepare"]),
    ({"val": OK, "meta": {"vocab_size": 10}}, {}, ["dataset.root={tmp}/d has no train.bin",
                                                   "write one with `fqtrun prepare input="]),
    ({"train": OK, "meta": {"vocab_size": 10}}, {}, ["has no val.bin"]),
    ({"val": OK, "meta": {"vocab_size": 10}, "raw": {"train.bin": b"\x01\x00\x02"}}, {},
     ["train.bin has 3 bytes, not a whole number of uint16 ids (2 bytes each)"]),
    ({"train": OK, "val": [*OK[:50], 12], "meta": {"vocab_size": 10}}, {},
     ["val.bin holds token id 12 but the model's vocabulary has 10 ids (meta.json)", "dataset.vocab_size=13"]),
    ({"train": OK, "val": OK, "meta": {"vocab_size": 10}}, {"vocab_size": 8},
     ["dataset.vocab_size=8 is smaller than the vocabulary of dataset.root", "(meta.json: 10 ids)"]),
    ({"train": OK, "val": OK}, {}, ["has no meta.json or meta.pkl", "pass dataset.vocab_size=<n>"]),
    ({"train": OK, "val": OK, "raw": {"meta.json": b"{vocab"}}, {}, ["meta.json is not JSON"]),
    ({"train": OK, "val": OK, "meta": {"vocab": 10}}, {}, ["meta.json has no vocab_size"]),
    ({"train": OK, "val": OK, "meta": {"vocab_size": 10, "dtype": "uint32"}}, {},
     ["meta.json says dtype 'uint32' but a vocabulary of 10 ids is stored as uint16"]),
    ({"train": OK[:5], "val": OK, "meta": {"vocab_size": 10}}, {},
     ["train.bin has 5 ids, fewer than one window of block_size + 1 = 9"]),
    ({"train": OK, "val": OK, "meta": {"vocab_size": 10}, "raw": {"tokenizer.json": b"{}"}}, {},
     ["tokenizer.json does not load as a tokenizer.json"]),
    ({"train": OK, "val": OK, "meta": {"vocab_size": 10, "chars": "abcdefghijkl"}}, {},
     ["its tokenizer has 12 ids but the vocabulary is 10"]),
])
def test_bad_token_folders_are_one_line(tmp_path, setup, kwargs, needles):
    write(tmp_path / "d", **setup)
    kw = {"root": str(tmp_path / "d"), "block_size": 8, **kwargs}
    kw["root"] = kw["root"].format(tmp=tmp_path)
    with pytest.raises((DatasetError, ValueError)) as info:
        build(**kw)
    msg = one_line(info)
    assert all(n.format(tmp=tmp_path) in msg for n in needles), msg


def test_a_checkpoint_of_another_vocabulary_is_refused_and_sampling_needs_a_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    write(tmp_path / "a", rng.integers(0, 20, 400), rng.integers(0, 20, 100), {"vocab_size": 20})
    write(tmp_path / "b", rng.integers(0, 30, 400), rng.integers(0, 30, 100), {"vocab_size": 30})
    base = ["model=gpt", "dataset=tokens", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
            "model.block_size=8", "batch_size=4", "trainer.max_steps=2", "trainer.eval_every=2",
            "dataset.val_windows=4", "logger.wandb.mode=disabled", "logger.progress=none"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        first = compose(config_name="train", overrides=[*base, f"dataset.root={tmp_path / 'a'}"])
        other = compose(config_name="train", overrides=[*base, f"dataset.root={tmp_path / 'b'}", "resume=true"])
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    OmegaConf.save(first, tmp_path / "run" / ".hydra" / "config.yaml")  # as `fqtrun train` leaves it
    run_training(first, tmp_path / "run")
    with pytest.raises(Exception) as info:  # noqa: PT011 (user_error decides)
        run_training(other, tmp_path / "run")
    msg = one_line(info)
    assert "was trained with dataset.root (its vocabulary size) giving 20, this run gives 30" in msg, msg
    sample = OmegaConf.create({"checkpoint": str(tmp_path / "run"), "prompt": "x", "tokens": 3, "temperature": 1.0,
                               "top_k": None, "seed": 0, "device": "cpu", "threads": 0})
    with pytest.raises(ConfigError) as info:  # folder a has ids and a vocabulary size, no tokenizer
        run_sample(sample)
    assert "fqtrun sample needs the run's tokenizer" in one_line(info)


# ---------------------------------------------------------------- a corpus larger than what is read

RSS_PROBE = textwrap.dedent("""
    import json, sys
    from fqtrun.data import make_loader
    from fqtrun.data.tokens import build

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def last_batch(root, n):
        b = build(root, block_size=256, val_windows=64)
        for _, xy in zip(range(n), make_loader(b.train, 32, shuffle=True, seed=3)):
            pass
        return b, xy

    last_batch(sys.argv[2], 2)  # the same code on a small folder first: its libraries' pages are resident now
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # restart the peak (VmHWM) from here
    b, (x, y) = last_batch(sys.argv[1], 200)
    ok = bool(((x[:, 1:] - x[:, :-1]) % 50000 == 1).all() and (y[:, :-1] == x[:, 1:]).all())
    print(json.dumps({"base": base, "after": status("VmRSS"), "peak": status("VmHWM"), "ok": ok,
                      "tokens": b.train_tokens}))
""")


def test_a_token_file_is_read_window_by_window_not_loaded(tmp_path):
    """256 MB of ids: the resident memory the dataset adds (peak included) stays a small fraction of it."""
    n, vocab = 128 * 1024 * 1024, 50000
    ids = np.memmap(tmp_path / "train.bin", dtype=np.uint16, mode="w+", shape=(n,))
    block = 1 << 24
    for start in range(0, n, block):
        ids[start:start + block] = (np.arange(start, start + block, dtype=np.int64) % vocab).astype(np.uint16)
    ids.flush()
    del ids
    (np.arange(10_000) % vocab).astype(np.uint16).tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    small = tmp_path / "small"
    small.mkdir()
    for name in ("train.bin", "val.bin"):
        (np.arange(20_000) % vocab).astype(np.uint16).tofile(small / name)
    (small / "meta.json").write_text(json.dumps({"vocab_size": vocab}))
    size = (tmp_path / "train.bin").stat().st_size
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path), str(small)], capture_output=True,
                         text=True, check=True, timeout=120)
    r = json.loads(out.stdout)
    assert r["ok"] and r["tokens"] == n
    assert r["after"] - r["base"] < size / 16 and r["peak"] - r["base"] < size / 16, (r, size)
