"""nanoGPT's token-file format: a folder with train.bin and val.bin (flat token ids) and the vocabulary.

The ids are little-endian uint16, or uint32 when the vocabulary has more than 65536 ids. The
vocabulary comes from meta.json (fqtrun's: {"vocab_size", "dtype", "tokenizer", and "chars" for
char data}) or nanoGPT's meta.pkl ({"vocab_size", and "itos"/"stoi" for char data}); a
tokenizer.json beside them is the tokenizer the ids came from. A meta.pkl is data from elsewhere:
it is read by an unpickler that can build dicts, lists, tuples, strings, numbers, bools and None
and nothing else (no class, no function: find_class refuses every name), so a file that tries
more is refused and nothing in it runs. Ids are read on demand (TokenFile): only what is used is read.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np

from fqtrun.data.base import DatasetError
from fqtrun.data.tokenizer import BpeTokenizer, ByteTokenizer, CharTokenizer, Tokenizer, why
from fqtrun.files import atomic_open

SPLITS = ("train.bin", "val.bin")
PREPARE = "write one with `fqtrun prepare input=<text file or folder> out=<folder>` (or nanoGPT's prepare.py)"
PLAIN = (dict, list, tuple, str, int, float, bool, type(None))
SCAN = 1 << 20  # ids read at a time when scanning a file for its largest id


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32; little-endian, as nanoGPT writes."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


class _DataOnly(pickle.Unpickler):
    """An unpickler for plain data: every class or function a pickle names is refused (before it is imported)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def load_plain_pickle(path: Path, setting: str) -> object:
    """A pickle of plain data (PLAIN types only); DatasetError in one line for anything else."""
    def refuse(why: str) -> DatasetError:
        return DatasetError(f"{setting}={path.parent}: {path.name} is refused, {why}: fqtrun reads it as plain data "
                            "only (dicts, lists, strings, numbers); write the vocabulary as meta.json "
                            '{"vocab_size": <n>} instead')

    try:
        value = _DataOnly(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise refuse(" ".join(str(e).split())[:120]) from None
    except Exception as e:  # truncated or not a pickle: EOFError, ValueError, ...
        raise refuse(f"it does not load ({type(e).__name__})") from None
    stack, seen = [value], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:  # a pickle may nest a list in itself
            continue
        seen.add(id(item))
        if type(item) not in PLAIN:
            raise refuse(f"it holds a {type(item).__name__}")
        stack.extend(item.keys() if isinstance(item, dict) else ())
        stack.extend(item.values() if isinstance(item, dict) else item if isinstance(item, list | tuple) else ())
    return value


def read_meta(root: Path, setting: str) -> tuple[dict, str]:
    """(the vocabulary record, the file it came from): meta.json, else meta.pkl, else ({}, "")."""
    for name in ("meta.json", "meta.pkl"):
        path = root / name
        if not path.is_file():
            continue
        if name == "meta.json":
            try:
                meta = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise DatasetError(f"{setting}={root}: meta.json is not JSON ({' '.join(str(e).split())[:100]}): "
                                   "fix it, or delete it and pass dataset.vocab_size") from None
        else:
            meta = load_plain_pickle(path, setting)
        if not isinstance(meta, dict) or not _positive_int(meta.get("vocab_size")):
            raise DatasetError(f"{setting}={root}: {name} has no vocab_size (a positive integer): add it, "
                               "or delete the file and pass dataset.vocab_size")
        return meta, name
    return {}, ""


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def meta_tokenizer(root: Path, meta: dict, setting: str) -> Tokenizer | None:
    """The tokenizer the ids came from: tokenizer.json, a char vocabulary (chars / nanoGPT's itos), byte; or None."""
    if (root / "tokenizer.json").is_file():
        try:
            return BpeTokenizer((root / "tokenizer.json").read_text(encoding="utf-8"))
        except Exception as e:  # the library raises its own Exception type for malformed JSON
            raise DatasetError(f"{setting}={root}: tokenizer.json does not load as a tokenizer.json ({why(e)}): "
                               "write the folder again with `fqtrun prepare`, or delete tokenizer.json (the ids "
                               "then have no tokenizer)") from None
    if meta.get("tokenizer") == "byte":
        return ByteTokenizer()
    chars = meta.get("chars")
    itos = meta.get("itos")
    if chars is None and isinstance(itos, dict) and sorted(itos) == list(range(len(itos))):
        chars = [itos[i] for i in range(len(itos))]
    if isinstance(chars, str | list) and all(isinstance(c, str) and len(c) == 1 for c in chars) \
            and len(set(chars)) == len(chars):
        return CharTokenizer("".join(chars))
    return None


class TokenFile:
    """The ids of a .bin file, read on demand: `ids[a:b]` is one positional read (os.pread) of those ids.

    Nothing is mapped or loaded, so resident memory does not grow with the file or with the windows read.
    (A memory map would map each touched page's whole page-cache folio, up to 2 MB on current kernels, and
    its resident size would approach the file's over an epoch of random windows.)
    """

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = path, dtype
        self.length = path.stat().st_size // dtype.itemsize
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise IndexError("a TokenFile reads contiguous slices only")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        want = max(0, stop - start) * self.dtype.itemsize
        data = os.pread(self._fd, want, start * self.dtype.itemsize)
        if len(data) != want:
            raise DatasetError(f"{self.path} became shorter while it was read: it was rewritten; start the run again")
        return np.frombuffer(data, dtype=self.dtype)

    def __getstate__(self) -> dict:  # a copy in another process opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def open_ids(path: Path, dtype: np.dtype, setting: str) -> TokenFile:
    """The ids of a .bin file, read on demand; DatasetError when missing or not a whole number of ids."""
    if not path.is_file():
        raise DatasetError(f"{setting}={path.parent} has no {path.name}: {PREPARE}")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise DatasetError(f"{setting}={path.parent}: {path.name} has {size} bytes, not a whole number of "
                           f"{dtype.name} ids ({dtype.itemsize} bytes each): the file is truncated or written with "
                           "another id type; write it again")
    return TokenFile(path, dtype)


def largest_id(path: Path, dtype: np.dtype) -> int:
    """The largest id in a .bin file, read in blocks with plain reads (no mapping, so little stays resident)."""
    top, buf = -1, np.empty(SCAN, dtype=dtype)
    with open(path, "rb") as f:  # buffered: readinto fills the block unless at the end
        while n := f.readinto(memoryview(buf).cast("B")):
            top = max(top, int(buf[:n // dtype.itemsize].max()))
    return top


def write_meta(out: Path, tokenizer: Tokenizer, vocab_size: int, counts: dict) -> dict:
    """meta.json for token files written by `fqtrun prepare` (and tokenizer.json beside it for a BPE)."""
    meta = {"vocab_size": vocab_size, "dtype": dtype_for(vocab_size).name, "tokenizer": tokenizer.kind, **counts}
    if isinstance(tokenizer, CharTokenizer):
        meta["chars"] = tokenizer.symbols
    if isinstance(tokenizer, BpeTokenizer):
        with atomic_open(out / "tokenizer.json", "w", encoding="utf-8") as f:
            f.write(tokenizer.json_text)
    else:  # an earlier prepare's would be read as this folder's tokenizer
        (out / "tokenizer.json").unlink(missing_ok=True)
    with atomic_open(out / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)
    return meta
