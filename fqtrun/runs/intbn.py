# TEMPORARY shim, replaced at merge
"""run_intbn_study(cfg, out_dir) -> dict: the integer-BN pipeline (today fqtrun.commands.intbn.run_intbn)."""
from fqtrun.commands.intbn import run_intbn as run_intbn_study  # noqa: F401
