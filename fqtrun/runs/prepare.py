"""Token files from text (`fqtrun prepare`): what dataset=tokens reads, in nanoGPT's format.

The corpus, its split and its tokens are dataset=text's (data/text.py: the same files in the same
order, the same cut, the same tokenizer), so `dataset=tokens` on the folder trains on the ids that
`dataset=text` would build in memory. Writes train.bin and val.bin (uint16 ids, uint32 past 65536),
meta.json and, for a BPE or a given tokenizer.json, tokenizer.json; each file appears whole or not at
all (temp file + rename). The text is held in memory; its ids are written a chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from fqtrun.data.text import check_vocab_size, encode_chunks, make_tokenizer, read_corpus, split_corpus
from fqtrun.data.token_files import SPLITS, dtype_for, write_meta
from fqtrun.data.tokenizer import KINDS, load_tokenizer_json
from fqtrun.errors import ConfigError
from fqtrun.files import atomic_open
from fqtrun.training.loggers import make_console


@dataclass
class PrepareConfig:
    input: Optional[str] = None  # a UTF-8 text file or a folder of .txt files (sorted); null: the embedded corpus
    out: str = "???"  # the folder to write train.bin, val.bin, meta.json (and tokenizer.json) into
    tokenizer: str = "bpe"  # char | byte | bpe (trained on the training split) | the path of a tokenizer.json
    vocab_size: Optional[int] = None  # tokenizer=bpe only: its size, 256 bytes + merges (null: 1024)
    val_fraction: float = 0.1  # the last 10% of the characters (bytes for byte) is val.bin
    overwrite: bool = False  # replace the token files of an earlier prepare in `out`
    progress: str = "auto"  # auto (a bar on a terminal) | rich | none


def check(cfg) -> Optional[int]:
    """The settings, one line each; the BPE size (None for the other tokenizers)."""
    if cfg.progress not in ("auto", "rich", "none"):
        raise ConfigError(f"progress={cfg.progress!r} is unknown: use auto, rich or none")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction={cfg.val_fraction} must be in (0, 1)")
    if cfg.tokenizer not in KINDS:
        load_tokenizer_json(cfg.tokenizer, "tokenizer")  # one line when it does not load
    out = Path(cfg.out).expanduser()
    taken = [name for name in (*SPLITS, "meta.json", "tokenizer.json") if (out / name).exists()]
    if taken and not cfg.overwrite:
        raise ConfigError(f"out={cfg.out} already holds {', '.join(taken)}: pass overwrite=true to replace them, "
                          "or another out")
    return check_vocab_size(cfg.tokenizer, cfg.vocab_size, "vocab_size", "tokenizer")


def run_prepare(cfg) -> dict:
    """Tokenise cfg.input into cfg.out; returns what meta.json records."""
    size = check(cfg)
    parts, where = read_corpus(cfg.input, "input")
    train, val = split_corpus(parts, cfg.input, cfg.tokenizer, cfg.val_fraction, "input", "tokenizer")
    for name, data in zip(SPLITS, (train, val)):
        if not data:
            raise ConfigError(f"input={cfg.input}: {name} would be empty: use a longer text or another "
                              f"val_fraction (now {cfg.val_fraction})")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    console = make_console()
    rich = cfg.progress == "rich" or (cfg.progress == "auto" and console.is_terminal)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, disable=not rich) as bar:
        fit = bar.add_task(f"{cfg.tokenizer} tokenizer", total=1)
        tok = make_tokenizer(cfg.tokenizer, train, size, None, "tokenizer")
        bar.update(fit, completed=1)
        encoding = bar.add_task("encoding", total=len(train) + len(val))
        dtype = dtype_for(tok.size)
        counts = [write_ids(out / name, tok, data, dtype, lambda n: bar.advance(encoding, n))
                  for name, data in zip(SPLITS, (train, val))]
    meta = write_meta(out, tok, tok.size, {"train_tokens": counts[0][0], "val_tokens": counts[1][0],
                                           "val_chars_dropped": counts[1][1], "source": where})
    for name in (*SPLITS, "meta.json", "tokenizer.json"):  # data to share: readable, not a temp file's 0600
        if (out / name).is_file():
            (out / name).chmod(0o644)
    return {"out": str(out), **{k: v for k, v in meta.items() if k != "chars"}}


def write_ids(path: Path, tok, data, dtype: np.dtype, advance: Callable[[int], None]) -> tuple[int, int]:
    """Write the ids of data to path (atomically); (ids written, symbols dropped)."""
    written = dropped = 0
    with atomic_open(path) as f:
        for ids, lost, consumed in encode_chunks(tok, data):
            f.write(ids.astype(dtype).tobytes())
            written, dropped = written + len(ids), dropped + lost
            advance(consumed)
    return written, dropped
