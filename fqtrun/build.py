"""Assemble a run from its config: task, data, model, quantized model, hooks, optimizer, lr.

Every command that needs a model goes through here: `assemble` for a training run (fqtrun train,
the precision range test, experiments), `load_train_run` for the commands that read a trained
run's folder back (variance, mask, intbn). DEFAULT_HOOKS is the explicit list of techniques that
plug into the loop; pass another sequence of HookSpecs to add or replace one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fqtrun.analysis.numerics import numerics_hook
from fqtrun.analysis.variance import variance_hook
from fqtrun.config import TrainConfig, instantiate_checked
from fqtrun.data.base import build_bundle, check_signature
from fqtrun.errors import CheckpointError, ConfigError
from fqtrun.precision.hooks import bitops_hook, bits_probe, schedule_hook
from fqtrun.quant.backends import apply_backend
from fqtrun.quant.convert import ConversionReport, convert
from fqtrun.quant.layers import NoiseContext, QuantLayerMixin
from fqtrun.quant.recipe import QuantConfig, slot_factory
from fqtrun.sparsity.hook import sparsity_hook
from fqtrun.tasks import TASKS, Task
from fqtrun.training.checkpoint import check_matches, load_checkpoint
from fqtrun.training.hooks import HookSpec, NoiseStep, RunFacts, build_hooks
from fqtrun.training.trainer import steps_per_epoch


def noise_hook(node, facts: RunFacts) -> NoiseStep:
    return NoiseStep(facts.noise)


# The techniques that plug into the training loop, in the order they run each step.
DEFAULT_HOOKS: tuple[HookSpec, ...] = (
    HookSpec("noise", None, noise_hook),  # stochastic-rounding noise follows the global step
    HookSpec("sparsity", "sparsity", sparsity_hook),  # masks refresh, SR-STE
    HookSpec("numerics", "numerics", numerics_hook),  # numerics health (read before the variance probe runs)
    HookSpec("variance", "variance", variance_hook),  # gradient-variance probe
    HookSpec("schedule", "schedule", schedule_hook),  # precision schedule sets the bits
    HookSpec("bitops", "schedule", bitops_hook),  # cumulative BitOPs
    HookSpec("bits", None, bits_probe),  # last: reads back the bits the others set
)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    return torch.device(name)


def build_task(cfg: DictConfig, bundle) -> Task:
    """The run's objective, the one its data declares (the loss a probe differentiates too)."""
    return TASKS[bundle.task](label_smoothing=cfg.get("label_smoothing", 0.0), **bundle.task_options())


def build_model(model_cfg: DictConfig, bundle) -> nn.Module:
    """The model for the bundle's classes (vocabulary) and sample shape; refuses one built for another task."""
    model = instantiate(model_cfg, num_classes=bundle.num_classes, input_shape=tuple(bundle.input_shape))
    task = getattr(model, "task", "classification")
    if task != bundle.task:
        raise ConfigError(f"the model ({type(model).__name__}) is built for {task.replace('_', ' ')} but "
                          f"dataset={bundle.name} is for {bundle.task.replace('_', ' ')}: pair model=llama "
                          "(or model=gpt) with dataset=text, and the other models with the classification datasets")
    return model


def model_name(cfg: DictConfig, choices: Mapping[str, str]) -> str:
    """The model's config group option (e.g. cnn1d), or its class name when not composed from the group."""
    return choices.get("model") or str(cfg.model._target_).rsplit(".", 1)[-1].lower()


def quantize_model(recipe: QuantConfig | None, sparse: bool, model: nn.Module,
                   noise: NoiseContext) -> ConversionReport | None:
    """Apply the quant recipe (and make layers mask-capable for sparsity); None when the run is plain fp32."""
    if recipe is None and not sparse:
        return None
    factory = slot_factory(recipe) if recipe is not None else (lambda slot, module: None)
    keep = {k: _keep(recipe, model, k) for k in ("keep_first", "keep_last")}
    blocks = {k: getattr(recipe, k) if recipe else 0 for k in ("keep_first_blocks", "keep_last_blocks")}
    report = convert(model, factory, noise, **keep, **blocks, exclude=list(recipe.exclude) if recipe else [])
    report.kept.update({name: "embedding lookup (no GEMM)" for name, m in model.named_modules()
                        if isinstance(m, nn.Embedding)})
    if recipe is not None:
        apply_backend(model, recipe.backend, compile=recipe.compile)
    return report


def _keep(recipe: QuantConfig | None, model: nn.Module, key: str) -> bool:
    """quant.keep_first / keep_last as set, else the model's choice (GPT: the head stays fp), else false."""
    if recipe is None:
        return False
    value = getattr(recipe, key)
    return bool(getattr(model, "quant_keep", {}).get(key, False) if value is None else value)


def build_recipe(node: DictConfig | None) -> QuantConfig | None:
    """The validated quant recipe of a `quant` config node (None: full precision)."""
    return instantiate_checked(node)


@dataclass
class Assembly:
    """The pieces of one training run, built and wired, before the loop starts."""

    bundle: object
    task: Task
    model: nn.Module
    recipe: QuantConfig | None
    report: ConversionReport | None
    noise: NoiseContext
    facts: RunFacts
    hooks: list
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]


