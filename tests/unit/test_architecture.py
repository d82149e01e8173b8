"""The package's layering: no import cycles (imports inside functions count; those under
``if TYPE_CHECKING:`` do not run and do not), no module over the size a reader can hold, one
recipe per algorithm in the registry table, and the CLI module stays thin."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_rlhf"
MAX_LINES = 400


def _modules() -> Dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_imports(tree: ast.AST):
    """Import nodes that execute (anything under ``if TYPE_CHECKING:`` is left out)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package modules it imports (the deepest module each import names)."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("nemo_rlhf"):
                    graph[name].add(target)
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_find_cycles_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_sees_function_level_imports():
    graph = import_graph()
    # nemo_rlhf/runner.py imports interop.formats inside run(): the walk must see it
    assert "nemo_rlhf.interop.formats" in graph["nemo_rlhf.runner"]
    assert "nemo_rlhf.recipes.registry" in graph["nemo_rlhf.train"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in nemo_rlhf:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_checkpoint_layer_does_not_import_interop():
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("nemo_rlhf.interop"))
                 for m, ts in graph.items() if m.startswith("nemo_rlhf.checkpoint")}
    assert not any(offenders.values()), offenders


def test_errors_module_is_at_the_bottom():
    assert import_graph()["nemo_rlhf.errors"] == set()


@pytest.mark.parametrize("name,path", sorted(_modules().items()))
def test_module_size(name, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (> {MAX_LINES}): split it along a concept"


def test_every_algorithm_is_one_registry_row_with_its_recipe_file():
    from nemo_rlhf.recipes.registry import RECIPES

    recipe_files = {p.stem for p in (PACKAGE / "recipes").glob("*.py")} - {"__init__", "common", "registry"}
    assert recipe_files == {r.module.__name__.rsplit(".", 1)[1] for r in RECIPES.values()}
    for name, recipe in RECIPES.items():
        assert callable(recipe.module.prepare) and callable(recipe.module.build), name
        if recipe.block:
            assert recipe.module.Config.__doc__, f"{name}: its config block needs a docstring"


def test_train_module_is_the_cli_only():
    tree = ast.parse((PACKAGE / "train.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions <= {"main", "_hydra_main"}, functions
    assert len((PACKAGE / "train.py").read_text().splitlines()) < 80
