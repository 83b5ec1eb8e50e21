"""The package's import structure, read with `ast` (no import runs): thin commands on top, no cycles.

- no module outside fqtrun/commands imports fqtrun.commands, and no command imports another command
  (fqtrun.commands.common, the command-line helpers, excepted);
- no import cycle between modules, nor between the top-level parts of the package (fqtrun.build,
  fqtrun.runs, fqtrun.quant, ...), function-level imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fqtrun"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The fqtrun modules a file imports (at any depth), resolved to the longest known module name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("fqtrun"):
                out.add(name)
    return out


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: imports_of(p, set(MODULES)) - {m} for m, p in MODULES.items()}


def part(module: str) -> str:
    """The top-level part a module belongs to: fqtrun.quant.grid -> fqtrun.quant; fqtrun.build -> itself."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in graph:
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child, 2) == 1:
                return path[path.index(child):] + [child]
            elif colour.get(child, 2) == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_only_commands_import_commands():
    offenders = [f"{m} imports {', '.join(sorted(i for i in deps if i.startswith('fqtrun.commands')))}"
                 for m, deps in GRAPH.items() if not m.startswith("fqtrun.commands")
                 and any(i.startswith("fqtrun.commands") for i in deps)]
    assert not offenders, offenders


def test_no_command_imports_another_command():
    shared = {"fqtrun.commands", "fqtrun.commands.common"}
    offenders = [f"{m} imports {i}" for m, deps in GRAPH.items() if m.startswith("fqtrun.commands.")
                 for i in deps if i.startswith("fqtrun.commands.") and i not in shared]
    assert not offenders, offenders


def test_no_import_cycle_between_modules():
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH))


def test_no_import_cycle_between_parts_of_the_package():
    parts: dict[str, set[str]] = {}
    for m, deps in GRAPH.items():
        parts.setdefault(part(m), set()).update(part(d) for d in deps if part(d) != part(m))
    cycle = find_cycle(parts)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("graph", [{"a": {"b"}, "b": {"c"}, "c": {"a"}}, {"a": {"a2"}, "a2": {"a"}}])
def test_the_cycle_finder_finds_cycles(graph):
    assert find_cycle(graph) is not None
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
