"""`fqtrun <command> [hydra overrides]`: each command is its own Hydra app (conf/<command>.yaml)."""

from __future__ import annotations

import importlib
import itertools
import os
import re
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from fqtrun.allocator import keep_freed_memory
from fqtrun.errors import FqtrunError

CONF = Path(__file__).resolve().parent / "conf"

COMMANDS = {
    "train": ("fqtrun.commands.train", "train a model (default: MNIST-1D CNN, full precision; +quant=..., bits=...)"),
    "variance": ("fqtrun.commands.variance", "gradient variance: sampling vs quantization, per layer, per quantizer and bits"),
    "prt": ("fqtrun.commands.prt", "precision range test: find q_min for a cyclic precision schedule"),
    "mask": ("fqtrun.commands.mask", "N:M / transposable mask quality, diversity, and dense -> N:M conversion"),
    "intbn": ("fqtrun.commands.intbn", "integer-exact fixed-point BatchNorm of a trained quantized model"),
    "sample": ("fqtrun.commands.sample", "text from a trained language model (model=llama or model=gpt, dataset=text)"),
    "prepare": ("fqtrun.commands.prepare", "token files (nanoGPT's train.bin / val.bin) from text, for dataset=tokens"),
    "report": ("fqtrun.commands.report", "tables and plots over run and sweep folders (and experiment folders)"),
    "reproduce": ("fqtrun.commands.reproduce", "one documented experiment end to end: its runs, steps and tables"),
    "bench": ("fqtrun.commands.bench", "speed ratios: quantizers vs clone, FQT step vs fp32 / bf16"),
}

USAGE = """usage: fqtrun <command> [hydra overrides]    (fqtrun <command> --help for its settings)

commands:
{commands}

examples:
  fqtrun train +quant=qat bits=4
  fqtrun train -m +quant=qat bits=4,6,8 seed=0,1,2"""


