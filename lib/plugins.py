"""Plugin registries: named parts a user adds without editing lib, and a record of what failed to load.

A registry holds the implementations of one kind, the built-in ones first: learning-rate schedules
(lib.train.optim.SCHEDULES, used by train.py) and input-file readers by suffix (lib.data.sources.READERS, used
by tokenize.py to build a corpus). A plugin is a Python
module (a .py file or an importable name, given with --plugins, or an installed package's entry
point in the group `lm.plugins`) that registers more when imported:

    # my_schedules.py
    from lib.train.optim import SCHEDULES

    @SCHEDULES.register("inverse_sqrt")
    def inverse_sqrt(progress, cfg):          # the learning rate after warmup, progress 0 -> 1
        return cfg.lr / (1 + 9 * progress) ** 0.5

    python scripts/train.py --plugins my_schedules.py --optim.schedule inverse_sqrt ...

    # html_reader.py: tokenize.py --plugins html_reader.py --corpus.source pages/ reads pages/*.html
    import html, re
    from lib.data.sources import READERS

    @READERS.register(".html")
    def read_html(path):                      # (line or row number, or None for the whole file; text)
        yield None, html.unescape(re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))

A plugin that fails to import (a syntax error, a missing package, a name registered twice) does
not stop the script: load() records it, the script prints one warning line for it, asking for a
name it would have provided is an error that names the failure, and `audit.py --checks plugins`
lists every registry, where each entry came from, and the failures (exit 1).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lib.errors import UserError, one_line

ENTRY_POINT_GROUP = "lm.plugins"
REGISTRIES: dict[str, "Registry"] = {}  # kind -> its registry, in creation order


class Registry:
    """Named implementations of one kind. register() adds one (as a decorator or a call);
    get() finds one or raises a UserError naming the option, the known names and any plugin
    that failed to load."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, object] = {}
        self._sources: dict[str, str] = {}
        self._options: dict[str, type] = {}
        self._meta: dict[str, dict] = {}
        REGISTRIES[kind] = self

    def register(self, name: str, obj=None, *, options: type | None = None, replace: bool = False, **meta):
        """Add `obj` under `name` (or use as `@registry.register(name)`). A name already taken is
        an error: a plugin never silently replaces a built-in or another plugin's entry.
        `options`: a dataclass whose fields become flags of the config section this registry
        serves (extend_config); `meta`: facts the caller reads with meta() (an optimizer's state
        size, say). `replace`: for a script's own built-ins, which a second import of the script
        (a fork, a benchmark loading it as a module) registers again."""
        if obj is None:
            return lambda fn: self.register(name, fn, options=options, replace=replace, **meta)
        if name in self._items and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered (by {self._sources[name]})")
        self._items[name] = obj
        self._sources[name] = _loading[-1] if _loading else "built-in"
        if options is not None:
            self._options[name] = options
        self._meta[name] = meta
        return obj

    def options(self, name: str) -> type | None:
        """The options dataclass `name` was registered with, if any."""
        return self._options.get(name)

    def meta(self, name: str, key: str, default=None):
        return self._meta.get(name, {}).get(key, default)

    def get(self, name: str, option: str):
        if name in self._items:
            return self._items[name]
        failed = "".join(f"; {f.source} failed to load ({f.error})" for f in FAILURES)
        raise UserError(f"{option} {name}: no such {self.kind}; known: {', '.join(self._items)}{failed}")

    def names(self) -> list[str]:
        return list(self._items)

    def source(self, name: str) -> str:
        """'built-in', or the plugin that registered `name`."""
        return self._sources[name]


@dataclass
class Failure:
    source: str
    """The plugin: a file, a module name, or `entry point NAME (VALUE)`."""
    error: str
    """The exception, as `Type: first line of its message`."""


@dataclass
class LoadReport:
    loaded: dict[str, list[str]] = field(default_factory=dict)
    """Plugin -> the `kind:name` entries it registered."""
    failed: list[Failure] = field(default_factory=list)


FAILURES: list[Failure] = []  # every failure in this process so far
_done: dict[str, tuple[list[str], Failure | None]] = {}  # plugin -> its outcome: each is imported once
_loading: list[str] = []  # the plugin being imported (the source register() records)


def _entries() -> set[str]:
    return {f"{r.kind}:{name}" for r in REGISTRIES.values() for name in r.names()}


def _import(source: str, load) -> tuple[list[str], Failure | None]:
    if source not in _done:
        before = _entries()
        _loading.append(source)
        try:
            load()
            outcome = (sorted(_entries() - before), None)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 -- recorded and reported, never fatal here
            outcome = (sorted(_entries() - before), Failure(source, one_line(exc)))
            FAILURES.append(outcome[1])
        finally:
            _loading.pop()
        _done[source] = outcome
    return _done[source]


