"""dataset.tokenizer=bpe: a deterministic byte-level BPE trained on the training split only, kept with the run
(its folder and checkpoints) and reused, never retrained; a tokenizer.json path; bits per byte for every
tokenizer, against a hand computation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from conftest import CONF
from fqtrun.commands.common import user_error
from fqtrun.data.text import build
from fqtrun.data.tokenizer import BpeTokenizer, ByteTokenizer, CharTokenizer, pieces
from fqtrun.runs.sample import load_sampler
from fqtrun.runs.train import run_training
from fqtrun.tasks import LanguageModel

# a corpus with every kind of whitespace run, digits, punctuation and multi-byte characters
TEXT = "".join(f"Line {i}: the café's naïve déjà-vu → {i * 7 % 13}  costs\t{i}€.\n" + ("\n \n" if i % 5 == 0 else "")
               + ("  indented\n" if i % 3 == 0 else "") for i in range(120))
TINY = ["model=gpt", "dataset=text", "dataset.tokenizer=bpe", "dataset.vocab_size=300", "model.n_layer=1",
        "model.n_head=2", "model.n_embd=32", "model.block_size=16", "batch_size=8", "eval_batch_size=64",
        "trainer.max_steps=3", "trainer.eval_every=3", "dataset.val_windows=8", "logger.wandb.mode=disabled",
        "logger.progress=none"]


def test_training_is_deterministic_byte_for_byte_across_processes():
    here = BpeTokenizer.train(TEXT, 320).json_text
    assert BpeTokenizer.train(TEXT, 320).json_text == here
    code = ("import hashlib, sys; from fqtrun.data.tokenizer import BpeTokenizer; "
            "print(hashlib.sha256(BpeTokenizer.train(sys.stdin.read(), 320).json_text.encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TOKENIZERS_PARALLELISM": "false"}  # another hash seed, 1 thread
    other = subprocess.run([sys.executable, "-c", code], input=TEXT, capture_output=True, text=True, check=True,
                           env=env, encoding="utf-8")
    assert other.stdout.strip() == hashlib.sha256(here.encode()).hexdigest()
    assert BpeTokenizer.train(TEXT, 330).json_text != here  # the digest sees a change


def test_bpe_round_trips_any_text_and_its_token_bytes_add_up_to_the_utf8_length():
    tok = BpeTokenizer.train(TEXT, 320)
    assert tok.size == 320 and tok.kind == "bpe"
    unseen = "日本語 and emoji 🙂 and \x00 control"  # bytes the training text never had still encode
    for text in (TEXT, unseen):
        ids = tok.encode(text)
        assert ids.dtype == torch.int64 and tok.decode(ids.tolist()) == text
        assert int(tok.token_bytes()[ids.numpy()].sum()) == len(text.encode("utf-8"))
    assert len(tok.encode(TEXT)) < len(TEXT.encode("utf-8")) / 2  # merges do compress the training text


@pytest.mark.parametrize("size", [3, 40, 500])
def test_pieces_tokenize_exactly_as_the_whole_text(size):
    parts = list(pieces(TEXT, size))
    assert "".join(parts) == TEXT and (len(parts) > 5 or size == 500)
    tok = BpeTokenizer.train(TEXT, 300)
    whole = tok.tokenizer.encode(TEXT, add_special_tokens=False).ids  # the library on the whole text
    assert np.concatenate([tok.ids(p)[0] for p in parts]).tolist() == whole


def test_the_bpe_learns_from_the_training_split_only(tmp_path):
    train_part = "alpha beta gamma delta\n" * 90
    path = tmp_path / "c.txt"
    path.write_text(train_part + "zyzzyva quokka\n" * 11)  # z and q only in the last 10%
    cut = int(len(path.read_text()) * 0.9)
    b = build(str(path), "bpe", block_size=8, vocab_size=280)
    assert b.tokenizer.json_text == BpeTokenizer.train(path.read_text()[:cut], 280).json_text
    merges = json.loads(b.tokenizer.json_text)["model"]["merges"]
    assert merges and not any("z" in "".join(m) or "q" in "".join(m) for m in merges)
    assert b.tokenizer.decode(b.test.tensors[0][0].tolist()) in path.read_text()[cut:]
    assert b.signature()["dataset.vocab_size"] == 280 and b.facts()["tokenizer"] == "bpe"


def test_a_saved_tokenizer_is_used_as_it_is_never_retrained(tmp_path, monkeypatch):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    saved = BpeTokenizer.train("something else entirely\n" * 40, 270).json_text

    def no_training(*args, **kwargs):
        raise AssertionError("trained a BPE although the run has one")

    monkeypatch.setattr(BpeTokenizer, "train", no_training)
    b = build(str(path), "bpe", block_size=8, vocab_size=300, saved_tokenizer=saved)
    assert b.tokenizer.json_text == saved and b.num_classes == 270
    for kind, cls in (("char", CharTokenizer), ("byte", ByteTokenizer)):  # a char/byte run has nothing saved
        assert isinstance(build(str(path), kind, block_size=8, saved_tokenizer=saved).tokenizer, cls)


def test_a_tokenizer_json_path_loads_it(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    tok = BpeTokenizer.train(TEXT, 290)
    (tmp_path / "tokenizer.json").write_text(tok.json_text)
    b = build(str(path), str(tmp_path / "tokenizer.json"), block_size=8)
    assert b.tokenizer.json_text == tok.json_text and b.num_classes == 290
    assert b.signature()["dataset.tokenizer"] == str(tmp_path / "tokenizer.json")
    assert "dataset.vocab_size" not in b.signature()


@pytest.mark.parametrize("kwargs,needles", [
    ({"tokenizer": "{tmp}/bad.json"}, ["dataset.tokenizer={tmp}/bad.json does not load as a tokenizer.json",
                                       "or dataset.tokenizer=bpe to train one"]),
    ({"tokenizer": "{tmp}/missing.json"}, ["dataset.tokenizer={tmp}/missing.json is unknown", "(no such file)"]),
    ({"tokenizer": "bpe", "vocab_size": 100}, ["dataset.vocab_size=100 must be >= 256"]),
    ({"tokenizer": "char", "vocab_size": 500}, ["dataset.vocab_size=500 sizes a trained BPE only",
                                                "drop dataset.vocab_size"]),
])
def test_bad_tokenizer_settings_are_one_line(tmp_path, kwargs, needles):
    (tmp_path / "bad.json").write_text('{"version": "1.0", "model": 3}')
    (tmp_path / "c.txt").write_text(TEXT)
    kwargs = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError) as info:
        build(str(tmp_path / "c.txt"), block_size=8, **kwargs)
    msg = str(user_error(info.value))
    assert "\n" not in msg and all(n.format(tmp=tmp_path) in msg for n in needles), msg


# ---------------------------------------------------------------- bits per byte

class FixedLogits(nn.Module):
    """The stored logits of window i, for x whose every position holds i."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0]]


