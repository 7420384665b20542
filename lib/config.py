"""Typed script configs: dataclass defaults < a YAML preset (`--config`) < CLI flags.

The YAML file is validated against the dataclass here (unknown keys, wrong types and bad choices
are errors naming the key and the file), turned into a dataclass instance, and handed to tyro as
the default, so tyro's flags override it. This is done once, in `parse`.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

from lib.errors import ConfigError

T = TypeVar("T")


def _find_config_flag(argv: Sequence[str]) -> str | None:
    """Return the value of `--config PATH` / `--config=PATH` in argv, if any; a ConfigError for a
    second one (one preset per run: a second would otherwise be silently ignored here while the
    flag parser recorded it)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path to a YAML file")
            found.append(argv[i + 1])
        elif arg.startswith("--config="):
            found.append(arg.split("=", 1)[1])
    if len(found) > 1:
        raise ConfigError(f"--config is given {len(found)} times ({', '.join(found)}): a run takes one preset; "
                          "copy the settings you want from the others into it, or give them as flags after it")
    return found[0] if found else None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping from `path`, with errors that name the file and line."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert where YAML is loose."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str):
        return ConfigError(f"{where}: key '{key}': expected {expected}, got {value!r}")

    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise bad(_type_name(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as exc:
                errors.append(exc)
        raise bad(" or ".join(_type_name(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad(f"a mapping for {tp.__name__}")
        return _build(tp, value, where, prefix=key + ".")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string: accept any string float() understands.
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if tp is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise bad("a path string")
        return Path(value)
    return value


def _build(cls: type[T], data: dict, where: str, prefix: str = "", base: T | None = None) -> T:
    """Overlay `data` on `base` (or the class defaults), validating every key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    base = base if base is not None else cls()
    updates = {}
    for key, value in data.items():
        if key in getattr(cls, "RETIRED", ()):  # an option since removed, in an older run's config.yaml
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'{hint}; valid keys here: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            updates[key] = _build(tp, value, where, prefix=f"{prefix}{key}.", base=getattr(base, key))
        else:
            updates[key] = _coerce(value, tp, prefix + key, where)
    return dataclasses.replace(base, **updates)


def from_dict(cls: type[T], data: dict, where: str = "<dict>") -> T:
    """Build a `cls` instance from a (possibly partial) nested dict, validating every key."""
    return _build(cls, data, where)


def flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of `--NAME VALUE` / `--NAME=VALUE` in argv (the last one given), if any."""
    found = None
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(f"--{name}="):
            found = arg.split("=", 1)[1]
    return found


def parse(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
          prog: str | None = None, presets: bool = True, expand: dict | None = None) -> T:
    """Parse a script config: defaults < `--config FILE.yaml` < named expansions < flags.

    `expand` maps a dotted option ("model.size") to a function from its value to a nested dict of
    settings (a model shape by name): applied over the preset, so `--config X --model.size Y`
    gets Y's shape with X's other settings, and under the flags, so `--model.n_layers 4` still
    changes one field of it.

    `cls` must have a field `config: Optional[Path]`; it records which preset was used. With
    `presets=False`, `--config` is an ordinary field (a file the command works on).
    If it has `print_config: bool` and that is set, the resolved config is printed as YAML and
    the process exits 0. Flags are spelled with underscores, as in the YAML (`--optim.lr 3e-4`).
    """
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    default = None
    if presets and "-h" not in argv and "--help" not in argv:
        config_path = _find_config_flag(argv)
        if config_path is not None:
            data = load_yaml(config_path)
            data.pop("config", None)
            default = _build(cls, data, where=str(config_path))
            default = dataclasses.replace(default, config=Path(config_path))
    for option, settings in (expand or {}).items() if "-h" not in argv and "--help" not in argv else ():
        value = flag_value(argv, option)
        if value is None and default is not None:  # given in the preset instead
            obj = default
            for part in option.split("."):
                obj = getattr(obj, part, None)
            value = obj
        if value is not None:
            overlay = settings(value)
            for part in reversed(option.split(".")[:-1]):
                overlay = {part: overlay}
            default = _build(cls, overlay, where=f"--{option} {value}", base=default)
    kwargs = {"default": default} if default is not None else {}
    cfg = tyro.cli(cls, args=argv, description=description, prog=prog, use_underscores=True, **kwargs)
    if getattr(cfg, "print_config", False):
        import yaml

        print(yaml.safe_dump(to_dict(dataclasses.replace(cfg, print_config=False)), sort_keys=False), end="")
        sys.exit(0)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A dataclass config as plain YAML-safe data (Paths become strings)."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def save(cfg: Any, path: str | Path, comments: Sequence[str] = ()) -> None:
    """Write the resolved config as YAML (atomically: never a half-written file), `comments` as
    `#` lines above it; `--config` on that file reproduces it."""
    import yaml

    from lib.files import atomic_text

    with atomic_text(path) as f:
        f.write("".join(f"# {line}\n" for line in comments) + yaml.safe_dump(to_dict(cfg), sort_keys=False))
