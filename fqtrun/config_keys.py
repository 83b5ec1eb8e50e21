"""Settings that nothing reads: keys of a composed config that its typed schemas do not declare.

Hydra's struct mode refuses a misspelt key, but `+key=value` adds any key to any typed node, so
`+trainer.max_step=100` would compose and then silently do nothing. Every node of a command's
config is a typed dataclass (the command's schema, each group option's schema); a key outside its
node's dataclass is a setting no component reads, and is refused in one line naming the closest
real setting.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, OmegaConf

from fqtrun.errors import ConfigError


def unknown_settings(cfg: DictConfig) -> list[tuple[str, list[str]]]:
    """(dotted key, the settings its node declares) for every key of a typed node outside its schema.

    Untyped nodes (a dict-valued setting, e.g. an experiment's variants) are walked into, not checked:
    their keys are names the user chooses.
    """
    found: list[tuple[str, list[str]]] = []

    def walk(node: DictConfig, path: str) -> None:
        if node._is_none() or node._is_missing():
            return
        schema = OmegaConf.get_type(node)
        declared = ([f.name for f in dataclasses.fields(schema)]
                    if schema is not None and dataclasses.is_dataclass(schema) else None)
        for key in node.keys():
            name = f"{path}.{key}" if path else str(key)
            if declared is not None and key not in declared:
                found.append((name, declared))
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, name)

    walk(cfg, "")
    return [(key, declared) for key, declared in found if key != "hydra"]  # Hydra's own node, when composed in


def check_known_settings(cfg: DictConfig, command: str, choices: dict[str, str] | None = None) -> None:
    """ConfigError (one line) for the first setting of `cfg` that no component reads.

    `choices` (group -> chosen option, e.g. model -> cnn1d) lets the message name the option whose
    settings were searched.
    """
    unknown = unknown_settings(cfg)
    if not unknown:
        return
    key, declared = unknown[0]
    parent, _, leaf = key.rpartition(".")
    settings = [s for s in declared if not s.startswith("_")]
    holding = sorted((s for s in settings if len(leaf) >= 3 and leaf in s), key=len)  # grid -> grad_grid
    close = holding[:1] or difflib.get_close_matches(leaf, settings, n=1, cutoff=0.6)
    owner = parent or f"fqtrun {command}"
    group = (choices or {}).get(parent.split(".")[0]) if parent else None
    if group is not None and "." not in parent:
        owner = f"{parent}={group}"
    if close:
        fix = f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    else:
        listed = ", ".join(settings[:12]) + (", ..." if len(settings) > 12 else "")
        fix = f"drop it ({owner}'s settings: {listed})" if settings else "drop it"
    raise ConfigError(f"{key} is not a setting of {owner}, so it would do nothing: {fix} "
                      f"(`fqtrun {command} --help` lists the settings)")
