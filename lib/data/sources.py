"""Raw inputs -> raw records, one file at a time, with bad input reported by file and line.

Supported: the built-in 'stdlib' corpus, `.txt` (one document per file), `.py` (likewise),
`.jsonl` (one record per line; a text field or a template over several fields) and `.parquet`
(one record per row), given as files, directories or globs; a `datasets` dataset saved with
`save_to_disk`; and any local files a `datasets` builder reads (json, csv, parquet, text, or a
dataset folder), through `load_dataset(..., data_files=..., streaming=True)`. Everything is read
as a stream: nothing holds a whole input in memory beyond one file of text (txt/py) or one
record batch (parquet, datasets).

Bad input policies:
  on_bad_record: 'error' (default) stops with `FILE:LINE: what was wrong`; 'skip' drops the
      record and counts it (malformed JSON, a missing field, a text that is not a string).
  on_bad_utf8: 'error' stops with `FILE: byte offset N is not UTF-8`; 'skip' drops the record;
      'replace' keeps it with U+FFFD for the bad bytes. Both skip and replace are counted.
"""
from __future__ import annotations

import glob
import json
import os
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

from lib.data.chat import is_chat_record
from lib.errors import UserError, json_error
from lib.plugins import Registry

TEXT_SUFFIXES = (".txt", ".py", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
READERS = Registry("reader")
"""Readers of input files by suffix. A plugin adds one for another kind of file (lib/plugins.py):
fn(path) -> iterable of (number, text), one pair per document, number being its 1-based line or
row in the file (None: the whole file is one document)."""
BUILT_IN = "read by lib.data.sources.RecordReader"
for _suffix in SUFFIXES:
    READERS.register(_suffix, BUILT_IN)  # a plugin cannot take these over


def known_suffixes() -> tuple[str, ...]:
    """The suffixes a directory or glob picks up: the built-in ones and those plugins added."""
    return tuple(READERS.names())


class ChatText(str):
    """A conversation read from a record: its plain rendering (the default chat template, turns
    without eos), with the messages themselves in `.messages` for the tokens stage to render
    through the tokenizer's template."""

    messages: list

    @classmethod
    def of(cls, messages: list) -> "ChatText":
        from lib.data.chat import DEFAULT_TEMPLATE, render_text

        text = cls(render_text(DEFAULT_TEMPLATE, messages, eos_token=""))
        text.messages = messages
        return text


@dataclass
class RawRecord:
    id: str
    text: str
    source: str
    """The input file (relative to its root when given as a directory), or the dataset."""
    line: Optional[int] = None
    """1-based line (jsonl) or row (parquet, datasets) number; None for whole-file documents."""


@dataclass
class InputFile:
    path: Path
    rel: str
    """The name recorded in records and used for the held-out split."""


def expand_inputs(spec: str, suffixes=None, skip_dirs=frozenset({"__pycache__"})) -> list[InputFile]:
    """Files named by a comma-separated list of files, directories and globs, sorted per item,
    with one of `suffixes` (default: known_suffixes()).

    Each item that matches nothing is an error naming it.
    """
    suffixes = known_suffixes() if suffixes is None else suffixes
    files: list[InputFile] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        path = Path(item)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
                found += [Path(dirpath, n) for n in filenames if n.endswith(suffixes)]
            matched = [InputFile(p, p.relative_to(path).as_posix()) for p in sorted(found)]
        elif path.is_file():
            matched = [InputFile(path, path.name)]
        else:
            matched = [InputFile(Path(p), Path(p).as_posix())
                       for p in sorted(glob.glob(item, recursive=True)) if Path(p).is_file()]
        matched = [f for f in matched if f.path.name.endswith(suffixes)]
        if not matched:
            kinds = "" if suffixes == ANY_SUFFIX else " " + "/".join(suffixes)
            raise UserError(f"corpus.source: '{item}' matches no{kinds} file")
        files += matched
    return files


ANY_SUFFIX = ("",)


def is_saved_dataset(path: str | Path) -> bool:
    """True for a folder written by `datasets`' save_to_disk."""
    path = Path(path)
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file())


