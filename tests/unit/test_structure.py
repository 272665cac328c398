"""The shape of proxy/, read from its source with ``ast``: no import cycle, only the entry points import the
process object, the runtime never loads the development tooling, no function or class grows long, and
docs/architecture.md names only what exists.

Imports count wherever they stand: at module level, under ``if TYPE_CHECKING:`` and inside function bodies.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "proxy"

# The process object: only the entry points that run it may import it (the rest get proxy/context.py).
PROCESS = "proxy.server"
ENTRY_POINTS = frozenset({"proxy.__main__", "proxy.dev.demo"})
# Development tooling (throwaway clusters, test helpers, the demo): never loaded by the proxy itself. The
# command line loads the demo only inside its ``demo`` command.
DEV_TOOLING = frozenset({"proxy.dev.cluster", "proxy.dev.testing", "proxy.dev.demo"})

MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 400
# Today's offenders, "path::qualified name": their line counts (the ``def``/``class`` line to the last
# line) may only shrink. Remove an entry once it is within the limit; never add one.
LONG_FUNCTIONS: dict[str, int] = {}
LONG_CLASSES: dict[str, int] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the proxy module it names
    lazy: bool  # inside a function body (runs on call, not on import)
    line: int


def modules(compiled: bool = False) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py);
    ``compiled``: the Cython ones (.pyx) too, so that an import of one resolves to it, not to its package."""
    found = {}
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.rglob("*.pyx") if compiled else [])]):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The innermost known module a dotted name lies in (``proxy.pool.Pool`` -> ``proxy.pool``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports_of(module: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST, lazy: bool) -> Iterator[Import]:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import name``: the submodule pkg.name when there is one, else pkg itself.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                yield Import(module, target, lazy, getattr(node, "lineno", 0))
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text(), str(path)), False)


def import_graph() -> dict[str, list[Import]]:
    """Who imports whom. The compiled module's own imports are not read (proxy/protocol/scan.pyx imports
    proxy.errors only)."""
    known = modules(compiled=True)
    return {
        module: list(_imports_of(module, path, known)) if path.suffix == ".py" else []
        for module, path in known.items()
    }


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The import cycles, each as a closed path of modules: for every module that lies on one, the shortest
    cycle through it (one listing per cycle)."""
    edges = {module: sorted({i.target for i in imports}) for module, imports in graph.items()}
    found: dict[frozenset[tuple[str, str]], list[str]] = {}
    for component in _components(edges):
        for start in sorted(component):
            cycle = _shortest_cycle(start, component, edges)
            found.setdefault(frozenset(itertools.pairwise(cycle)), cycle)
    return list(found.values())


def _components(edges: dict[str, list[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return components


def _shortest_cycle(start: str, component: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest path from ``start`` back to itself inside its component (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w in component and w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is on no cycle of {sorted(component)}")


def test_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles in proxy/:\n" + "\n".join(" -> ".join(c) for c in found)


def test_cycle_finder_reports_a_cycle() -> None:
    """The check above can fail: a made-up graph with a cycle through three modules is reported."""
    graph = {
        name: [Import(name, target, False, 1) for target in targets]
        for name, targets in {"a": ["b"], "b": ["c", "a"], "c": ["a", "d"], "d": []}.items()
    }
    assert cycles(graph) == [["a", "b", "a"], ["c", "a", "b", "c"]]


def test_only_entry_points_import_the_process() -> None:
    importers = {i.source for imports in import_graph().values() for i in imports if i.target == PROCESS}
    assert importers <= ENTRY_POINTS, f"import {PROCESS}: {sorted(importers - ENTRY_POINTS)}"


def test_runtime_does_not_load_dev_tooling() -> None:
    wrong = [
        f"{i.source}:{i.line} imports {i.target}"
        for imports in import_graph().values()
        for i in imports
        if i.target in DEV_TOOLING
        and i.source not in DEV_TOOLING
        and not (i.source == "proxy.__main__" and i.lazy)
    ]
    assert not wrong, "the runtime imports development tooling:\n" + "\n".join(wrong)


def definitions() -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, int]]:
    """Every function and class of the package: "path::qualified name", its node, its line count."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                yield name, child
                yield from walk(child, f"{name}.")
            else:
                yield from walk(child, prefix)

    for path in sorted(PACKAGE.rglob("*.py")):
        for name, node in walk(ast.parse(path.read_text(), str(path)), ""):
            assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            assert node.end_lineno is not None
            yield f"{path.relative_to(ROOT)}::{name}", node, node.end_lineno - node.lineno + 1


