"""lm-evaluation-harness task folders (eval.py --tasks_dir), read before the harness is given one.

A task YAML is more than data: `!function utils.proc` makes the harness import `utils.py` from the
YAML's folder and run it (to filter documents, build prompts, score answers). So a task folder
from elsewhere is code, and it is refused unless the user says it may run (`--allow_task_code`);
`audit.py --checks security --security.tasks_dir DIR` lists what a folder would run.

Each YAML is parsed here with a loader that records `!function` tags instead of importing
anything, and what the harness would fail on later with a traceback is named now: a file that
is not YAML, a local data file that is missing, a dataset that would be fetched from a hub (this
project runs offline: DEFERRED.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lib.errors import UserError

LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets builders that read local data_files


@dataclass
class TaskFile:
    """One task YAML: its task name(s), the code it would run, its data, or why it cannot be read."""

    path: Path
    tasks: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)  # the `!function module.name` it names
    config: dict = field(default_factory=dict)
    error: str | None = None


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns `!function x.y` into a marker string and records it."""


def _function(loader, node):
    name = loader.construct_scalar(node)
    loader.functions.append(name)
    return f"!function {name}"


_Loader.add_constructor("!function", _function)


def scan(tasks_dir: str | Path) -> list[TaskFile]:
    """Every .yaml/.yml under `tasks_dir` (sorted), parsed without running anything."""
    found = []
    for path in sorted(p for p in Path(tasks_dir).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()):
        entry = TaskFile(path)
        try:
            loader = _Loader(path.read_text(encoding="utf-8"))
            loader.functions = entry.functions
            try:
                config = loader.get_single_data()
            finally:
                loader.dispose()
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            entry.error = " ".join(str(exc).split())[:300]
        else:
            if isinstance(config, dict):
                entry.config = config
                names = config.get("task")
                entry.tasks = [names] if isinstance(names, str) else [n for n in names or [] if isinstance(n, str)]
            else:
                entry.error = "not a mapping of task settings"
        found.append(entry)
    return found


def _data_files(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _data_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _data_files(v)]
    return []


def data_problem(entry: TaskFile) -> str | None:
    """Why the harness could not read `entry`'s data offline, or None (a local builder whose
    data_files exist, a local dataset folder, or no dataset named)."""
    source = entry.config.get("dataset_path")
    if source is None:
        return None
    if not isinstance(source, str):
        return f"dataset_path {source!r} is not a name or a folder"
    if source in LOCAL_BUILDERS:
        files = _data_files((entry.config.get("dataset_kwargs") or {}).get("data_files"))
        if not files:
            return f"dataset_path {source} names no data_files (dataset_kwargs: data_files)"
        missing = [f for f in files if "*" not in f and not (Path(f).exists() or (entry.path.parent / f).exists())]
        return f"its data file {missing[0]} does not exist" if missing else None
    if Path(source).is_dir() or Path(entry.path.parent, source).is_dir():
        return None
    return (f"dataset_path {source} is neither a local folder nor a local builder ({', '.join(LOCAL_BUILDERS)}) with "
            "data_files: it would be fetched from the Hugging Face hub, and this project runs tasks offline; copy the "
            "data here and point the YAML at it")


def check(tasks_dir: str | Path, wanted, allow_code: bool) -> None:
    """Before the harness reads `tasks_dir`: a UserError when a YAML there runs code (`!function`)
    and `allow_code` is off, or when a task in `wanted` is defined there by a YAML whose data the
    harness could not read offline; a wanted task found nowhere here names the YAML files that
    could not be parsed (the harness drops those silently)."""
    entries = scan(tasks_dir)
    code = [e for e in entries if e.functions]
    if code and not allow_code:
        e = code[0]
        raise UserError(f"{e.path}: '!function {e.functions[0]}' would run {e.functions[0].rsplit('.', 1)[0]}.py from "
                        f"{e.path.parent} (task YAML files can run code from their folder"
                        + (f"; {len(code) - 1} other file(s) there do too" if len(code) > 1 else "")
                        + "); read it, then pass --allow_task_code to let it run")
    by_task = {t: e for e in entries for t in e.tasks}
    for task in wanted:
        entry = by_task.get(task)
        if entry is not None:
            problem = data_problem(entry)
            if problem:
                raise UserError(f"--tasks {task}: {entry.path}: {problem}")
    broken = [e for e in entries if e.error]
    unknown = [t for t in wanted if t not in by_task]
    if broken and unknown:
        raise UserError(f"--tasks {unknown[0]}: not defined by any readable YAML in {tasks_dir}; {broken[0].path} "
                        f"cannot be read ({broken[0].error})")


def task_manager(tasks, tasks_dir: Path | None, allow_code: bool):
    """The harness's TaskManager for `tasks` (its own tasks, and those of `tasks_dir`), each one
    checked before any model is given to it: the harness installed, the folder's code allowed, its
    data local, every task found. A UserError names what is missing."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--tasks needs lm-evaluation-harness: `make lm-eval` installs it against this venv's "
                        "versions (a plain pip install would replace the CPU torch)") from None
    import os

    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise UserError(f"--tasks_dir {tasks_dir}: no such folder")
    if tasks_dir is not None:  # before the harness reads it: code it would run, data it cannot read offline
        check(tasks_dir, tasks, allow_code)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # task data from local files; nothing fetched
    manager = TaskManager(include_path=str(tasks_dir) if tasks_dir else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks {unknown[0]}: no such task" + (f" in {tasks_dir} or" if tasks_dir else "")
                        + " among the harness's own")
    return manager


def run_tasks(model, tokenizer, tasks, manager, batch_size: int, quiet: bool = False) -> dict[str, dict]:
    """The harness's figures for each task on `model` (a loaded transformers model, in eval mode):
    task -> {"documents": n, metric: value, ...}, the metric names without the harness's filter.
    `quiet`: the harness's warnings are not shown (train.py runs the same tasks again and again)."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lib import errors

    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    if quiet:
        harness_log.setLevel(logging.ERROR)
    try:
        results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                          tasks=list(tasks), task_manager=manager)["results"]
    except (OSError, ConnectionError, ValueError) as exc:  # data the harness could not load (a hub name, a file)
        raise UserError(f"--tasks {' '.join(tasks)}: the harness could not load a task's data "
                        f"({errors.one_line(exc)[:300]}); tasks run offline, from local data files named in a "
                        "--tasks_dir YAML") from None
    finally:
        harness_log.setLevel(level)
    return {task: {"documents": found.get("sample_len"),
                   **{k.split(",")[0]: v for k, v in found.items() if "," in k and isinstance(v, (int, float))}}
            for task, found in results.items()}