def test_bits_per_byte_is_total_nats_over_ln2_times_the_bytes_of_the_predicted_text():
    symbols = "aé✓🙂"  # 1, 2, 3 and 4 UTF-8 bytes
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, len(symbols), generator=gen, dtype=torch.float64)  # 3 windows of 4 tokens
    target = torch.randint(0, len(symbols), (3, 4), generator=gen)
    nats = bytes_ = 0.0
    for w in range(3):
        for t in range(4):
            row = logits[w, t].tolist()
            nats += math.log(sum(math.exp(v) for v in row)) - row[int(target[w, t])]
            bytes_ += len(symbols[int(target[w, t])].encode("utf-8"))
    task = LanguageModel(token_bytes=torch.from_numpy(CharTokenizer(symbols).token_bytes()))
    windows = torch.arange(3)[:, None].expand(3, 4)
    got = task.evaluate(FixedLogits(logits), TensorDataset(windows, target), batch_size=2, device=torch.device("cpu"))
    assert got["bpb"] == pytest.approx(nats / (math.log(2) * bytes_), rel=1e-9)
    assert got["bpc"] == pytest.approx(nats / (12 * math.log(2)), rel=1e-9)  # bits per token, as before
    assert "bpb" not in LanguageModel().evaluate(FixedLogits(logits), TensorDataset(windows, target), 2,
                                                 torch.device("cpu"))


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_every_tokenizer_gives_its_bytes_per_token(tmp_path, kind):
    path = tmp_path / "c.txt"
    path.write_text(TEXT)
    b = build(str(path), kind, block_size=8, **({"vocab_size": 300} if kind == "bpe" else {}))
    table = b.task_options()["token_bytes"]
    assert table.shape == (b.num_classes,)
    for text in (TEXT, TEXT[:100]):  # every character of TEXT is in the training split
        assert int(table[b.tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


# ---------------------------------------------------------------- with the run

def test_the_run_keeps_its_tokenizer_and_resume_and_sample_reuse_it(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, f"dataset.root={corpus}"])
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    summary = run_training(cfg, run)
    saved = (run / "tokenizer.json").read_text()
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["tokenizer"] == saved == BpeTokenizer.train(TEXT[:int(len(TEXT) * 0.9)], 300).json_text
    assert 0 < summary["final_test_bpb"] < summary["final_test_bpc"]  # several bytes per token

    def no_training(*args, **kwargs):
        raise AssertionError("trained a BPE although the run has one")

    monkeypatch.setattr(BpeTokenizer, "train", no_training)
    model, tokenizer = load_sampler(str(run))
    assert tokenizer.json_text == saved and model.tok.num_embeddings == 300
    (run / "tokenizer.json").unlink()  # the checkpoint's copy is the one used
    cfg.trainer.max_steps, cfg.resume = 6, True
    assert run_training(cfg, run)["steps"] == 6 and (run / "tokenizer.json").read_text() == saved
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        other = compose(config_name="train", overrides=[*TINY, f"dataset.root={corpus}", "dataset.vocab_size=310",
                                                        "resume=true"])
    with pytest.raises(Exception) as info:  # noqa: B017 (user_error decides)
        run_training(other, run)
    msg = str(user_error(info.value))
    assert "was trained with dataset.vocab_size giving 300, this run gives 310" in msg and "\n" not in msg


def test_variance_of_a_bpe_run_uses_its_tokenizer(tmp_path, monkeypatch):
    import fqtrun.commands.variance  # noqa: F401 (registers the variance schema)
    from fqtrun.runs.variance import run_study

    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY, f"dataset.root={corpus}"])
    run_training(cfg, tmp_path / "run")
    monkeypatch.setattr(BpeTokenizer, "train", lambda *a, **k: pytest.fail("trained a BPE for the variance study"))
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        vcfg = compose(config_name="variance", overrides=[*TINY[:8], f"dataset.root={corpus}",
                                                          f"checkpoint={tmp_path / 'run'}", "variance.bits=[8]",
                                                          "variance.k=2", "variance.batches=2", "variance.batch_size=4",
                                                          "variance.quantizers=[per_sample]"])
    data, _ = run_study(vcfg, tmp_path / "v", "gpt")
    assert data["sampling"]["total"] > 0