def _import_file(path: Path) -> None:
    name = f"lm_plugin_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def load(specs: list[str] | tuple[str, ...] = (), entry_points: bool = True) -> LoadReport:
    """Import the built-in registries' modules, then every installed entry point of the group
    `lm.plugins` (when `entry_points`) and every plugin in `specs` (a .py file, or a module name
    importable from the working folder or the repository). Each plugin is imported once per
    process; a failure is recorded (in the report and in FAILURES), never raised."""
    for module in ("lib.train.optim", "lib.model.loss", "lib.train.actions", "lib.data.sources"):  # built-ins first
        importlib.import_module(module)

    report = LoadReport()
    found = []
    if entry_points:
        from importlib.metadata import entry_points as installed

        found += [(f"entry point {ep.name} ({ep.value})", ep.load) for ep in installed(group=ENTRY_POINT_GROUP)]
    for spec in specs:
        path = Path(spec)
        if spec.endswith(".py"):
            if not path.is_file():
                found.append((spec, lambda spec=spec: _missing(spec)))
            else:
                found.append((str(path.resolve()), lambda path=path: _import_file(path)))
        else:
            found.append((spec, lambda spec=spec: _import_module(spec)))
    for source, load_it in found:
        entries, failure = _import(source, load_it)
        report.loaded[source] = entries
        if failure is not None:
            report.failed.append(failure)
    return report


def _missing(spec: str) -> None:
    raise FileNotFoundError(f"no such file {spec}")


def _import_module(name: str) -> None:
    """Import `name` from the usual places or, failing those, from the working folder (a module
    beside the user's files; the scripts put the repository first on sys.path, not the folder)."""
    added = str(Path.cwd()) not in sys.path
    if added:
        sys.path.append(str(Path.cwd()))
    try:
        importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))


def warn_failures(report: LoadReport, say=None) -> None:
    """One line per plugin that failed to load (to stderr unless `say` is given)."""
    for failure in report.failed:
        line = f"warning: plugin {failure.source} failed to load: {failure.error}"
        if say is not None:
            say(line)
        else:
            print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def forgetting():
    """Inside: plugins load and register as usual; afterwards every registry, the plugins imported
    and the failures recorded are as they were (for running several scripts' main() in one
    process, as the tests do: one run's plugins must not reach the next)."""
    saved = {kind: (r, dict(r._items), dict(r._sources), dict(r._options), dict(r._meta))
             for kind, r in REGISTRIES.items()}
    done, failures = dict(_done), list(FAILURES)
    try:
        yield
    finally:
        REGISTRIES.clear()
        for kind, (r, items, sources, options, meta) in saved.items():
            r._items, r._sources, r._options, r._meta = items, sources, options, meta
            REGISTRIES[kind] = r
        _done.clear()
        _done.update(done)
        FAILURES[:] = failures


def from_command_line(argv: list[str]) -> list[str]:
    """The plugins a script's command line names before it is parsed: `--plugins A B` (up to the
    next flag) and the `plugins` list of its `--config` preset, so that their options exist as
    flags when the command line is parsed (extend_config)."""
    from lib.config import _find_config_flag, load_yaml

    found: list[str] = []
    preset = _find_config_flag(argv)
    if preset is not None:
        listed = load_yaml(preset).get("plugins") or []
        found += [str(p) for p in (listed if isinstance(listed, list) else [listed])]
    for i, arg in enumerate(argv):
        if arg == "--plugins":
            for value in argv[i + 1:]:
                if value.startswith("--"):
                    break
                found.append(value)
        elif arg.startswith("--plugins="):
            found.append(arg.split("=", 1)[1])
    return found


def extend_config(cls: type, sections: dict[str, "Registry | tuple[Registry, ...]"]) -> type:
    """`cls` (a config dataclass) with each section (field name -> the registry, or registries, it
    chooses from: "loss" -> LOSSES, "optim" -> (OPTIMIZERS, SCHEDULES)) widened by the option fields
    its plugin entries declare, so that `--loss.name zloss --loss.z 1e-4` parses, validates and is
    saved in config.yaml like any option. A field two entries declare must agree on its type;
    built-in entries' options are in the section class already. Returns `cls` itself when no
    plugin adds a field."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    widened = []
    for section, registries in sections.items():
        base = hints[section]
        have = typing.get_type_hints(base)
        added: dict[str, tuple] = {}
        for registry, name in [(r, n) for r in (registries if isinstance(registries, tuple) else (registries,))
                               for n in r.names()]:
            options = registry.options(name)
            if options is None:
                continue
            types = typing.get_type_hints(options)
            for f in dataclasses.fields(options):
                known = have.get(f.name, added.get(f.name, (None,))[0])
                if known is not None:
                    if known != types[f.name]:
                        raise UserError(f"{registry.kind} {name} ({registry.source(name)}): option {section}.{f.name} "
                                        f"is {types[f.name]}, but another entry declares it as {known}; rename it")
                    continue
                default = (dataclasses.field(default_factory=f.default_factory)
                           if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
                added[f.name] = (types[f.name], default)
        if added:
            widened_section = dataclasses.make_dataclass(
                base.__name__, [(k, tp, d) for k, (tp, d) in added.items()], bases=(base,))
            widened_section.__doc__ = base.__doc__
            widened.append((section, widened_section, dataclasses.field(default_factory=widened_section)))
    if not widened:
        return cls
    out = dataclasses.make_dataclass(cls.__name__, widened, bases=(cls,))
    out.__doc__, out.__module__ = cls.__doc__, cls.__module__
    return out
