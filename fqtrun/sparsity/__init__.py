"""N:M and transposable N:M sparsity (spec sparsity.md): mask search (masks.py), mask diversity
(diversity.py), the mask policy (policy.py) and its trainer hook (hook.py), the per-layer mask report
(report.py), one-shot conversion (conversion.py, reconstruct.py, checkpoint.py), the study's tables
(tables.py) and the config schemas (config.py).

Convention: N is the number kept in every group of M (2:4 keeps 2 of every 4).
"""

from fqtrun.sparsity.diversity import check_nm, count_transposable_blocks, log10_mask_diversity
from fqtrun.sparsity.masks import nm_mask, transposable_mask
from fqtrun.sparsity.policy import MaskPolicy

__all__ = [
    "MaskPolicy",
    "check_nm",
    "count_transposable_blocks",
    "log10_mask_diversity",
    "nm_mask",
    "transposable_mask",
]
