"""UTF-8 text as next-token windows for a language model: the embedded CPython docs, a file, or a folder.

The corpus: dataset.root is a text file (any name: tiny-shakespeare's input.txt, enwik8) or a
folder whose *.txt files (searched recursively, sorted by path) are joined by newlines; root=null
is the English documentation text inside CPython's standard library (pydoc_data.topics, its
topics in sorted order joined by newlines: about 465,000 characters, no download, no file).
Tokens (data/tokenizer.py): `char` (one per character; the vocabulary is the sorted characters of
the training split), `byte` (one per UTF-8 byte, 256 symbols, any file), `bpe` (a byte-level BPE of
dataset.vocab_size ids trained on the training split), or the path of a tokenizer.json. The last
val_fraction of the characters (bytes, for `byte`) is the validation split. Windows: data/lm.py.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fqtrun.data.base import DatasetError
from fqtrun.data.lm import LanguageBundle, RandomWindows, fixed_windows
from fqtrun.data.tokenizer import (
    KINDS,
    BpeTokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    load_tokenizer_json,
    pieces,
)
from fqtrun.errors import ConfigError

EMBEDDED = f"embedded: pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro})"
ROOT_HELP = "pass a UTF-8 text file or a folder of .txt files as {setting}, or leave it unset for the embedded corpus"
BPE_VOCAB = 1024  # dataset.vocab_size=null with tokenizer=bpe
CHUNK = 1 << 22  # characters (bytes) encoded at a time


@dataclass
class TextBundle(LanguageBundle):
    """The windows of a tokenised corpus, its tokenizer and where it came from."""

    tokenizer: Tokenizer
    setting: str  # dataset.tokenizer as given: char, byte, bpe or a tokenizer.json path
    vocab_size: int | None  # the BPE size asked for (bpe only)
    corpus: str  # the file or folder, or EMBEDDED
    train_tokens: int
    val_tokens: int
    val_dropped: int  # validation characters outside the training vocabulary (char tokenizer), dropped

    def signature(self) -> dict:
        out = {"dataset.tokenizer": self.setting, "model.block_size": self.block_size}
        if isinstance(self.tokenizer, CharTokenizer):
            out["dataset.root (its vocabulary)"] = self.tokenizer.symbols
        if self.vocab_size is not None:
            out["dataset.vocab_size"] = self.vocab_size
        if isinstance(self.tokenizer, BpeTokenizer):
            out["dataset.tokenizer (its tokenizer.json)"] = self.tokenizer.digest()
        return out

    def tokenizer_json(self) -> str | None:
        return self.tokenizer.json_text if isinstance(self.tokenizer, BpeTokenizer) else None

    def facts(self) -> dict:
        return {"corpus": self.corpus, "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.size,
                "block_size": self.block_size, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
                "train_windows_per_epoch": len(self.train), "val_windows": len(self.test),
                "val_chars_dropped": self.val_dropped}


def read_corpus(root: str | None, setting: str = "dataset.root") -> tuple[list[tuple[str, bytes]], str]:
    """([(name, bytes) of each file in order], where it came from); DatasetError when missing or empty."""
    if root is None:
        from pydoc_data.topics import topics

        return [("pydoc_data.topics", "\n".join(topics[k] for k in sorted(topics)).encode("utf-8"))], EMBEDDED
    path, fix = Path(root).expanduser(), ROOT_HELP.format(setting=setting)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DatasetError(f"{setting}={root} is a folder without .txt files: {fix}")
    else:
        raise DatasetError(f"{setting}={root} does not exist: {fix}")
    parts = [(str(f), f.read_bytes()) for f in files]
    if not any(data for _, data in parts):
        raise DatasetError(f"{setting}={root} is empty: {fix}")
    return parts, str(path)


def decode_utf8(parts: list[tuple[str, bytes]], root: str | None, kind: str, setting: str = "dataset.root",
                tokenizer_setting: str = "dataset.tokenizer") -> str:
    """The files' texts joined by newlines; DatasetError naming the file and offset that is not UTF-8."""
    texts = []
    for name, data in parts:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{setting}={root}: {name} is not UTF-8 text ({e.reason} at byte {e.start}), "
                               f"which {tokenizer_setting}={kind} needs: use {tokenizer_setting}=byte, or convert "
                               "the file to UTF-8") from None
    return "\n".join(texts)