def run_length(cfg: DictConfig, train_set) -> tuple[int, int]:
    """(optimizer steps of the run: trainer.max_steps, else epochs x steps per epoch; steps per epoch)."""
    per_epoch = steps_per_epoch(train_set, cfg.batch_size)
    max_steps = cfg.trainer.max_steps
    return (max_steps if max_steps is not None else per_epoch * cfg.epochs), per_epoch


def assemble(cfg: DictConfig, device: torch.device, noise_seed: int, is_main: bool = True,
             hook_specs: Sequence[HookSpec] = DEFAULT_HOOKS, resuming: dict | None = None) -> Assembly:
    """Build everything a training run needs from its config, on `device`.

    The order is fixed (and so are the random draws): seed, data, model, quantization, hooks,
    optimizer. `noise_seed` keys the stochastic rounding (DDP ranks draw their own). `resuming`: the
    checkpoint the run continues from, whose tokenizer the data reuses (build_bundle).
    """
    recipe = build_recipe(cfg.get("quant"))  # a bad recipe stops the run before any data is built
    torch.manual_seed(cfg.seed)
    bundle = build_bundle(cfg.dataset, resuming)
    task = build_task(cfg, bundle)
    model = build_model(cfg.model, bundle)
    noise = NoiseContext(seed=noise_seed)
    report = quantize_model(recipe, cfg.get("sparsity") is not None, model, noise)
    total, per_epoch = run_length(cfg, bundle.train)
    facts = RunFacts(model=model, train_set=bundle.train, task=task, noise=noise, total_steps=max(1, total),
                     steps_per_epoch=per_epoch, batch_size=cfg.batch_size, seed=cfg.seed,
                     log_every=cfg.logger.log_every, is_main=is_main)
    hooks = build_hooks(cfg, facts, hook_specs)
    model.to(device)
    optimizer = instantiate(cfg.optim)(params=model.parameters())
    try:
        lr_at = instantiate(cfg.lr)(total_steps=total, steps_per_epoch=per_epoch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Assembly(bundle, task, model, recipe, report, noise, facts, hooks, optimizer, lr_at)


# ----- a trained run read back from its folder -----------------------------------------------
def checkpoint_path(value: str) -> Path:
    """A checkpoint setting as a file: a run folder means its last.pt."""
    path = Path(value).expanduser()
    return path / "last.pt" if path.is_dir() else path


def check_checkpoint(ckpt: dict, model: nn.Module, bundle, name: str, path: Path) -> None:
    """Refuse a checkpoint trained on other data (an LM's vocabulary, window) or for another architecture."""
    check_signature(ckpt.get("data", {}), bundle.signature(), path)
    check_matches(ckpt, model, name, path)


def load_weights(model: nn.Module, ckpt: dict, bundle, name: str, path: Path) -> None:
    """A checkpoint's weights into `model`, with one-line errors on a mismatch (check_checkpoint).

    A sparse run's checkpoint holds weight masks: they are put on the quantized layers first (as
    their weight_mask buffers), so the model's forward matches the run's.
    """
    for key, value in ckpt["model"].items():
        owner, _, leaf = key.rpartition(".")
        if leaf != "weight_mask" or not isinstance(value, torch.Tensor):
            continue
        try:
            layer = model.get_submodule(owner)
        except AttributeError:
            continue  # check_matches names the mismatch
        if isinstance(layer, QuantLayerMixin):
            layer.weight_mask = torch.zeros_like(value)
    check_checkpoint(ckpt, model, bundle, name, path)
    model.load_state_dict(ckpt["model"])


@dataclass
class TrainedRun:
    """A `fqtrun train` run rebuilt from its folder: its config, checkpoint, model (eval mode), data, task."""

    cfg: DictConfig
    checkpoint: dict
    model: nn.Module
    bundle: object
    name: str
    task: Task
    path: Path


def load_train_run(checkpoint: str, command: str, require: Callable | None = None) -> TrainedRun:
    """Rebuild a `fqtrun train` run's model from its folder.

    `checkpoint` is a run folder's last.pt (or the folder); the model, dataset and quant/sparsity
    recipe come from the folder's .hydra/config.yaml; the weights load through load_weights
    (sparse runs' masks included). `command` names the caller in the error messages;
    `require(cfg, model, name)` may refuse the run (one-line error) before the weights are loaded.
    """
    path = checkpoint_path(checkpoint)
    ckpt = load_checkpoint(path)  # one-line CheckpointError when missing or corrupt
    cfg_path = path.parent / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} does not exist: {command} rebuilds the model from the run folder's "
                              "config; pass checkpoint=<a fqtrun train run folder>/last.pt")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(cfg_path))
    except Exception as e:
        raise ConfigError(f"{cfg_path} does not match this fqtrun's train schema "
                          f"({' '.join(str(e).split())[:160]})") from None
    name = ckpt.get("model_name", "unknown")
    bundle = build_bundle(cfg.dataset, ckpt)  # the run's own tokenizer, from its checkpoint
    model = build_model(cfg.model, bundle)
    if require is not None:
        require(cfg, model, name)
    recipe = build_recipe(cfg.get("quant"))
    quantize_model(recipe, cfg.get("sparsity") is not None, model, NoiseContext(seed=cfg.seed))
    load_weights(model, ckpt, bundle, name, path)
    return TrainedRun(cfg, ckpt, model.eval(), bundle, name, build_task(cfg, bundle), path)
