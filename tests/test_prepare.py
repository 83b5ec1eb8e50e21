"""`fqtrun prepare`: token files with dataset=text's ids for every tokenizer, uint32 past 65536 ids, one-line
errors, and prepare -> train -> sample -> resume through the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fqtrun.commands.common import user_error
from fqtrun.data import text, tokens
from fqtrun.runs.prepare import PrepareConfig, run_prepare

CORPUS = "".join(f"Entry {i}: déjà vu costs {i * 3 % 17} €\n" + ("\n" if i % 4 == 0 else "") for i in range(300))


def prepare_cfg(**settings):
    return OmegaConf.merge(OmegaConf.structured(PrepareConfig), {"progress": "none", **settings})


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_the_token_files_hold_dataset_text_ids(tmp_path, corpus, kind):
    size = {"vocab_size": 300} if kind == "bpe" else {}
    meta = run_prepare(prepare_cfg(input=str(corpus), out=str(tmp_path / "out"), tokenizer=kind, **size))
    expected = text.build(str(corpus), kind, block_size=8, val_windows=10**6, **size)
    got = tokens.build(str(tmp_path / "out"), block_size=8, val_windows=10**6)
    assert np.array_equal(got.train.tokens[:], expected.train.tokens)
    assert all(a.equal(b) for a, b in zip(got.test.tensors, expected.test.tensors))
    assert got.num_classes == expected.num_classes == meta["vocab_size"]
    assert got.tokenizer.digest() == expected.tokenizer.digest() and got.dtype == "uint16"
    assert meta["train_tokens"] == expected.train_tokens and meta["val_tokens"] == expected.val_tokens
    assert (tmp_path / "out" / "tokenizer.json").is_file() == (kind == "bpe")
    assert got.task_options()["token_bytes"].equal(expected.task_options()["token_bytes"])  # bits per byte too


def test_a_folder_input_reads_its_txt_files_in_sorted_order(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    for name, body in (("b.txt", "second book " * 40), ("a.txt", "first book " * 40), ("c.md", "not read")):
        (folder / name).write_text(body)
    run_prepare(prepare_cfg(input=str(folder), out=str(tmp_path / "out"), tokenizer="byte"))
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    whole = ("first book " * 40 + "\n" + "second book " * 40).encode()
    assert bytes(ids.astype(np.uint8)) == whole[:int(len(whole) * 0.9)]


def test_a_vocabulary_past_65536_ids_is_written_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "words.json"))
    rng = np.random.default_rng(0)
    picked = rng.integers(0, 70_000, 600)
    body = " ".join(words[i] for i in picked)
    (tmp_path / "c.txt").write_text(body)
    meta = run_prepare(prepare_cfg(input=str(tmp_path / "c.txt"), out=str(tmp_path / "out"),
                                   tokenizer=str(tmp_path / "words.json")))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_001
    ids = np.fromfile(tmp_path / "out" / "train.bin", dtype="<u4")
    whole = len(body[:int(len(body) * 0.9)].split()) - 1  # the training words not cut by the split
    assert ids[:whole].tolist() == (picked[:whole] + 1).tolist() and ids.max() > 65535  # id 0 is [UNK]
    b = tokens.build(str(tmp_path / "out"), block_size=16)
    assert (b.dtype, b.num_classes) == ("uint32", 70_001)


@pytest.mark.parametrize("settings,needles", [
    ({"input": "{tmp}/none.txt"}, ["input={tmp}/none.txt does not exist", "as input, or leave it unset"]),
    ({"val_fraction": 1.0}, ["val_fraction=1.0 must be in (0, 1)"]),
    ({"tokenizer": "{tmp}/corpus.txt"}, ["tokenizer={tmp}/corpus.txt does not load as a tokenizer.json"]),
    ({"tokenizer": "char", "vocab_size": 512}, ["vocab_size=512 sizes a trained BPE only (tokenizer=bpe)"]),
    ({"input": "{tmp}/latin1.txt", "tokenizer": "char"}, ["latin1.txt is not UTF-8 text",
                                                           "which tokenizer=char needs: use tokenizer=byte"]),
    ({"progress": "loud"}, ["progress='loud' is unknown"]),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, corpus, settings, needles):
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 50)
    settings = {"input": str(corpus), "out": str(tmp_path / "out"), **settings}
    cfg = prepare_cfg(**{k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in settings.items()})
    with pytest.raises(ValueError) as info:
        run_prepare(cfg)
    msg = str(user_error(info.value))
    assert "\n" not in msg and all(n.format(tmp=tmp_path) in msg for n in needles), msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_earlier_prepare_is_kept_unless_overwrite(tmp_path, corpus):
    out = tmp_path / "out"
    run_prepare(prepare_cfg(input=str(corpus), out=str(out), tokenizer="bpe", vocab_size=280))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError) as info:
        run_prepare(prepare_cfg(input=str(corpus), out=str(out), tokenizer="char"))
    assert "already holds train.bin, val.bin, meta.json, tokenizer.json: pass overwrite=true" in str(info.value)
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}
    run_prepare(prepare_cfg(input=str(corpus), out=str(out), tokenizer="char", overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]  # no stale tokenizer
    assert tokens.build(str(out), block_size=8).tokenizer.kind == "char"
    assert oct((out / "train.bin").stat().st_mode & 0o777) == "0o644"


def test_the_progress_bar_reports_the_encoding(tmp_path, corpus, capsys):
    run_prepare(prepare_cfg(input=str(corpus), out=str(tmp_path / "out"), tokenizer="char", progress="rich"))
    out = capsys.readouterr().out
    assert "encoding" in out and "100%" in out


# ---------------------------------------------------------------- the command line, end to end

def fqtrun(monkeypatch, *argv: str) -> None:
    """`fqtrun <argv>` in this process (cli.main, as the console script runs it)."""
    from fqtrun.cli import main

    monkeypatch.setattr(sys, "argv", ["fqtrun", *argv])
    main(list(argv))


def test_prepare_then_train_sample_and_resume_from_the_command_line(tmp_path, corpus, monkeypatch, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    fqtrun(monkeypatch, "prepare", f"input={corpus}", f"out={data}", "tokenizer=bpe", "vocab_size=300",
           "val_fraction=0.2")
    assert "train with: fqtrun train model=llama dataset=tokens" in capsys.readouterr().out
    train = ["train", "model=gpt", "dataset=tokens", f"dataset.root={data}", "model.n_layer=1", "model.n_head=2",
             "model.n_embd=32", "model.block_size=16", "batch_size=8", "trainer.eval_every=3",
             "dataset.val_windows=8", "logger.wandb.mode=disabled", "logger.progress=none", f"hydra.run.dir={run}"]
    fqtrun(monkeypatch, *train, "trainer.max_steps=3")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data"]["tokenizer"] == "bpe" and summary["final_test_bpb"] > 0
    capsys.readouterr()
    fqtrun(monkeypatch, "sample", f"checkpoint={run}", "prompt=Entry 1", "tokens=12", "seed=1")
    assert capsys.readouterr().out.startswith("Entry 1")
    fqtrun(monkeypatch, *train, "trainer.max_steps=6", "resume=true")
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["steps"] == 6
