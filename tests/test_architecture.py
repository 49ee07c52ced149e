"""The package's shape, checked: one direction of imports, capabilities as types, no private names across modules.

The import graph is built from the source (every ``import`` statement, module-level or inside functions, so a lazy
import cannot hide a cycle; ``if TYPE_CHECKING:`` blocks are left out, they never run) and must be acyclic; the solver
layer imports nothing above itself.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "sdeflow"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, level: int, name: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))
    return name or ""


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the sdeflow modules it imports (a `from pkg import name` of a submodule counts the submodule)."""
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        type_only = {  # `if TYPE_CHECKING:` imports never run: they cannot make a cycle at import time
            id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node.level, node.module)
                targets = [src] + [f"{src}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if not t.startswith("sdeflow"):
                    continue
                while t and t not in mods:  # `sdeflow.solvers.base.Stepper` -> sdeflow.solvers.base
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph, ignoring a package's imports of its own submodules (re-exports), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def edges(m: str) -> set[str]:
        return {d for d in graph[m] if not d.startswith(m + ".")}

    def visit(m: str) -> list[str] | None:
        color[m] = 1
        stack.append(m)
        for d in sorted(edges(m)):
            if color.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(graph):
        if m not in color:
            found = visit(m)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle():
    graph = _imports(_modules())
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph) or [])}"


def test_cycle_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.x"}, "p.x": {"q"}, "q": set()}) is None  # a package re-exporting its submodule


ABOVE_SOLVERS = ("sdeflow.integrate", "sdeflow.parallel", "sdeflow.sampling", "sdeflow.likelihood", "sdeflow.cli")


def test_solver_layer_imports_nothing_above_itself():
    graph = _imports(_modules())
    bad = {
        m: sorted(d for d in deps if d.startswith(ABOVE_SOLVERS))
        for m, deps in graph.items()
        if m.startswith("sdeflow.solvers")
    }
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def _sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text()) for p in PKG.rglob("*.py")]


def test_no_mode_strings_or_dispatch_on_names():
    """Drivers dispatch on capability types, never on a ``mode`` string or a solver's ``name``."""
    pattern = re.compile(r"\.mode\s*[=!]=|\bmode\s*=\s*\"(fixed|adaptive|external)\"|\.name\s*[=!]=\s*[\"']")
    hits = [
        f"{p.name}:{i + 1}" for p, src in _sources() for i, line in enumerate(src.splitlines()) if pattern.search(line)
    ]
    assert not hits, hits


def test_type_ignores_carry_a_reason():
    pattern = re.compile(r"#\s*type:\s*ignore(?:\[[^\]]*\])?+(?!\s*#\s*\S)")
    hits = [
        f"{p.name}:{i + 1}" for p, src in _sources() for i, line in enumerate(src.splitlines()) if pattern.search(line)
    ]
    assert not hits, hits


def test_no_private_names_imported_across_modules():
    hits = []
    for p, src in _sources():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("sdeflow")):
                hits += [
                    f"{p.name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "__version__"
                ]
    assert not hits, hits


@pytest.mark.parametrize("module", ["sdeflow", "sdeflow.solvers", "sdeflow.sampling", "sdeflow.parallel"])
def test_public_modules_import(module):
    __import__(module)


def test_import_sdeflow_stays_light():
    """`import sdeflow` loads no optional or heavy dependency (the measured import time is in docs/architecture.md)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; before = set(sys.modules); import sdeflow; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = {"scipy", "torchdiffeq", "torchsde", "tqdm", "matplotlib", "sklearn", "diffusers", "numpy"} & set(out)
    assert not heavy, f"import sdeflow pulled in {sorted(heavy)}"