def _over_limit(kind: type[ast.AST] | tuple[type[ast.AST], ...], limit: int) -> dict[str, int]:
    return {key: lines for key, node, lines in definitions() if isinstance(node, kind) and lines > limit}


def _ratchet(found: dict[str, int], allowed: dict[str, int], limit: int, what: str) -> list[str]:
    problems = []
    for key, lines in sorted(found.items()):
        if key not in allowed:
            problems.append(f"new {what} over {limit} lines: {key} ({lines} lines)")
        elif lines > allowed[key]:
            problems.append(f"{what} grew: {key} ({allowed[key]} -> {lines} lines)")
    for key in sorted(allowed.keys() - found.keys()):
        problems.append(f"{what} now within {limit} lines (or gone): remove {key} from the list")
    return problems


def test_no_function_grows_past_the_limit() -> None:
    found = _over_limit((ast.FunctionDef, ast.AsyncFunctionDef), MAX_FUNCTION_LINES)
    problems = _ratchet(found, LONG_FUNCTIONS, MAX_FUNCTION_LINES, "function")
    assert not problems, "\n".join(problems)


def test_no_class_grows_past_the_limit() -> None:
    problems = _ratchet(_over_limit(ast.ClassDef, MAX_CLASS_LINES), LONG_CLASSES, MAX_CLASS_LINES, "class")
    assert not problems, "\n".join(problems)


# -- docs/architecture.md names only what exists ---------------------------------------------------------
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# Names in backticks there that are not ours: PostgreSQL's (protocol messages, parser nodes, functions,
# catalogs), Python's, PgBouncer's (its users file format), and the proxy's names in SQL and in its
# ParameterStatus.
NOT_OURS = frozenset(
    {
        "A_Const",
        "CloseComplete",
        "FunctionCall",
        "ParseComplete",
        "ReadyForQuery",
        "RevalidateCachedQuery",
        "TYPE_CHECKING",
        "parafort.write_lsn",
        "parafort_migration",
        "pg_proc",
        "set_config",
        "userlist.txt",
    }
)
_CODE_NAME = re.compile(r"[A-Za-z_]\w*(?:\.\w+)*")
_FILE_NAME = re.compile(r"[\w.-]+\.(?:py|pyx|pyi|txt|yaml|toml)")


def defined_names() -> set[str]:
    """Every name proxy/ and bench/ define: functions, classes, assignment and annotation targets
    (module, class and ``self.`` attributes), and the compiled scanners' functions."""
    names: set[str] = set()
    for path in [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "bench").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = [t for target in node.targets for t in ast.walk(target)]
            elif isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute):
                    names.add(target.attr)
    for path in sorted(PACKAGE.rglob("*.pyx")):
        names.update(re.findall(r"^c?p?def\s+(?:[\w\[\]]+\s+)*?(\w+)\s*\(", path.read_text(), re.M))
    return names


def test_architecture_names_only_what_exists() -> None:
    """Every function, class, attribute or file that docs/architecture.md names in backticks exists: a
    rename or a removal updates the tour too."""
    names = defined_names() | {f"parafort_proxy_{metric}" for metric in _metric_names()}
    files = {path.name for path in ROOT.rglob("*") if ".venv" not in path.parts and ".git" not in path.parts}
    stale = set()
    for quoted in re.findall(r"`([^`\n]+)`", ARCHITECTURE.read_text()):
        token = quoted.strip().removesuffix("()")
        if token in NOT_OURS:
            continue
        if _FILE_NAME.fullmatch(token):
            if token not in files:
                stale.add(token)
        elif _CODE_NAME.fullmatch(token) and _looks_like_code(token) and token.split(".")[-1] not in names:
            stale.add(token)
    assert not stale, f"docs/architecture.md names what does not exist: {sorted(stale)}"


def _looks_like_code(token: str) -> bool:
    """A dotted or snake_case name, or a CamelCase one (an SQL keyword or a plain word is not checked)."""
    return "_" in token or "." in token or re.search(r"[a-z][A-Z]", token) is not None


def _metric_names() -> set[str]:
    """The metric names proxy/metrics.py declares, without the ``parafort_proxy_`` prefix, each also with
    the ``_total`` a counter's samples carry."""
    found = set(re.findall(r'"([a-z_]+)"', (PACKAGE / "metrics.py").read_text()))
    return found | {f"{name}_total" for name in found}
