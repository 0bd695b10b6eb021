"""keras_carp's own import graph: no cycle, and nothing below the model imports the layers built on it.

Every module of the package is parsed with ``ast`` (nothing is imported), and
every import statement counts, at module level and inside functions and
methods alike, except those under ``if TYPE_CHECKING:`` (never run).
``importlib.import_module`` calls count too: in a module that makes one, a
string naming a keras_carp module is an import of it, and an f-string whose
text starts with ``"<package>."`` imports every module of that package.
Importing ``a.b.c`` also runs the ``__init__`` of each package on the way
(``a.b``), except the importer's own packages, which are already running.

Layering: ``keras_carp.model`` (the ``CARP`` model and its train step) sits
below the callbacks (``keras_carp.callbacks``), the SavedModel export
(``keras_carp.export``) and the evaluation protocols
(``keras_carp.evaluation``), which all take a model; the model must not import
any of them, directly or through another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "keras_carp"
PACKAGE_DIR = Path(__file__).resolve().parents[2] / PACKAGE
MODEL = "keras_carp.model"
ABOVE_MODEL = ("keras_carp.callbacks", "keras_carp.export", "keras_carp.evaluation")


# ------------------------------------------------------------------------------------------------- the graph
def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.AST]:
    """Import statements and expressions anywhere in ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.Constant, ast.JoinedStr, ast.Call)):
            found.append(node)
        if not isinstance(node, ast.JoinedStr):
            stack.extend(ast.iter_child_nodes(node))
    return found


def _calls_import_module(nodes: list[ast.AST]) -> bool:
    for node in nodes:
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name == "import_module":
                return True
    return False


def _targets(module: str, is_package: bool, node: ast.AST, modules: set[str], dynamic: bool) -> set[str]:
    """The package's modules that ``node`` (in ``module``) imports by name."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the importer's package, up level - 1
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        names = {f"{source}.{alias.name}" for alias in node.names}
        return {name for name in names if name in modules} | {source}  # `from a import b`: a, and a.b if a module
    if dynamic and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
        return {node.value}
    if dynamic and isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        prefix = str(node.values[0].value)
        if prefix.endswith(".") and prefix[:-1] in modules:
            return {name for name in modules if name.startswith(prefix) and "." not in name[len(prefix) :]}
    return set()


def _with_packages(target: str, importer: str, modules: set[str]) -> set[str]:
    """``target`` and the packages whose ``__init__`` importing it runs (not the importer's own)."""
    parts = target.split(".")
    own = {".".join(importer.split(".")[:i]) for i in range(1, importer.count(".") + 2)}
    chain = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return {name for name in chain if name in modules and name not in own}


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any level of the file)."""
    files = module_files(package_dir)
    names = set(files)
    graph = {}
    for module, path in files.items():
        nodes = _import_nodes(ast.parse(path.read_text(), filename=str(path)))
        dynamic = _calls_import_module(nodes)
        edges: set[str] = set()
        for node in nodes:
            for target in _targets(module, path.name == "__init__.py", node, names, dynamic):
                edges |= _with_packages(target, module, names)
        edges.discard(module)
        graph[module] = edges
    return graph


# ----------------------------------------------------------------------------------------------- the checks
def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); each component's modules sorted, components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _path(graph: dict[str, set[str]], start: str, goal: str, within: set[str]) -> list[str] | None:
    """A shortest path start -> ... -> goal through ``within`` (breadth first)."""
    previous = {start: None}
    queue = [start]
    for node in queue:
        for child in sorted(graph.get(node, ())):
            if child == goal:
                path = [child, node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1]
            if child in within and child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one; [] for an acyclic graph."""
    cycles = []
    for component in strongly_connected_components(graph):
        members = set(component)
        first = component[0]
        if len(component) > 1 or first in graph.get(first, ()):
            cycles.append(_path(graph, first, first, members))
    return cycles


