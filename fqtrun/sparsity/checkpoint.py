"""The checkpoint of a converted sparse model: a run folder every checkpoint-reading command loads.

<out>/last.pt holds the weights with the masks as weight_mask buffers; <out>/.hydra/config.yaml is
the source run's config with its `sparsity` node replaced by the recipe of the masks applied (the
group schema of their kind, sparsity/config.py), so the folder rebuilds as a sparse run.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from fqtrun.sparsity.config import SCHEMAS
from fqtrun.sparsity.policy import MaskPolicy
from fqtrun.training.checkpoint import model_signature, save_checkpoint


def sparse_recipe(run_cfg: DictConfig, policy: MaskPolicy):
    """The sparsity group schema of the policy's kind: the policy's masks, the run's other settings (every, ...).

    The _target_ is the schema's own, not the run's (a run folder may predate a rename of the policy).
    """
    old = OmegaConf.to_container(run_cfg.sparsity) if run_cfg.get("sparsity") is not None else {}
    old.pop("_target_", None)
    schema = SCHEMAS[policy.kind]
    new = {"kind": policy.kind, "n": policy.n, "m": policy.m, "keep_last": policy.keep_last,
           "exclude": list(policy.exclude)}
    if policy.kind == "transposable":
        new["method"] = policy.method
    return schema(**{k: v for k, v in {**old, **new}.items() if k in schema.__dataclass_fields__})


def save_sparse_checkpoint(out: Path, run_cfg: DictConfig, model: nn.Module, name: str, source: Path,
                           policy: MaskPolicy) -> Path:
    """Write <out>/last.pt and <out>/.hydra/config.yaml of the masked model; returns the checkpoint path."""
    cfg = run_cfg.copy()
    cfg.sparsity = OmegaConf.structured(sparse_recipe(run_cfg, policy))
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml", resolve=True)
    model_cpu = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return save_checkpoint(out / "last.pt", {
        "model": model_cpu, "signature": model_signature(model), "model_name": name,
        "converted_from": str(source), "sparsity": OmegaConf.to_container(cfg.sparsity)})
