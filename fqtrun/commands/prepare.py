"""fqtrun prepare: token files from text, in nanoGPT's format (fqtrun/runs/prepare.py), for dataset=tokens.

    fqtrun prepare input=data/shakespeare.txt out=data/shakespeare_bpe tokenizer=bpe vocab_size=2048
    fqtrun train model=llama dataset=tokens dataset.root=data/shakespeare_bpe

input is a UTF-8 text file or a folder of .txt files (null: the embedded corpus); tokenizer char | byte |
bpe | the path of a tokenizer.json. Writes train.bin, val.bin, meta.json (and tokenizer.json) into out.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from fqtrun.commands.common import run_reporting_errors
from fqtrun.runs.prepare import PrepareConfig, run_prepare

ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


def prepare(cfg: DictConfig, out_dir: Path) -> dict:
    meta = run_prepare(cfg)
    print(f"wrote {meta['out']}: {meta['train_tokens']} training and {meta['val_tokens']} validation ids "
          f"({meta['dtype']}), {meta['tokenizer']} tokenizer of {meta['vocab_size']} ids; train with: fqtrun train "
          f"model=llama dataset=tokens dataset.root={meta['out']}")
    return meta


@hydra.main(version_base="1.3", config_path="../conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    run_reporting_errors(prepare, cfg)
