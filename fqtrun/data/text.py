"""UTF-8 text as next-token windows for a language model: the embedded CPython docs, a file, or a folder.

The corpus: dataset.root is a text file (any name: tiny-shakespeare's input.txt, enwik8) or a
folder whose *.txt files (searched recursively, sorted by path) are joined by newlines; root=null
is the English documentation text inside CPython's standard library (pydoc_data.topics, its
topics in sorted order joined by newlines: about 465,000 characters, no download, no file).
Tokens: `char` (one per character; the vocabulary is the sorted characters of the training split)
or `byte` (one per UTF-8 byte, 256 symbols, any file). The last val_fraction of the tokens is the
validation split. Training: an epoch is (n - 1) // block_size windows of block_size + 1 tokens,
window i starting at a random offset in [i * block_size, (i + 1) * block_size), a pure function of
the loader's epoch seed and i (data/loader.py, BatchDataset): every epoch covers the split about
once at new offsets, the same ones on a resume. Validation: consecutive non-overlapping
windows, at most val_windows of them (evenly spaced), the same in every evaluation.
A sample is (tokens t..t+T-1, tokens t+1..t+T): the model predicts every next token.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fqtrun.data.base import DataBundle, DatasetError
from fqtrun.data.loader import BatchDataset, sample_seed

EMBEDDED = f"embedded: pydoc_data.topics (Python {sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro})"
ROOT_HELP = "pass a UTF-8 text file or a folder of .txt files as dataset.root, or leave it unset for the embedded corpus"


class CharTokenizer:
    """One token per character; the vocabulary is a string of distinct characters (ids = positions)."""

    kind = "char"

    def __init__(self, symbols: str):
        self.symbols = symbols
        self._codes = np.frombuffer(symbols.encode("utf-32-le"), dtype=np.uint32)
        self._order = np.argsort(self._codes)

    @property
    def size(self) -> int:
        return len(self.symbols)

    def ids(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(token id of every character, mask of the characters in the vocabulary)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if not self.symbols:
            return np.zeros(len(codes), dtype=np.int64), np.zeros(len(codes), dtype=bool)
        sorted_codes = self._codes[self._order]
        pos = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)
        return self._order[pos].astype(np.int64), sorted_codes[pos] == codes

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of text; ValueError naming the characters outside the vocabulary."""
        ids, known = self.ids(text)
        if not known.all():
            missing = sorted({text[i] for i in np.flatnonzero(~known)})
            raise ValueError(f"characters {''.join(missing)!r} are not in the vocabulary")
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i)] for i in ids)


class ByteTokenizer:
    """One token per UTF-8 byte (256 symbols); decoding replaces an incomplete character by U+FFFD."""

    kind = "byte"
    size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


TOKENIZERS = ("char", "byte")


@dataclass
class TextBundle(DataBundle):
    """The windows of a tokenised corpus, its tokenizer and where it came from."""

    tokenizer: CharTokenizer | ByteTokenizer
    corpus: str  # the file or folder, or EMBEDDED
    train_tokens: int
    val_tokens: int
    val_dropped: int  # validation characters outside the training vocabulary (char tokenizer), dropped
    task = "language_model"

    @property
    def block_size(self) -> int:
        return self.input_shape[0]

    def signature(self) -> dict:
        out = {"dataset.tokenizer": self.tokenizer.kind, "model.block_size": self.block_size}
        if isinstance(self.tokenizer, CharTokenizer):
            out["dataset.root (its vocabulary)"] = self.tokenizer.symbols
        return out

    def facts(self) -> dict:
        return {"corpus": self.corpus, "tokenizer": self.tokenizer.kind, "vocab_size": self.tokenizer.size,
                "block_size": self.block_size, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
                "train_windows_per_epoch": len(self.train), "val_windows": len(self.test),
                "val_chars_dropped": self.val_dropped}


