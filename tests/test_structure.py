"""The code's shape: lib modules import each other without cycles, and no function in scripts/
takes more than six parameters (helpers take the run object instead of long lists). Read with ast,
nothing imported."""
from __future__ import annotations

import ast

from conftest import REPO

MAX_PARAMS = 6


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


def test_no_function_in_scripts_takes_more_than_six_parameters():
    long = []
    for path in sorted((REPO / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                if n > MAX_PARAMS:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n})")
    assert not long, "functions with more than 6 parameters: " + ", ".join(long)


def test_train_main_is_short():
    tree = ast.parse((REPO / "scripts" / "train.py").read_text(encoding="utf-8"))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 120
