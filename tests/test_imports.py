"""The package's import graph (module-level and function-level imports alike) has no cycle."""
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
    tree = ast.parse("def f():\n    from spatialstudy import runs\n    import spatialstudy.models\n")
    mods = {"spatialstudy.runs", "spatialstudy.models", "spatialstudy.x"}
    assert _targets(tree, "spatialstudy.x", False, mods) == {"spatialstudy.runs", "spatialstudy.models"}


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
