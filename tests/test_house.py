"""The house rules that keep the code readable, checked on the source with ``ast`` so they stay true.

* No import cycle among ``src/littune`` modules, counting imports inside functions too (a cycle
  hidden in a function is still a cycle). A package importing its own children is not a cycle.
* No module over 400 lines and no function over 60 lines.
"""

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parents[1] / "src" / "littune"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(SRC.rglob("*.py"))}


def _imported(name: str, path: Path, tree: ast.Module, modules: set[str]) -> set[str]:
    """The littune modules ``name`` imports anywhere in its body (``from pkg import mod`` counts both)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m != name and not m.startswith(name + ".")}


def import_graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imported(name, path, tree, set(sources)) for name, (path, tree) in sources.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(u: str) -> None:
        index[u] = low[u] = len(index)
        stack.append(u)
        on_stack.add(u)
        for v in sorted(graph[u]):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in on_stack:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == u:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for u in sorted(graph):
        if u not in index:
            visit(u)
    return groups


def oversized() -> list[str]:
    bad = []
    for name, (path, tree) in _sources().items():
        lines = path.read_text(encoding="utf-8").count("\n") + 1
        if lines > MAX_MODULE_LINES:
            bad.append(f"module {name}: {lines} lines > {MAX_MODULE_LINES}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"function {name}.{node.name} (line {node.lineno}): {n} lines > {MAX_FUNCTION_LINES}")
    return bad


def test_the_checker_finds_a_cycle_and_a_package_importing_its_children_is_none():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "littune.towers.base" in graph["littune.towers.image"]  # relative imports resolve
    assert "littune.inference.embeddings" in graph["littune.eval.zeroshot"]
    assert "littune.eval.zeroshot" in graph["littune.inference.mixin"]  # imports inside functions count


def test_no_import_cycle_among_littune_modules():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_over_400_lines_and_no_function_over_60():
    bad = oversized()
    assert not bad, "\n".join(bad)
