# TEMPORARY shim, replaced at merge
"""run_mask_study(cfg, out_dir) -> dict: the mask pipeline (today fqtrun.commands.mask.run_mask)."""
from fqtrun.commands.mask import run_mask as run_mask_study  # noqa: F401