def count_simple_cycles(graph: dict[str, set[str]]) -> int:
    """The number of elementary cycles (each counted once, from its smallest module): for the report."""
    order = {name: i for i, name in enumerate(sorted(graph))}
    total = 0
    for component in strongly_connected_components(graph):
        members = set(component)
        for start in component:
            allowed = {name for name in members if order[name] >= order[start]}
            stack = [(start, iter(sorted(graph.get(start, set()) & allowed)))]
            on_path = {start}
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    on_path.discard(node)
                elif child == start:
                    total += 1
                elif child not in on_path:
                    on_path.add(child)
                    stack.append((child, iter(sorted(graph.get(child, set()) & allowed))))
    return total


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports directly or transitively -> one import chain from ``start`` to it."""
    chains = {start: [start]}
    queue = [start]
    for node in queue:
        for child in sorted(graph.get(node, ())):
            if child not in chains:
                chains[child] = [*chains[node], child]
                queue.append(child)
    del chains[start]
    return chains


def _above(name: str, above: tuple[str, ...]) -> bool:
    return any(name == top or name.startswith(top + ".") for top in above)


def upward_imports(graph: dict[str, set[str]], low: str = MODEL, above: tuple[str, ...] = ABOVE_MODEL) -> list:
    """Imports ``(importer, imported)`` from ``low`` or a module below it into a layer ``above`` it."""
    below = {low, *reachable(graph, low)}
    return sorted((node, child) for node in below if not _above(node, above) for child in graph.get(node, ())
                  if _above(child, above))  # fmt: skip


def describe(graph: dict[str, set[str]]) -> str:
    """The report: sizes, cycles (each group of modules that import one another, and one cycle in it), upward
    imports."""
    groups = [c for c in strongly_connected_components(graph) if len(c) > 1 or c[0] in graph.get(c[0], ())]
    upward = upward_imports(graph)
    lines = [f"{len(graph)} modules, {sum(map(len, graph.values()))} imports; {count_simple_cycles(graph)} "
             f"cycle(s) in {len(groups)} group(s) of modules; {len(upward)} upward import(s)"]  # fmt: skip
    for group, cycle in zip(groups, find_cycles(graph)):
        lines.append(f"cycle group ({', '.join(group)}), e.g. " + " -> ".join(cycle))
    lines += [f"upward: {importer} imports {imported}" for importer, imported in upward]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the tests
def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert {"keras_carp", MODEL, "keras_carp.callbacks", "keras_carp.data", "keras_carp.evaluation.knn"} <= set(graph)
    assert "keras_carp.schedules" in graph[MODEL]  # module level
    assert "keras_carp.evaluation.knn" in graph["keras_carp.callbacks"]  # inside a method
    assert "keras_carp.evaluation" in graph["keras_carp.callbacks"]  # the package's __init__ runs first
    assert "keras_carp.data.sources" not in graph["keras_carp.callbacks"]  # only under TYPE_CHECKING
    assert {"keras_carp.backends.jax", "keras_carp.backends.torch"} <= graph["keras_carp.backends"]  # importlib
    assert "keras_carp.data.pipeline" in graph["keras_carp.data"]  # the lazy names' modules


def test_no_import_cycle(capsys):
    graph = import_graph()
    with capsys.disabled():
        print(f"\nkeras_carp import graph: {describe(graph)}")
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s) in keras_carp:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_model_imports_nothing_built_on_it():
    graph = import_graph()
    chains = reachable(graph, MODEL)
    bad = {name: chain for name, chain in chains.items() if _above(name, ABOVE_MODEL)}
    assert not bad, "keras_carp.model imports layers above it:\n" + "\n".join(
        " -> ".join(chain) for chain in bad.values()
    )
    assert not upward_imports(graph)


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c", "a"]]),
        ({"a": {"a"}}, [["a", "a"]]),
        ({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}, [["c", "d", "c"], ["a", "b", "a"]]),
    ],
)
def test_the_cycle_search_finds_planted_cycles(graph, expected):
    assert find_cycles(graph) == expected
    assert count_simple_cycles(graph) == len(expected)


def test_the_checks_fail_on_a_planted_cycle_and_an_upward_import(tmp_path):
    """The whole chain, on files: a tiny package with a cycle through a function-level import."""
    package = tmp_path / "keras_carp"
    (package / "evaluation").mkdir(parents=True)
    (package / "__init__.py").write_text("from keras_carp import model\n")
    (package / "schedules.py").write_text("import math\n")
    (package / "model.py").write_text("from keras_carp.schedules import *\n\ndef f():\n    from . import helpers\n")
    (package / "helpers.py").write_text("from keras_carp.evaluation.knn import knn\nimport keras_carp.model\n")
    (package / "evaluation" / "__init__.py").write_text("")
    (package / "evaluation" / "knn.py").write_text("def knn():\n    pass\n")
    graph = import_graph(package)
    assert graph["keras_carp.model"] == {"keras_carp.schedules", "keras_carp.helpers"}
    assert graph["keras_carp.helpers"] == {"keras_carp.evaluation", "keras_carp.evaluation.knn", "keras_carp.model"}
    assert find_cycles(graph) == [["keras_carp.helpers", "keras_carp.model", "keras_carp.helpers"]]
    assert upward_imports(graph) == [("keras_carp.helpers", "keras_carp.evaluation"),
                                     ("keras_carp.helpers", "keras_carp.evaluation.knn")]  # fmt: skip
    assert reachable(graph, MODEL)["keras_carp.evaluation.knn"] == [MODEL, "keras_carp.helpers",
                                                                   "keras_carp.evaluation.knn"]  # fmt: skip
