"""Every command in the code blocks of README.md and docs/*.md works as written, checked without training:
a `fqtrun` command exists and its overrides pass the CLI's own pre-Hydra checks (group choices, optional
groups, one composition of the config); a `make` target exists in the Makefile."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from fqtrun.cli import COMMANDS, check_composes, check_group_choices, check_unchosen_groups

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LINE = re.compile(r"(^|\s)(\S*/)?fqtrun(\s|$)|^make(\s|$)")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")  # <run>, <run folder>: the reader fills them in
OPTIONAL = re.compile(r"(?<=\s)\[[^\[\]]*\]")  # [out=<folder>]: usage notation, not an argument
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the fenced and indented code blocks, continuation lines joined."""
    lines, fence, indented, prev_blank = [], False, False, True
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = not fence
        elif fence:
            lines.append((n, line.strip()))
        else:
            indented = line.startswith("    ") and bool(line.strip()) and (indented or prev_blank)
            if indented:
                lines.append((n, line.strip()))
            prev_blank = not line.strip()
    joined: list[tuple[int, str]] = []
    for n, line in lines:
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1].rstrip() + " " + line)
        else:
            joined.append((n, line))
    return joined


def documented_commands() -> list[tuple[str, list[str]]]:
    """('page:line', words) of every fqtrun or make command in the pages' code blocks."""
    found = []
    for page in PAGES:
        for n, line in code_lines(page.read_text(encoding="utf-8")):
            line = line.removeprefix("$ ")
            if COMMAND_LINE.search(line):
                words = shlex.split(OPTIONAL.sub("", PLACEHOLDER.sub("x", line)), comments=True)
                found.append((f"{page.relative_to(ROOT)}:{n}", [w for w in words if w != "..."]))
    return found


COMMANDS_FOUND = documented_commands()


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return {m.group(1) for m in re.finditer(r"^([A-Za-z0-9_-]+):", text, re.MULTILINE)}


def sweep_free(overrides: list[str]) -> list[list[str]]:
    """The sweep-free compositions a sweep stands for, so that every value of every swept setting is composed
    once: the k-th takes each swept setting's k-th value (cycling through the shorter ones)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
              else [text] for o, text in zip(parsed, overrides)]
    return [[vs[k % len(vs)] for vs in values] for k in range(max(map(len, values), default=1))]


def check_fqtrun(argv: list[str]) -> str | None:
    """None if `fqtrun <argv>` names a command and its overrides compose, else what is wrong."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return None
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        return f"no command {name!r} (fqtrun/cli.py COMMANDS has {', '.join(COMMANDS)})"
    args, skip = [], False
    for a in rest:
        if skip or a in ("-m", "--multirun", "-h", "--help") or a in FLAGS_WITH_VALUE:
            skip = a in FLAGS_WITH_VALUE
            continue
        if a.startswith("-"):
            return f"flag {a} is not one the docs may use (-m, --cfg, --help)"
        args.append(a)
    module = importlib.import_module(COMMANDS[name][0])  # registers the command's schemas
    args = getattr(module, "prepare_argv", list)(args)
    for overrides in sweep_free(args):
        problem = (check_group_choices(overrides) or check_unchosen_groups(name, overrides)
                   or check_composes(name, overrides))
        if problem:
            return problem
    return None


def test_the_pages_have_commands():
    assert len(COMMANDS_FOUND) > 40
    assert {"README.md", "docs/fqt.md", "docs/language_models.md"} <= {w.split(":")[0] for w, _ in COMMANDS_FOUND}


@pytest.mark.parametrize(("where", "words"), COMMANDS_FOUND, ids=[w for w, _ in COMMANDS_FOUND])
def test_documented_command(where, words):
    if words[0] == "make":
        missing = [t for t in words[1:] if "=" not in t and not t.startswith("-") and t not in make_targets()]
        assert not missing, f"{where}: make {' '.join(missing)}: no such target in the Makefile"
        return
    at = next(i for i, w in enumerate(words) if w == "fqtrun" or w.endswith("/fqtrun"))
    problem = check_fqtrun(words[at + 1:])
    assert problem is None, f"{where}: {' '.join(words)}: {problem}"


def test_the_checks_can_fail():
    """The same checks refuse what the docs must not say: a misspelt command, group option or key."""
    assert "no command" in check_fqtrun(["trian"])
    assert "unknown" in check_fqtrun(["train", "-m", "+quant=qat,qatt"])
    assert check_fqtrun(["train", "model.n_layerz=2"]) is not None
    assert check_fqtrun(["train", "quant.bits_w=4"]) is not None  # a quant setting without +quant


def test_a_sweep_composes_every_value_once():
    assert sweep_free(["+quant=qat,per_sample,householder", "bits=4,8", "epochs=3"]) == [
        ["+quant=qat", "bits=4", "epochs=3"], ["+quant=per_sample", "bits=8", "epochs=3"],
        ["+quant=householder", "bits=4", "epochs=3"]]
    assert sweep_free(["variance.bits=[2,4]", "prompt=\"a,b\""]) == [["variance.bits=[2,4]", "prompt=\"a,b\""]]


def test_code_lines_finds_blocks_and_joins_continuations():
    text = ("prose fqtrun train\n\n    fqtrun train \\\n        bits=4   # four\n  - item\n\n"
            "```\nmake run\n```\n")
    assert code_lines(text) == [(3, "fqtrun train bits=4   # four"), (8, "make run")]


def test_the_readme_lists_every_config_group_option():
    """The README's config-groups table names every option of fqtrun/conf/<group>/ (a new one gets a word)."""
    conf = ROOT / "fqtrun" / "conf"
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_/]+)`[^|]*\| ([^|]*) \|", (ROOT / "README.md")
                                                         .read_text(encoding="utf-8"), re.MULTILINE)}
    groups = ("model", "dataset", "optim", "lr", "logger", "schedule", "quant", "sparsity", "hydra/launcher",
              "experiment")
    assert {p.name for p in conf.iterdir() if p.is_dir() and p.name not in ("with_dataset", "hydra", "__pycache__")} \
        <= set(groups), "a new config group: add its row to the README's table"
    for group in groups:
        listed = set(re.findall(r"[a-z0-9_]+", rows[group]))
        missing = sorted(p.stem for p in (conf / group).glob("*.yaml") if p.stem not in listed)
        assert not missing, f"README.md's config groups: {group} lacks {', '.join(missing)}"
