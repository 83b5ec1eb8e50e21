"""Tokenizers of a language-model corpus: char, byte and byte-level BPE (the `tokenizers` library).

Each one gives `size` (the ids are 0..size-1), `encode(text) -> int64 tensor`, `decode(ids) -> str`,
`ids(text) -> (int64 array, symbols dropped)` for a whole split, and `token_bytes()`: the UTF-8 bytes
each id stands for, which turns a loss in nats per token into bits per byte (tasks/language_model.py)
so runs with different tokenizers compare. A BPE is trained on the training split only, with every
byte in its base alphabet (any text encodes, nothing is unknown), deterministically: the same text
and vocab_size give the same tokenizer.json, byte for byte. `pieces` cuts a long text where the
byte-level pre-tokenizer splits anyway, so encoding (or training on) the pieces equals doing it on
the whole text, in bounded memory and in parallel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from fqtrun.errors import ConfigError

KINDS = ("char", "byte", "bpe")  # dataset.tokenizer / prepare's tokenizer; anything else is a tokenizer.json path
PIECE_CHARS = 1 << 20  # pieces of about 1M characters


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

    def lookup(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """(token id of every character, mask of the characters in the vocabulary)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        if not self.symbols:
            return np.zeros(len(codes), dtype=np.int64), np.zeros(len(codes), dtype=bool)
        sorted_codes = self._codes[self._order]
        pos = np.minimum(np.searchsorted(sorted_codes, codes), len(sorted_codes) - 1)
        return self._order[pos].astype(np.int64), sorted_codes[pos] == codes

    def ids(self, text: str) -> tuple[np.ndarray, int]:
        """(ids of the characters in the vocabulary, how many characters were not and are dropped)."""
        ids, known = self.lookup(text)
        return ids[known], int((~known).sum())

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of text; ValueError naming the characters outside the vocabulary."""
        ids, known = self.lookup(text)
        if not known.all():
            missing = sorted({text[i] for i in np.flatnonzero(~known)})
            raise ValueError(f"characters {''.join(missing)!r} are not in the vocabulary")
        return torch.from_numpy(ids)

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.symbols], dtype=np.int64)

    def digest(self) -> str:
        return _digest(self.symbols)


class ByteTokenizer:
    """One token per UTF-8 byte (256 symbols); decoding replaces an incomplete character by U+FFFD."""

    kind = "byte"
    size = 256

    def ids(self, data: bytes) -> tuple[np.ndarray, int]:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64), 0

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(self.ids(text.encode("utf-8"))[0])

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def digest(self) -> str:
        return "byte"


class BpeTokenizer:
    """A `tokenizers` Tokenizer (trained here: byte-level BPE; or any tokenizer.json) and its JSON text."""

    kind = "bpe"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer

        self.json_text = json_text
        self.tokenizer = Tokenizer.from_str(json_text)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self.size = max(vocab.values(), default=-1) + 1
        self._vocab = vocab

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BpeTokenizer:
        """A byte-level BPE of at most vocab_size ids (256 bytes + merges) learnt from text."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(pieces(text), trainer=trainer)
        return cls(tok.to_str())

    def ids(self, text: str) -> tuple[np.ndarray, int]:
        parts = self.tokenizer.encode_batch(list(pieces(text)), add_special_tokens=False)
        if not parts:
            return np.zeros(0, dtype=np.int64), 0
        return np.concatenate([np.asarray(p.ids, dtype=np.int64) for p in parts]), 0

    def encode(self, text: str) -> torch.Tensor:
        return torch.from_numpy(self.ids(text)[0])

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray | None:
        """Bytes per id of a byte-level tokenizer (each alphabet character is one byte; an added token is
        its text); None for another kind (e.g. a normalizer rewrites the text), whose bytes are unknown."""
        from tokenizers import pre_tokenizers

        spec = json.loads(self.json_text)
        if (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer") is not None:
            return None
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = {t["content"] for t in spec.get("added_tokens", [])}
        out = np.zeros(self.size, dtype=np.int64)
        for token, i in self._vocab.items():
            if token in added or not set(token) <= alphabet:
                out[i] = len(token.encode("utf-8"))
            else:
                out[i] = len(token)
        return out

    def digest(self) -> str:
        return _digest(self.json_text)


Tokenizer = CharTokenizer | ByteTokenizer | BpeTokenizer


def _digest(text: str) -> str:
    """12 hex digits of SHA-256: a checkpoint's record of its exact vocabulary."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """text in pieces of about `size` characters, cut only after a newline between two letters or digits.

    The byte-level pre-tokenizer (GPT-2's pattern) always ends a word at such a newline and starts one
    after it, with or without the rest of the text, so the pieces tokenize exactly as the whole.
    """
    start = 0
    while len(text) - start > size:
        cut = start + size
        while cut < len(text) and not (text[cut - 1] == "\n" and text[cut].isalnum() and text[cut - 2].isalnum()):
            cut = text.find("\n", cut) + 1 or len(text)
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def load_tokenizer_json(path: str, setting: str) -> BpeTokenizer:
    """A tokenizer.json from a file; one-line ConfigError naming the setting when it does not load."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{setting}={path} is unknown: use {', '.join(KINDS)} or the path of a tokenizer.json "
                          "(no such file)")
    try:
        return BpeTokenizer(file.read_text(encoding="utf-8"))
    except Exception as e:  # the library raises its own Exception type for malformed JSON
        raise ConfigError(f"{setting}={path} does not load as a tokenizer.json ({why(e)}): pass a file written by "
                          f"the tokenizers library (Tokenizer.save), or {setting}=bpe to train one") from None


def why(e: BaseException) -> str:
    """An exception's message on one short line."""
    return " ".join(str(e).split())[:160] or type(e).__name__