def split_corpus(parts: list[tuple[str, bytes]], root: str | None, kind: str, val_fraction: float,
                 setting: str = "dataset.root", tokenizer_setting: str = "dataset.tokenizer"):
    """(training part, validation part): bytes for the byte tokenizer, text for the others."""
    data = b"\n".join(d for _, d in parts) if kind == "byte" else decode_utf8(parts, root, kind, setting,
                                                                                tokenizer_setting)
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def check_vocab_size(kind: str, vocab_size: int | None, setting: str = "dataset.vocab_size",
                     tokenizer_setting: str = "dataset.tokenizer") -> int | None:
    """The BPE size (BPE_VOCAB when unset); a vocab_size set for another tokenizer would do nothing: refused."""
    if kind != "bpe":
        if vocab_size is not None:
            raise ConfigError(f"{setting}={vocab_size} sizes a trained BPE only ({tokenizer_setting}=bpe): "
                              f"{tokenizer_setting}={kind} has its own vocabulary; drop {setting}")
        return None
    size = BPE_VOCAB if vocab_size is None else int(vocab_size)
    if size < 256:
        raise ConfigError(f"{setting}={size} must be >= 256: the byte-level BPE starts from all 256 bytes")
    return size


def make_tokenizer(kind: str, train, vocab_size: int | None, saved: str | None,
                   setting: str = "dataset.tokenizer") -> Tokenizer:
    """The tokenizer of the training part: built from it (char, bpe), fixed (byte), saved, or loaded."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer("".join(sorted(set(train))))
    if saved is not None:  # a checkpoint's copy: never trained again
        return BpeTokenizer(saved)
    if kind == "bpe":
        return BpeTokenizer.train(train, vocab_size)
    return load_tokenizer_json(kind, setting)


def encode_chunks(tok: Tokenizer, data) -> Iterator[tuple[np.ndarray, int, int]]:
    """(ids, symbols dropped, characters or bytes consumed) of data, about CHUNK characters at a time."""
    chunks = (data[i:i + CHUNK] for i in range(0, len(data), CHUNK)) if isinstance(data, bytes) else \
        pieces(data, CHUNK)
    for chunk in chunks:
        ids, dropped = tok.ids(chunk)
        yield ids, dropped, len(chunk)


def encode(tok: Tokenizer, data) -> tuple[np.ndarray, int]:
    """(int64 ids of all of data, symbols dropped)."""
    parts = list(encode_chunks(tok, data))
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    return ids, sum(p[1] for p in parts)


def build(root: str | None = None, tokenizer: str = "char", block_size: int | None = None,
          val_fraction: float = 0.1, val_windows: int = 1000, vocab_size: int | None = None,
          saved_tokenizer: str | None = None) -> TextBundle:
    """The corpus at root (None: embedded) as training and validation windows of block_size tokens.

    saved_tokenizer: a run's tokenizer.json (data/base.build_bundle), used instead of training one.
    """
    if tokenizer not in KINDS and not Path(tokenizer).expanduser().is_file():
        load_tokenizer_json(tokenizer, "dataset.tokenizer")  # the one-line error of a bad value
    if block_size is None:
        raise ValueError("dataset=text needs a window length: use model=llama or model=gpt (its model.block_size sets it), "
                         "or pass dataset.block_size")
    if block_size < 1:
        raise ValueError(f"the window of {block_size} tokens (model.block_size / dataset.block_size) must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction={val_fraction} must be in (0, 1)")
    if val_windows < 1:
        raise ValueError(f"dataset.val_windows={val_windows} must be >= 1")
    size = check_vocab_size(tokenizer, vocab_size)
    parts, where = read_corpus(root)
    train_part, val_part = split_corpus(parts, root, tokenizer, val_fraction)
    tok = make_tokenizer(tokenizer, train_part, size, saved_tokenizer if tokenizer not in ("char", "byte") else None)
    train, _ = encode(tok, train_part)
    val, dropped = encode(tok, val_part)
    for split, tokens in (("training split (first", train), ("validation split (last", val)):
        if len(tokens) < block_size + 1:
            share = f"{1 - val_fraction:.0%}" if split.startswith("training") else f"{val_fraction:.0%}"
            raise DatasetError(f"dataset.root={root if root is not None else 'null (embedded)'}: the {split} "
                               f"{share}) has {len(tokens)} tokens, fewer than one window of block_size + 1 = "
                               f"{block_size + 1}: use a longer corpus or a smaller model.block_size")
    return TextBundle(train=RandomWindows(train, block_size), test=fixed_windows(val, block_size, val_windows),
                      num_classes=tok.size, input_shape=(block_size,), name="text", tokenizer=tok,
                      setting=tokenizer, vocab_size=size, corpus=where, train_tokens=len(train),
                      val_tokens=len(val), val_dropped=dropped)
