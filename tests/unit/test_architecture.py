"""The layout's rules, checked on the source (static import graph, AST):

- no import cycles among the project's modules (imports under ``if TYPE_CHECKING:`` excluded:
  they never run);
- ``estimator`` never imports ``proxy``, aiohttp or prometheus_client;
- nothing in ``proxy`` or ``estimator`` imports ``proxy.programs`` (the programs are leaves);
- only ``proxy.telemetry`` declares ``rightsizer_*`` metrics (the emulated engine's own
  ``vllm:*`` metrics are the engine's, not ours);
- tests never import ``bench``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "estimator")
METRIC_CALLS = frozenset({"Counter", "Gauge", "Histogram", "Summary", "GaugeMetricFamily",
                          "CounterMetricFamily", "HistogramMetricFamily", "GaugeRow",
                          "BulkHistogram"})  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def graph() -> dict[str, set[str]]:
    """Module -> the modules importing it runs: each target, and the target's packages
    (importing a.b.c runs a/__init__ and a/b/__init__ first) except the importer's own
    packages, which are already initialising (a package importing its submodules is fine)."""
    mods = modules()
    known = set(mods)
    g: dict[str, set[str]] = {}
    for n, p in mods.items():
        edges = set()
        for t in imports(n, p, known):
            edges.add(t)
            edges |= (_ancestors(t) & known) - _ancestors(n) - {n}
        g[n] = edges
    return g


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycle = [*path[path.index(m) :], m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)


def _all_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_estimator_stands_alone() -> None:
    for path in (ROOT / "estimator").rglob("*.py"):
        for name in _all_imports(path):
            top = name.split(".")[0]
            assert top not in ("proxy", "aiohttp", "prometheus_client"), f"{path}: {name}"


def test_programs_are_leaves() -> None:
    for name, path in modules().items():
        if name.startswith("proxy.programs") or name == "proxy.__main__":
            continue
        for imported in _all_imports(path):
            assert not imported.startswith("proxy.programs"), f"{path} imports {imported}"


def test_only_telemetry_declares_metrics() -> None:
    allowed = {ROOT / "proxy" / "telemetry.py", ROOT / "proxy" / "programs" / "emulator.py"}
    for path in (ROOT / "proxy").rglob("*.py"):
        if path in allowed:
            continue
        for name in _all_imports(path):  # the exposition parser reads metrics, never declares
            assert (
                not name.startswith("prometheus_client")
                or name == "prometheus_client.parser"
                or name == "prometheus_client"
            ), f"{path} imports {name}"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
                declared = {a.name for a in node.names} & METRIC_CALLS
                assert not declared, f"{path}:{node.lineno} imports {declared}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in METRIC_CALLS, f"{path}:{node.lineno} declares a metric"
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert not node.value.startswith("rightsizer_"), (
                    f"{path}:{node.lineno} names a metric ({node.value})"
                )


def test_tests_never_import_bench() -> None:
    for path in (ROOT / "tests").rglob("*.py"):
        if path == Path(__file__).resolve():
            continue  # this checker names what it looks for
        for name in _all_imports(path):
            assert name.split(".")[0] != "bench", f"{path} imports {name}"
        assert '/ "bench"' not in path.read_text().replace("'", '"'), f"{path} reaches bench/"
