"""dataset=tokens: a folder of nanoGPT token files (data/token_files.py) as next-token windows.

train.bin and val.bin are read window by window as the windows are drawn (token_files.TokenFile,
data/lm.py), so a corpus larger than RAM trains without being loaded. The model's vocabulary is dataset.vocab_size,
or the folder's (meta.json / meta.pkl); every id in the files must be below it, which is checked
once by reading each file through in blocks (plain reads: nothing stays resident).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fqtrun.data.base import DatasetError
from fqtrun.data.lm import LanguageBundle, RandomWindows, fixed_windows
from fqtrun.data.token_files import (
    PREPARE,
    SPLITS,
    dtype_for,
    largest_id,
    meta_tokenizer,
    open_ids,
    read_meta,
)

SETTING = "dataset.root"


@dataclass
class TokensBundle(LanguageBundle):
    """The windows of a token-file folder, its vocabulary and tokenizer (None when the folder has none)."""

    root: str
    meta: str  # the file the vocabulary came from (meta.json, meta.pkl) or "" (dataset.vocab_size)
    dtype: str
    train_tokens: int
    val_tokens: int

    def signature(self) -> dict:
        out = {"model.block_size": self.block_size, "dataset.root (its vocabulary size)": self.num_classes}
        if self.tokenizer is not None:
            out["dataset.root (its tokenizer)"] = self.tokenizer.digest()
        return out

    def facts(self) -> dict:
        return {"corpus": self.root, "tokenizer": self.tokenizer.kind if self.tokenizer else None,
                "vocab_size": self.num_classes, "vocabulary_from": self.meta or "dataset.vocab_size",
                "dtype": self.dtype, "block_size": self.block_size, "train_tokens": self.train_tokens,
                "val_tokens": self.val_tokens, "train_windows_per_epoch": len(self.train),
                "val_windows": len(self.test)}


def model_vocabulary(root: Path, meta: dict, source: str, vocab_size: int | None) -> tuple[int, np.dtype]:
    """(the model's vocabulary, the files' id type) from dataset.vocab_size and the folder's meta."""
    theirs = meta.get("vocab_size")
    if theirs is None and vocab_size is None:
        raise DatasetError(f"{SETTING}={root} has no meta.json or meta.pkl giving its vocabulary size: pass "
                           "dataset.vocab_size=<n> (e.g. 50304 for nanoGPT's GPT-2 token files), or write meta.json "
                           '{"vocab_size": <n>}')
    if vocab_size is not None and vocab_size < 1:
        raise DatasetError(f"dataset.vocab_size={vocab_size} must be >= 1")
    if theirs is not None and vocab_size is not None and vocab_size < theirs:
        raise DatasetError(f"dataset.vocab_size={vocab_size} is smaller than the vocabulary of {SETTING}={root} "
                           f"({source}: {theirs} ids): the model could not embed every id; raise dataset.vocab_size "
                           "or leave it unset")
    dtype = dtype_for(theirs if theirs is not None else vocab_size)
    if "dtype" in meta and meta["dtype"] != dtype.name:
        raise DatasetError(f"{SETTING}={root}: {source} says dtype {meta['dtype']!r} but a vocabulary of {theirs} ids "
                           f"is stored as {dtype.name}: fix {source}")
    return (vocab_size if vocab_size is not None else theirs), dtype


def build(root: str, block_size: int | None = None, vocab_size: int | None = None,
          val_windows: int = 1000) -> TokensBundle:
    """The token files in root as training windows (drawn at random offsets) and fixed validation windows."""
    if block_size is None:
        raise ValueError("dataset=tokens needs a window length: use a language model (its model.block_size sets "
                         "it), or pass dataset.block_size")
    if block_size < 1:
        raise ValueError(f"the window of {block_size} tokens (model.block_size / dataset.block_size) must be >= 1")
    if val_windows < 1:
        raise ValueError(f"dataset.val_windows={val_windows} must be >= 1")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{SETTING}={root} is not a folder: pass the folder holding train.bin and val.bin, or "
                           f"{PREPARE}")
    meta, source = read_meta(folder, SETTING)
    vocab, dtype = model_vocabulary(folder, meta, source, vocab_size)
    tokenizer = meta_tokenizer(folder, meta, SETTING)
    if tokenizer is not None and tokenizer.size > vocab:
        raise DatasetError(f"{SETTING}={root}: its tokenizer has {tokenizer.size} ids but the vocabulary is {vocab} "
                           f"({source or 'dataset.vocab_size'}): raise dataset.vocab_size, or fix {source}")
    splits = [open_ids(folder / name, dtype, SETTING) for name in SPLITS]
    for name, ids in zip(SPLITS, splits):
        if len(ids) < block_size + 1:
            raise DatasetError(f"{SETTING}={root}: {name} has {len(ids)} ids, fewer than one window of block_size + 1 "
                               f"= {block_size + 1}: use more data or a smaller model.block_size")
        top = largest_id(folder / name, dtype)
        if top >= vocab:
            raise DatasetError(f"{SETTING}={root}: {name} holds token id {top} but the model's vocabulary has {vocab} "
                               f"ids ({source or 'dataset.vocab_size'}): pass dataset.vocab_size={top + 1} or more, "
                               "or fix the files")
    train, val = splits
    return TokensBundle(train=RandomWindows(train, block_size), test=fixed_windows(val, block_size, val_windows),
                        num_classes=vocab, input_shape=(block_size,), name="tokens", tokenizer=tokenizer,
                        root=str(folder), meta=source, dtype=dtype.name, train_tokens=len(train),
                        val_tokens=len(val))
