"""Text from a trained language model (`fqtrun sample`): the run rebuilt from its folder, then sampled.

The model, corpus (tokenizer) and quant recipe come from the run folder (build.load_train_run,
weights_only); a quantized model samples at its evaluation bits (the schedule's eval_bits, or the
recipe's bits under the static schedule), as its validation loss was measured.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from fqtrun.build import load_train_run, pick_device, run_length
from fqtrun.errors import ConfigError
from fqtrun.numerics_mode import portable_scope
from fqtrun.precision.hooks import FORWARD_SLOTS, build_plan
from fqtrun.quant.convert import set_bits


def _language_model(cfg: DictConfig, model: torch.nn.Module, name: str) -> None:
    if getattr(model, "task", "classification") != "language_model":
        raise ConfigError(f"fqtrun sample needs a language-model run (model=llama or model=gpt); the checkpoint's "
                          f"run trained model={name}")


def load_sampler(checkpoint: str):
    """(the run's model in eval mode at its evaluation bits, its tokenizer) from a run folder or last.pt."""
    run = load_train_run(checkpoint, "fqtrun sample", require=_language_model)
    if run.bundle.tokenizer is None:  # token files that came without one (dataset=tokens)
        raise ConfigError(f"fqtrun sample needs the run's tokenizer to read the prompt and write text, and its "
                          f"data ({run.bundle.facts().get('corpus')}) has none: add the tokenizer.json or a "
                          "meta.json/meta.pkl with its characters to that folder")
    plan = build_plan(run.cfg.schedule, run_length(run.cfg, run.bundle.train)[0])
    if plan.changes_bits and plan.eval_bits is not None:
        set_bits(run.model, FORWARD_SLOTS, plan.eval_bits)
    return run.model, run.bundle.tokenizer


@portable_scope
def run_sample(cfg: DictConfig) -> tuple[str, str]:
    """(prompt, generated continuation) of cfg.tokens tokens from the run at cfg.checkpoint."""
    checks = [(cfg.tokens >= 1, f"tokens={cfg.tokens} must be >= 1"),
              (cfg.temperature > 0, f"temperature={cfg.temperature} must be > 0 (smaller: closer to greedy)"),
              (cfg.top_k is None or cfg.top_k >= 1, f"top_k={cfg.top_k} must be >= 1 (or null: every token)"),
              (len(cfg.prompt) > 0, "prompt is empty: pass prompt=<text to continue>")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_sampler(cfg.checkpoint)
    try:
        prompt = tokenizer.encode(cfg.prompt)
    except ValueError as e:
        raise ConfigError(f"prompt={cfg.prompt!r}: {e} of the run's corpus: use characters of its text "
                          "(the run's summary.json data.corpus)") from None
    device = pick_device(cfg.device)
    out = model.to(device).generate(prompt[None].to(device), cfg.tokens, cfg.temperature, cfg.top_k,
                                    torch.Generator(device=device).manual_seed(cfg.seed))
    return cfg.prompt, tokenizer.decode(out[0, len(prompt):].tolist())