class RandomWindows(BatchDataset):
    """An epoch of training windows: window i starts at a random offset in [i T, (i + 1) T)
    (sample_seed(seed, i) mod T, the last one clipped to the split)."""

    def __init__(self, tokens: torch.Tensor, block_size: int):
        self.tokens, self.block_size = tokens, block_size
        self.last_start = len(tokens) - block_size - 1

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.block_size

    def batch(self, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(windows, their next tokens), each (len(indices), T)."""
        t = self.block_size
        starts = [min(i * t + sample_seed(seed, i) % t, self.last_start) for i in indices.tolist()]
        windows = torch.stack([self.tokens[s:s + t + 1] for s in starts])  # (B, T + 1)
        return windows[:, :-1], windows[:, 1:]


def fixed_windows(tokens: torch.Tensor, block_size: int, most: int) -> TensorDataset:
    """Consecutive non-overlapping windows (x, next tokens), at most `most`, evenly spaced."""
    n = (len(tokens) - 1) // block_size
    starts = torch.arange(n) * block_size
    if n > most:
        starts = starts[torch.linspace(0, n - 1, most).round().long()]
    offsets = starts[:, None] + torch.arange(block_size + 1)
    windows = tokens[offsets]  # (n, T + 1)
    return TensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())


def read_corpus(root: str | None) -> tuple[list[tuple[str, bytes]], str]:
    """([(name, bytes) of each file in order], where it came from); DatasetError when missing or empty."""
    if root is None:
        from pydoc_data.topics import topics

        return [("pydoc_data.topics", "\n".join(topics[k] for k in sorted(topics)).encode("utf-8"))], EMBEDDED
    path = Path(root).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DatasetError(f"dataset.root={root} is a folder without .txt files: {ROOT_HELP}")
    else:
        raise DatasetError(f"dataset.root={root} does not exist: {ROOT_HELP}")
    parts = [(str(f), f.read_bytes()) for f in files]
    if not any(data for _, data in parts):
        raise DatasetError(f"dataset.root={root} is empty: {ROOT_HELP}")
    return parts, str(path)


def decode_utf8(parts: list[tuple[str, bytes]], root: str | None) -> str:
    """The files' texts joined by newlines; DatasetError naming the file and offset that is not UTF-8."""
    texts = []
    for name, data in parts:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"dataset.root={root}: {name} is not UTF-8 text ({e.reason} at byte {e.start}), "
                               "which dataset.tokenizer=char needs: use dataset.tokenizer=byte, or convert the "
                               "file to UTF-8") from None
    return "\n".join(texts)


def tokenize(parts: list[tuple[str, bytes]], root: str | None, tokenizer: str,
             val_fraction: float) -> tuple[CharTokenizer | ByteTokenizer, torch.Tensor, torch.Tensor, int]:
    """(tokenizer, train tokens, validation tokens, validation characters dropped) of the corpus."""
    if tokenizer == "byte":
        data = b"\n".join(data for _, data in parts)
        tokens = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))
        cut = int(len(tokens) * (1 - val_fraction))
        return ByteTokenizer(), tokens[:cut], tokens[cut:], 0
    text = decode_utf8(parts, root)
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    tok = CharTokenizer("".join(sorted(set(train_text))))
    train_ids, _ = tok.ids(train_text)
    val_ids, known = tok.ids(val_text)
    return tok, torch.from_numpy(train_ids), torch.from_numpy(val_ids[known]), int((~known).sum())


def build(root: str | None = None, tokenizer: str = "char", block_size: int | None = None,
          val_fraction: float = 0.1, val_windows: int = 1000) -> TextBundle:
    """The corpus at root (None: embedded) as training and validation windows of block_size tokens."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"dataset.tokenizer={tokenizer!r} is unknown: use char (one token per character) or "
                         "byte (one per UTF-8 byte)")
    if block_size is None:
        raise ValueError("dataset=text needs a window length: use model=gpt (its model.block_size sets it), "
                         "or pass dataset.block_size")
    if block_size < 1:
        raise ValueError(f"the window of {block_size} tokens (model.block_size / dataset.block_size) must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"dataset.val_fraction={val_fraction} must be in (0, 1)")
    if val_windows < 1:
        raise ValueError(f"dataset.val_windows={val_windows} must be >= 1")
    parts, where = read_corpus(root)
    tok, train, val, dropped = tokenize(parts, root, tokenizer, val_fraction)
    for split, tokens in (("training split (first", train), ("validation split (last", val)):
        if len(tokens) < block_size + 1:
            share = f"{1 - val_fraction:.0%}" if split.startswith("training") else f"{val_fraction:.0%}"
            raise DatasetError(f"dataset.root={root if root is not None else 'null (embedded)'}: the {split} {share}) has {len(tokens)} tokens, fewer than one "
                               f"window of block_size + 1 = {block_size + 1}: use a longer corpus or a smaller "
                               "model.block_size")
    return TextBundle(train=RandomWindows(train, block_size), test=fixed_windows(val, block_size, val_windows),
                      num_classes=tok.size, input_shape=(block_size,), name="text", tokenizer=tok, corpus=where,
                      train_tokens=len(train), val_tokens=len(val), val_dropped=dropped)
