"""Typed schemas of the `sparsity` config group; conf/sparsity/<name>.yaml extends one of them.

`instantiate(cfg.sparsity)` builds the mask policy (sparsity/training.py SparsityHook), which
checks the values (N < M, known kind and method) with one-line errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class NMSparsity:
    """Row-wise N:M: keep n of every m consecutive weights along the input dimension."""

    _target_: str = "fqtrun.sparsity.training.SparsityHook"
    kind: str = "nm"
    n: int = 2  # kept in every group of m
    m: int = 4
    every: int = 40  # steps between mask refreshes
    srste_decay: float = 0.0  # extra decay on pruned weights (SR-STE), 0 = off
    keep_last: bool = True  # keep the classifier dense
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layer names kept dense


@dataclass
class TransposableSparsity(NMSparsity):
    """Transposable N:M: every m x m block keeps n per row AND per column, so W^T is N:M too."""

    kind: str = "transposable"
    method: str = "exact"  # exact | greedy


SCHEMAS = {"nm": NMSparsity, "transposable": TransposableSparsity}


def register_configs(cs: ConfigStore) -> None:
    """Store each schema as schema/sparsity/<name>, which conf/sparsity/<name>.yaml extends."""
    for name, node in SCHEMAS.items():
        cs.store(group="schema/sparsity", name=name, node=node)
