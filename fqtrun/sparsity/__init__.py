"""N:M and transposable N:M sparsity: masks, mask diversity, the sparse-training hook (spec sparsity.md).

Convention: N is the number kept in every group of M (2:4 keeps 2 of every 4).
"""

from fqtrun.sparsity.diversity import check_nm, count_transposable_blocks, mask_diversity
from fqtrun.sparsity.masks import nm_mask, transposable_mask
from fqtrun.sparsity.training import SparsityHook

__all__ = [
    "SparsityHook",
    "check_nm",
    "count_transposable_blocks",
    "mask_diversity",
    "nm_mask",
    "transposable_mask",
]