def template_fields(template: str) -> list[str]:
    """The field names a --corpus.template fills, or a UserError saying what is wrong with it (an
    unclosed brace, a positional or attribute field): the template is checked before any record."""
    problem = None
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        if any(not f.isidentifier() for f in fields):
            problem = f"field {next(f for f in fields if not f.isidentifier())!r} is not a plain name"
        else:
            template.format(**{f: "" for f in fields})
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        problem = str(exc).strip("'") or type(exc).__name__
    if problem:
        raise UserError(f"--corpus.template {template!r}: {problem}; a field is a record's key in braces, "
                        "{instruction}, and a literal brace is doubled, {{ or }}")
    return fields


class RecordReader:
    """Turns input files into RawRecords under the configured policies, counting what it drops."""

    def __init__(self, text_field: str = "text", template: Optional[str] = None,
                 on_bad_record: Literal["error", "skip"] = "error",
                 on_bad_utf8: Literal["error", "skip", "replace"] = "error", completion_field: Optional[str] = None):
        self.text_field, self.template, self.completion_field = text_field, template, completion_field
        self.on_bad_record, self.on_bad_utf8 = on_bad_record, on_bad_utf8
        self.template_fields = template_fields(template) if template else []
        self.counts: Counter = Counter()

    # -- policy helpers
    def _bad(self, kind: str, where: str, what: str) -> None:
        if self.on_bad_record == "error":
            raise UserError(f"{where}: {what} (pass --corpus.on_bad_record skip to drop such records)")
        self.counts[kind] += 1

    def _decode(self, raw: bytes, where: str, base_offset: int = 0) -> Optional[str]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.on_bad_utf8 == "error":
                raise UserError(f"{where}: byte offset {base_offset + exc.start} is not UTF-8 "
                                "(pass --corpus.on_bad_utf8 skip or replace)") from None
            self.counts[f"not_utf8_{'skipped' if self.on_bad_utf8 == 'skip' else 'replaced'}"] += 1
            return None if self.on_bad_utf8 == "skip" else raw.decode("utf-8", errors="replace")

    def _text_of(self, obj, where: str) -> Optional[str]:
        if not isinstance(obj, dict):
            self._bad("not_an_object", where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        if self.template:
            missing = [f for f in self.template_fields if f not in obj]
            if missing:
                self._bad("missing_field", where, f"no field {missing[0]!r} for the template "
                          f"(fields: {', '.join(map(str, obj)) or 'none'})")
                return None
            text = self.template.format(**{k: obj[k] for k in self.template_fields})
            if self.completion_field is None:
                return text
            answer = obj.get(self.completion_field)
            if not isinstance(answer, str):
                self._bad("missing_field", where, f"no string field {self.completion_field!r} (--corpus.completion_field) "
                          f"(fields: {', '.join(map(str, obj)) or 'none'})")
                return None
            return ChatText.of([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        if self.text_field not in obj and is_chat_record(obj):
            from lib.data.chat import parse_record

            try:
                conv = parse_record(obj, where)
            except UserError as exc:
                self._bad("bad_conversation", where, str(exc).removeprefix(f"{where}: "))
                return None
            return ChatText.of(conv.messages)
        if self.text_field not in obj:
            self._bad("missing_field", where, f"no field {self.text_field!r} (fields: {', '.join(map(str, obj)) or 'none'}; "
                      "set --corpus.text_field or --corpus.template)")
            return None
        text = obj[self.text_field]
        if not isinstance(text, str):
            self._bad("not_a_string", where, f"field {self.text_field!r} is a {type(text).__name__}, not a string")
            return None
        return text

    # -- readers
    def read(self, f: InputFile) -> Iterator[RawRecord]:
        """Records of one file. An empty file is an error (or skipped and counted)."""
        if f.path.stat().st_size == 0:
            self._bad("empty_file", str(f.path), "the file is empty")
            return
        name = f.path.name
        plugin = max((x for x in READERS.names() if name.endswith(x) and READERS.source(x) != "built-in"),
                     key=len, default=None)
        if plugin is not None:
            yield from self._read_with_plugin(f, plugin)
        elif name.endswith(".jsonl"):
            yield from self._read_jsonl(f)
        elif name.endswith(".parquet"):
            yield from self._read_parquet(f)
        else:
            text = self._decode(f.path.read_bytes(), str(f.path))
            if text is not None:
                yield RawRecord(id=f.rel, text=text, source=f.rel)

    def _read_with_plugin(self, f: InputFile, suffix: str) -> Iterator[RawRecord]:
        """Records from a plugin's reader; what it raises, or a text that is not a string, is a bad
        record of that file (an error, or skipped and counted), never a traceback."""
        what = f"the {suffix} reader ({READERS.source(suffix)})"
        try:
            for number, text in READERS.get(suffix, "reader")(f.path):
                where = f"{f.path}:{number}" if number is not None else str(f.path)
                if not isinstance(text, str):
                    self._bad("not_a_string", where, f"{what} gave a {type(text).__name__}, not a string")
                    continue
                yield RawRecord(id=f"{f.rel}:{number}" if number is not None else f.rel, text=text, source=f.rel,
                                line=number)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 -- the plugin's failure, named with its file
            self._bad("reader_failed", str(f.path), f"{what} failed: {type(exc).__name__}: {exc}")

    def _read_jsonl(self, f: InputFile) -> Iterator[RawRecord]:
        offset = 0
        with open(f.path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{f.path}:{lineno}"
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                line = self._decode(raw, where, start)
                if line is None:
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    self._bad("malformed_json", where, f"malformed JSON ({json_error(exc)})")
                    continue
                text = self._text_of(obj, where)
                if text is not None:
                    yield RawRecord(id=f"{f.rel}:{lineno}", text=text, source=f.rel, line=lineno)

    def _read_parquet(self, f: InputFile) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f.path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{f.path}: not a readable Parquet file ({exc})") from None
        columns = self.template_fields or [self.text_field]
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise UserError(f"{f.path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)})")
        row = 0
        for batch in pf.iter_batches(columns=columns, batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                text = self._text_of(obj, f"{f.path}: row {row}")
                if text is not None:
                    yield RawRecord(id=f"{f.rel}:{row}", text=text, source=f.rel, line=row)

    def read_with_loader(self, loader: str, files: list[InputFile], split: Optional[str] = None) -> Iterator[RawRecord]:
        """Rows that `datasets.load_dataset(loader, data_files=files, streaming=True)` yields, one
        at a time (the files are read lazily, shard by shard). Rows are numbered across files."""
        import datasets

        if loader.endswith(".py"):
            raise UserError(f"corpus.loader {loader}: datasets {datasets.__version__} no longer runs loading "
                            "scripts; use a builder name (json, csv, parquet, text) or a dataset folder")
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

        if loader not in _PACKAGED_DATASETS_MODULES and not Path(loader).is_dir():
            # anything else would be looked up on the Hugging Face Hub: this project reads local data only
            raise UserError(f"corpus.loader {loader!r}: neither a datasets builder name ({', '.join(sorted(_PACKAGED_DATASETS_MODULES)[:8])}, "
                            "...) nor a local dataset folder; hub datasets are not fetched (DEFERRED.md)")
        try:
            ds = datasets.load_dataset(loader, data_files=[str(f.path) for f in files], split=split or "train",
                                       streaming=True)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"corpus.loader {loader!r} cannot read {files[0].path} ...: {exc}") from None
        label = Path(loader).name
        row = 0
        try:
            for obj in ds:
                row += 1
                text = self._text_of(obj, f"{loader} over corpus.source: row {row}")
                if text is not None:
                    yield RawRecord(id=f"{label}:{row}", text=text, source=label, line=row)
        except (ValueError, TypeError, datasets.exceptions.DatasetGenerationError) as exc:
            raise UserError(f"corpus.loader {loader!r}: row {row + 1} could not be read ({exc})") from None

    def read_saved_dataset(self, path: str | Path, split: Optional[str] = None) -> Iterator[RawRecord]:
        """Rows of a `datasets` dataset saved with save_to_disk (a DatasetDict needs `split`)."""
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(path))
        if isinstance(ds, DatasetDict):
            if split is None or split not in ds:
                raise UserError(f"{path} holds splits {', '.join(ds)}: choose one with --corpus.dataset_split")
            ds = ds[split]
        label = Path(path).name
        for row, obj in enumerate(ds, start=1):
            text = self._text_of(obj, f"{path}: row {row}")
            if text is not None:
                yield RawRecord(id=f"{label}:{row}", text=text, source=label, line=row)


def hash_inputs(files: list[InputFile]) -> list[dict]:
    """[{file, bytes, sha256}] for every raw input file, in order."""
    from lib.files import sha256_file

    return [{"file": f.rel, "bytes": f.path.stat().st_size, "sha256": sha256_file(f.path)} for f in files]
