"""The code's shape: lib modules import each other without cycles. Read with ast, nothing
imported. (Readability is judged by reading: no rule here counts parameters or lines.)"""
from __future__ import annotations

import ast

from conftest import REPO


def lib_imports() -> dict[str, set[str]]:
    """lib module (dotted, below lib: "train.optim") -> the lib modules it imports (at any depth of
    the file: function-level imports count, since they run whenever that function does)."""
    lib = REPO / "lib"
    modules = {".".join(p.relative_to(lib).with_suffix("").parts): p for p in lib.rglob("*.py")
               if p.name != "__init__.py"}

    def resolve(base: str, names: list[str]) -> set[str]:  # `from lib.<base> import <names>`
        found = {f"{base}.{n}".lstrip(".") for n in names if f"{base}.{n}".lstrip(".") in modules}
        return found or ({base} if base in modules else set())

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and (node.module == "lib" or node.module.startswith("lib.")):
                found |= resolve(node.module[4:], [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                found |= {a.name[4:] for a in node.names if a.name[4:] in modules and a.name.startswith("lib.")}
        graph[name] = found - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once, as the list of modules around it."""
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle + [nxt])
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_lib_has_no_import_cycles():
    graph = lib_imports()
    assert sum("errors" in deps for deps in graph.values()) > 10  # the reader sees imports at all
    found = cycles(graph)
    assert not found, "import cycles in lib/: " + "; ".join(" -> ".join(c) for c in found)
