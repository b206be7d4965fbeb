"""The module graph of both packages has no cycles, and wadi_probe never imports wadi_distill.

Every import counts, also those inside functions (a cycle closed by a late import is still two modules that
need each other); imports under ``if TYPE_CHECKING:`` do not. The command lines' registration pattern (the
``cli`` package imports its command modules, which import ``app`` from it) is the one allowed loop.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wadi_probe", "wadi_distill")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(stmt.test) for node in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in files else node.module
                           for alias in node.names]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_outside_the_command_registration():
    graph = _graph()
    for package in PACKAGES:  # the cli package <-> its command modules is how typer apps register commands
        cli = f"{package}.cli"
        for module in graph:
            if module.startswith(cli + "."):
                graph[module].discard(cli)
    assert _cycles(graph) == []


def test_the_probe_does_not_import_the_distiller_and_the_graph_sees_real_edges():
    graph = _graph()
    assert not any(target.startswith("wadi_distill") for module, targets in graph.items()
                   if module.startswith("wadi_probe") for target in targets)
    # the walk finds the edges that matter (so the cycle test cannot pass on an empty graph)
    assert "wadi_probe.io.formats.adapters" in graph["wadi_probe.io.checkpoints"]
    assert "wadi_probe.rotation" in graph["wadi_distill.lorad.layer"]
    assert "wadi_distill.lorad.layer" in graph["wadi_distill.plan.models"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_the_distiller_imports_only_public_names_of_the_probe():
    private = []
    for path in (ROOT / "wadi_distill").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("wadi_probe"):
                names = node.module.split(".") + [alias.name for alias in node.names]
                if any(name.startswith("_") for name in names):
                    private.append(f"{path.relative_to(ROOT)}: from {node.module} import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import):
                private += [f"{path.relative_to(ROOT)}: import {a.name}" for a in node.names
                            if a.name.startswith("wadi_probe") and any(p.startswith("_") for p in a.name.split("."))]
    assert private == []
