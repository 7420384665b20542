"""Instruction pairs every machine can make: each documented public function and method of
Python's own standard library, its signature as the question and its docstring's first
paragraph as the answer, one JSONL file per module (tokenize.py --corpus.split_by file then
holds whole modules out).

    write_pairs(Path("data/pairs-src"))   -> {"modules": 412, "pairs": 6051}

With `preferences`, preference pairs instead: the same question, its own answer as the chosen
response and the answer of the next function of the same module (in file order, wrapping round)
as the rejected one: a plausible answer about a neighbouring function, which a model prefers
less only if it ties the answer to the name and arguments asked about.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from lib.data.corpus import list_source_files, stdlib_root

MIN_ANSWER, MAX_ANSWER = 24, 400  # characters of the docstring's first paragraph kept as an answer


def _answer(doc: str | None) -> str | None:
    if not doc:
        return None
    first = re.sub(r"\s+", " ", doc.strip().split("\n\n")[0]).strip()
    return first if MIN_ANSWER <= len(first) <= MAX_ANSWER else None


def module_pairs(path: Path, module: str) -> list[dict]:
    """The pairs of one source file: top-level functions and the methods of top-level classes
    whose names do not start with an underscore, in file order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    found = []

    def add(node, owner: str) -> None:
        answer = _answer(ast.get_docstring(node))
        if answer is None or node.name.startswith("_"):
            return
        args = ast.unparse(node.args)
        found.append({"prompt": f"What does {module}.{owner}{node.name}({args}) do?", "completion": answer})

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(node, "")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(item, f"{node.name}.")
    return found


def preference_pairs(found: list[dict]) -> list[dict]:
    """{"prompt", "chosen", "rejected"} records from one module's pairs (see the module docstring);
    none from a module with one pair, none whose two answers are the same."""
    if len(found) < 2:
        return []
    out = []
    for i, p in enumerate(found):
        other = found[(i + 1) % len(found)]["completion"]
        if other != p["completion"]:
            out.append({"prompt": p["prompt"], "chosen": p["completion"], "rejected": other})
    return out


def write_pairs(out_dir: Path, preferences: bool = False) -> dict:
    """Write out_dir/<module>.jsonl for every standard-library module with pairs (preference pairs
    with `preferences`); the counts."""
    root = stdlib_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = pairs = 0
    for rel in list_source_files(root):
        module = rel[:-3].replace("/", ".").removesuffix(".__init__")
        found = module_pairs(root / rel, module)
        if preferences:
            found = preference_pairs(found)
        if found:
            (out_dir / f"{module}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in found), encoding="utf-8")
            modules, pairs = modules + 1, pairs + len(found)
    return {"modules": modules, "pairs": pairs}
