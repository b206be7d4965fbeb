"""The packages import only downward, through the layers declared below, and the module graph has no cycles.

Every import counts, also those inside functions (a cycle closed by a late import is still two modules that
need each other); imports under ``if TYPE_CHECKING:`` do not. The command lines' registration pattern (the
``cli`` package imports its command modules, which import ``app`` from it) is the one allowed loop.

``LAYERS`` is the one place the layer order is written (docs/design.md draws it): for each package, its
sub-packages and top-level modules from the lowest layer up. A module may import its own layer and the layers
below it; wadi_probe as a whole sits below wadi_distill and never imports it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wadi_probe", "wadi_distill")

#: package -> its layers, lowest first: (layer name, the sub-packages / top-level modules in it). "__init__" is the
#: package's own ``__init__`` (its lazy re-exports), which sits at the top.
LAYERS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "wadi_probe": [
        ("foundation", ("errors", "lazy", "choices", "console", "device", "heap", "builtins", "text")),  # shared by both
        ("math", ("rotation", "chance", "decompose")),
        ("files", ("io",)),
        ("pairing", ("pairing", "layers")),
        ("report", ("report",)),  # the Report data, its summary and plots
        ("analysis", ("analyze", "hybrid")),
        ("commands", ("cli", "__init__")),
    ],
    "wadi_distill": [
        ("math", ("schedules",)),  # pure formulas: the noise schedules
        ("images", ("image_grid",)),  # image grids written to files
        ("world", ("builtin",)),  # the built-in digits world: model, data, classifier, shipped weights
        ("method", ("lorad",)),  # LoRaD: config, layers, injection, adapter files
        ("export", ("export",)),  # a merged student from the teacher's files and an adapter (the loop writes one)
        ("planning", ("plan",)),  # which layers get which rank
        ("teachers", ("teachers",)),
        ("training", ("vsd",)),  # the VSD loop and its student kinds
        ("use", ("request_size", "one_step", "sample", "single_file", "transfer", "lora_extract", "evaluate",
                 "evaluation")),  # sampling, export and evaluation of trained students
        ("demo", ("digits_demo",)),  # the end-to-end demo, metric sanity checks, the digits teacher's training
        ("commands", ("cli", "__init__")),
    ],
}

#: Imports that break the layer order today and are removed by the other half of the same refactoring (the noise
#: schedule moved to the math layer; the VSD loop importing nothing above it). (importer, imported) -> why. The
#: test fails once an entry is no longer needed, so this list only shrinks; it must end empty.
KNOWN_LAYER_VIOLATIONS: dict[tuple[str, str], str] = {}


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


def _unit(module: str) -> tuple[str, str]:
    """(package, the sub-package or top-level module that holds ``module``, "__init__" for the package itself)."""
    package, _, rest = module.partition(".")
    return package, rest.split(".")[0] if rest else "__init__"


def _layer_index() -> dict[tuple[str, str], tuple[int, str]]:
    return {(package, unit): (depth, name) for package, layers in LAYERS.items()
            for depth, (name, units) in enumerate(layers) for unit in units}


def _layer_violations(graph: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(importer, imported, sentence) for every import of a higher layer of the same package."""
    index = _layer_index()
    found = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            (package, unit), (target_package, target_unit) = _unit(module), _unit(target)
            if package != target_package or unit == target_unit:
                continue
            (depth, layer), (target_depth, target_layer) = index[package, unit], index[package, target_unit]
            if target_depth > depth:
                found.append((module, target, f"{module} (layer {layer}) imports {target} (layer {target_layer}, "
                                              "higher): a layer may import only its own layer and those below"))
    return found


def test_every_package_and_top_level_module_has_a_layer():
    index = _layer_index()
    missing = sorted({"{}.{}".format(*_unit(m)) for m in _graph() if _unit(m) not in index})
    assert missing == [], f"not in any layer of LAYERS in tests/test_import_graph.py: {', '.join(missing)}"
    declared = [f"{p}.{u}" for p, u in index if u != "__init__" and not (ROOT / p / u).is_dir()
                and not (ROOT / p / f"{u}.py").is_file()]
    assert declared == [], f"LAYERS names what does not exist: {', '.join(declared)}"


def test_layers_import_only_downward():
    violations = _layer_violations(_graph())
    unexpected = [sentence for module, target, sentence in violations if (module, target) not in KNOWN_LAYER_VIOLATIONS]
    assert unexpected == [], "\n".join(unexpected)
    stale = sorted(set(KNOWN_LAYER_VIOLATIONS) - {(module, target) for module, target, _ in violations})
    assert stale == [], f"no longer violations, remove them from KNOWN_LAYER_VIOLATIONS: {stale}"


def test_the_layer_check_names_both_modules():
    graph = {"wadi_distill.lorad.model": {"wadi_distill.plan.plan", "wadi_distill.lorad.config"},
             "wadi_distill.plan.plan": {"wadi_distill.lorad.config"}, "wadi_distill.lorad.config": set()}
    assert _layer_violations(graph) == [(
        "wadi_distill.lorad.model", "wadi_distill.plan.plan",
        "wadi_distill.lorad.model (layer method) imports wadi_distill.plan.plan (layer planning, higher): a layer may "
        "import only its own layer and those below")]
    with pytest.raises(KeyError):  # a module of no layer cannot slip through
        _layer_violations({"wadi_distill.nowhere": {"wadi_distill.plan.plan"}})


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
