"""The package's import graph (module-level and function-level imports alike) has no cycle, and its layers import
only downwards: data <- models <- evaluation <- methods, so the folder listing shows which way imports flow."""
import ast
from pathlib import Path

import spatialstudy

PACKAGE = Path(spatialstudy.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute module of a `from ... import` (relative imports counted from `here`)."""
    if not node.level:
        return node.module or ""
    base = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(tree: ast.AST, here: str, is_package: bool, modules: set[str]) -> set[str]:
    """spatialstudy modules a file imports; `from pkg import sub` counts as importing the submodule pkg.sub."""
    out = set()
    for node in ast.walk(tree):  # walk: imports inside functions count as much as those at the top
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node, here, is_package)
            out |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names}
    return {m for m in out if m in modules and m != here}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _targets(ast.parse(p.read_text()), m, p.name == "__init__.py", set(files)) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_finder_names_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_function_level_imports_are_edges_too():
    tree = ast.parse("def f():\n    from spatialstudy import runs\n    import spatialstudy.models.qwen\n")
    mods = {"spatialstudy.runs", "spatialstudy.models.qwen", "spatialstudy.x"}
    assert _targets(tree, "spatialstudy.x", False, mods) == {"spatialstudy.runs", "spatialstudy.models.qwen"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Each layer (a sub-package) may import only from the layers listed before it and from the shared top-level modules.
LAYERS = ["spatialstudy.data", "spatialstudy.models", "spatialstudy.evaluation", "spatialstudy.methods"]
# Top-level modules every layer may use; they import no layer themselves (run.py, the runner, reaches the methods
# through PY_STAGES strings, not imports).
SHARED = ["spatialstudy.runs", "spatialstudy.scoring", "spatialstudy.plotting", "spatialstudy.configs"]


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Edges that go up a layer (or sideways from a shared top-level module into a layer)."""
    bad = []
    for m, targets in sorted(graph.items()):
        here = _layer(m)
        if here is None and m not in SHARED:
            continue  # spatialstudy, spatialstudy.run: above everything
        allowed = LAYERS[: LAYERS.index(here) + 1] if here else []
        bad += [f"{m} -> {t}" for t in sorted(targets) if _layer(t) is not None and _layer(t) not in allowed]
    return bad


def test_every_module_is_walked():
    graph = import_graph()
    assert {"spatialstudy.models.qwen", "spatialstudy.evaluation.eval", "spatialstudy.methods.baseline",
            "spatialstudy.data.generator", "spatialstudy.run"} <= set(graph)
    assert "spatialstudy.models.bases" in graph["spatialstudy.evaluation.eval"]  # a function-level import


def test_the_layering_check_names_an_upward_import():
    graph = {"spatialstudy.models.qwen": {"spatialstudy.evaluation.eval"}, "spatialstudy.runs": {"spatialstudy.data"},
             "spatialstudy.methods.x": {"spatialstudy.models.qwen", "spatialstudy.runs"}}
    assert layering_violations(graph) == ["spatialstudy.models.qwen -> spatialstudy.evaluation.eval",
                                          "spatialstudy.runs -> spatialstudy.data"]


def test_layers_import_only_downwards():
    bad = layering_violations(import_graph())
    assert not bad, "upward imports: " + "; ".join(bad)


def test_shared_modules_and_layers_exist():
    for name in LAYERS:
        assert (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists(), name
    for name in SHARED:
        assert (PACKAGE.parent / (name.replace(".", "/") + ".py")).exists(), name