def main(argv: list[str] | None = None) -> None:
    command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in COMMANDS.items())))
        return
    name = argv[0]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}: use one of {', '.join(COMMANDS)} (fqtrun --help)", file=sys.stderr)
        sys.exit(2)
    problem = check_output_dir(argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    pin_portable_numerics(argv, reexec=command_line)  # before the command imports torch
    keep_freed_memory()  # big CPU temporaries reuse freed memory instead of new page faults
    module = importlib.import_module(COMMANDS[name][0])  # registers the command's schemas
    try:  # e.g. report: positional folders -> dirs=[...]; reproduce: a positional name -> experiment=<name>
        args = getattr(module, "prepare_argv", list)(argv[1:])
    except FqtrunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    problem = check_group_choices(args) or check_unchosen_groups(name, args) or check_composes(name, args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"fqtrun {name}", *args]
    module.main()


def pin_portable_numerics(argv: list[str], reexec: bool) -> None:
    """A portable run (numerics.portable=true; reproduce's default) is pinned through the environment, which
    torch and MKL read once (fqtrun/numerics_mode.py): set here, before the command imports torch, for this
    process and the job processes it starts. Where torch is loaded already, the command line's process starts
    again with it (reexec); a caller's process is left as it is and the run refuses at its start."""
    from fqtrun.numerics_mode import pin_environment, wanted

    if wanted(argv[0], argv[1:]) and pin_environment(os.environ) and "torch" in sys.modules and reexec:
        os.execv(sys.executable, [sys.executable, "-m", "fqtrun.cli", *argv])


def check_group_choices(overrides: list[str]) -> str | None:
    """An unknown option of a config group (model=foo, +quant=bar), named with the valid ones.

    Hydra would say so too, over a dozen lines; this says it in one.
    """
    for arg in overrides:
        m = re.fullmatch(r"[+~]{0,2}([a-z_][a-z0-9_/]*)=(.*)", arg)
        # hydra/* groups (launchers, sweepers) also come from Hydra and its plugins, which conf/ does not list
        if not m or m.group(1).startswith("hydra/") or not (CONF / m.group(1)).is_dir():
            continue
        group, values = m.group(1), m.group(2)
        valid = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        for value in values.split(","):  # a multirun sweep lists options with commas
            if value and value != "null" and value not in valid:
                return f"{group}={value} is unknown: use one of {', '.join(valid)}"
    return None


OPTIONAL_GROUPS = {"quant": "qat, per_tensor, per_sample, householder", "sparsity": "nm, transposable"}


def check_unchosen_groups(command: str, overrides: list[str]) -> str | None:
    """A setting of an optional group (quant.bits_w=4) without the group chosen (+quant=...): it would do nothing.

    Optional means the command's schema leaves the group out by default (train: quant, sparsity).
    """
    from hydra.core.config_store import ConfigStore

    schema = ConfigStore.instance().repo.get(f"{command}_schema.yaml")
    optional = {g for g in OPTIONAL_GROUPS if schema is not None and g in schema.node and schema.node[g] is None}
    chosen = {m.group(1) for a in overrides if (m := re.fullmatch(r"[+~]{0,2}([a-z_]+)=.*", a))}
    for arg in overrides:
        m = re.fullmatch(r"[+~]{0,2}([a-z_]+)\.[^=]*=.*", arg)
        if m and m.group(1) in optional and m.group(1) not in chosen:
            group = m.group(1)
            return (f"{arg.lstrip('+~')} sets the {group} recipe but none is chosen: add +{group}=<"
                    f"{OPTIONAL_GROUPS[group].replace(', ', '|')}>")
    return None


def check_composes(command: str, overrides: list[str]) -> str | None:
    """Compose the config once before Hydra does, to report a bad key, a wrong type or a setting that nothing
    reads (config_keys) in one line.

    A sweep (-m) is composed once per combination of its config-group options (a group option decides
    which settings exist; other swept values take their first value). Skipped for --help, --cfg and the
    like, which Hydra handles itself.
    """
    flags = [a for a in overrides if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags) or not (CONF / f"{command}.yaml").is_file():
        return None
    plain = [a for a in overrides if not a.startswith("-") and not re.match(r"[+~]{0,2}hydra[./]", a)]
    combinations = sweep_combinations(plain) if flags else [plain]
    for combination in combinations or []:  # None: a sweep form only Hydra's sweeper expands (glob, interval)
        problem = composition_problem(command, combination)
        if problem:
            return problem
    return None


def sweep_combinations(overrides: list[str]) -> list[list[str]] | None:
    """The override lists of a sweep that differ in a config-group option, in Hydra's order (the first
    value of every other swept setting); None where the sweep syntax is not a plain choice or range
    (glob, interval: a sweeper plugin expands those), or does not parse (Hydra says why when it starts)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        options = []
        for override in parsed:
            key = override.get_key_element()
            if not override.is_sweep_override():
                options.append([f"{key}={override.get_value_element_as_str()}"])
            elif not override.is_discrete_sweep():
                return None
            else:
                values = [f"{key}={v}" for v in override.sweep_string_iterator()]
                options.append(values if (CONF / override.key_or_group).is_dir() else values[:1])
    except Exception:  # noqa: BLE001 (glob needs Hydra's config loader; syntax errors are Hydra's to report)
        return None
    return [list(c) for c in itertools.product(*options)]


def composition_problem(command: str, overrides: list[str]) -> str | None:
    """One line saying why `fqtrun <command> <overrides>` does not compose into settings that all do
    something; None when it does."""
    from fqtrun.config import compose_conf

    try:
        compose_conf(command, overrides)
    except FqtrunError as e:
        return str(e)
    except Exception as e:  # Hydra/OmegaConf errors: several lines, the useful ones are the first
        chain, err = [], e
        while err is not None:
            chain.append(str(err))
            err = err.__cause__
        lines = [ln.strip() for ln in "\n".join(chain).splitlines() if ln.strip()]
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("full_key:")), None)
        skip = ("Error merging", "full_key", "object_type", "To append")
        what = next((ln for ln in lines if re.match(r"(Key|Value) '", ln)), None) or next(
            (ln for ln in lines if not ln.startswith(skip)), lines[0] if lines else type(e).__name__)
        where = f" (setting {key})" if key else ""
        elsewhere = options_with(key) if key and what.startswith("Key ") else []
        if elsewhere:
            group = key.split(".")[0]
            return (f"{key} does not exist for the chosen {group} option: it belongs to "
                    f"{' or '.join(f'{group}={o}' for o in elsewhere)}; choose that option or drop {key}")
        return f"{what}{where}: see `fqtrun {command} --help` for the settings and their types"
    return None


def options_with(key: str) -> list[str]:
    """The options of key's config group whose schema has the setting (sparsity.method -> [transposable])."""
    from hydra.core.config_store import ConfigStore

    group, _, rest = key.partition(".")
    first = rest.split(".")[0]
    schemas = ConfigStore.instance().repo.get("schema", {}).get(group, {})
    return sorted(name.removesuffix(".yaml") for name, node in schemas.items()
                  if isinstance(node.node, DictConfig) and first in node.node)


def check_output_dir(overrides: list[str]) -> str | None:
    """An output folder that cannot be written, found before Hydra tries to create it."""
    wanted = [a.split("=", 1)[1] for a in overrides if re.match(r"hydra\.(run|sweep)\.dir=", a)]
    for folder in wanted or ["."]:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            where = f"output folder {folder}" if wanted else f"the current folder {Path.cwd()}"
            return f"{where} cannot be written ({e.strerror}): pass hydra.run.dir=<a writable folder>"
    return None


if __name__ == "__main__":
    main()
