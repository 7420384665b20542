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

import contextlib
import glob
import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

from lib.errors import UserError, json_error
from lib.plugins import Registry

TEXT_SUFFIXES = (".txt", ".py", ".md")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".json", ".parquet")
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


class PairText(str):
    """A preference pair read from a record: the chosen conversation's plain rendering, with the
    two conversations (chosen, rejected: the shared prompt turns and each response) in `.pair`."""

    pair: tuple

    @classmethod
    def of(cls, chosen: list, rejected: list) -> "PairText":
        text = cls(ChatText.of(chosen))
        text.pair = (chosen, rejected)
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


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", "[": "\ue001", "]": "\ue002"}
# \[ and \] stand for literal brackets while the optional parts are found (private-use characters,
# put back afterwards)


class Template:
    """A --corpus.template: text with record fields in braces, `{instruction}`.

    `\\n` and `\\t` mean a newline and a tab (bash's single quotes pass them as two characters; a
    YAML string may hold real ones: both give the same text), `\\\\` a backslash. A part in square
    brackets that holds a field is left out when a field in it is missing or empty, so one
    template gives both of Alpaca's prompt shapes: '{instruction}[\\n\\n{input}]'. Brackets around
    no field are plain text ('[INST] {instruction} [/INST]'); `\\[` and `\\]` are always plain
    brackets. A literal brace is doubled, {{ or }}.

    A malformed template (an unclosed brace, a positional or attribute field, an unclosed
    bracket) is a UserError naming it, raised before any record is read."""

    def __init__(self, raw: str, option: str = "--corpus.template"):
        text = re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), raw, flags=re.S)
        self.parts: list[tuple[bool, str, list[str]]] = []  # (optional, format string, its fields)
        problem = None
        pos = 0
        try:
            segments = []  # the text between bracketed parts: a bracket left there is unmatched
            for m in re.finditer(r"\[([^\[\]]*)\]", text):
                segments.append(text[pos:m.start()])
                self._add(False, segments[-1])
                fields = self._fields(m.group(1))
                self._add(bool(fields), m.group(1) if fields else m.group(0))
                pos = m.end()
            segments.append(text[pos:])
            self._add(False, segments[-1])
            if any(c in seg for seg in segments for c in "[]"):
                problem = "a [ or ] is unmatched (write \\[ or \\] for a plain one)"
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            problem = str(exc).strip("'") or type(exc).__name__
        if problem:
            raise UserError(f"{option} {raw!r}: {problem}; a field is a record's key in braces, {{instruction}}, "
                            "a literal brace is doubled, {{ or }}, and [ ] around a part with a field make it "
                            "optional")

    @staticmethod
    def _fields(fmt: str) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]

    def _add(self, optional: bool, fmt: str) -> None:
        if not fmt:
            return
        fields = self._fields(fmt)
        bad = next((f for f in fields if not f.isidentifier()), None)
        if bad is not None:
            raise ValueError(f"field {bad!r} is not a plain name")
        fmt.format(**{f: "" for f in fields})  # raises for a malformed part
        self.parts.append((optional, fmt, fields))

    @property
    def fields(self) -> list[str]:
        """Every field the template names, in order, once each."""
        return list(dict.fromkeys(f for _, _, fs in self.parts for f in fs))

    @property
    def required(self) -> list[str]:
        """The fields outside optional parts: a record without one is a bad record."""
        return list(dict.fromkeys(f for optional, _, fs in self.parts if not optional for f in fs))

    def render(self, obj: dict) -> str:
        """The template filled from `obj` (which holds every required field)."""
        out = []
        for optional, fmt, fields in self.parts:
            values = {f: obj.get(f) for f in fields}
            if optional and any(v is None or (isinstance(v, str) and not v.strip()) for v in values.values()):
                continue
            out.append(fmt.format(**values))
        return "".join(out).replace("\ue001", "[").replace("\ue002", "]")


LAYOUTS = ("text: {\"text\": ...} (another field: --corpus.text_field); "
           "messages: {\"messages\": [{\"role\", \"content\"}, ...]}; "
           "sharegpt: {\"conversations\": [{\"from\": \"human\"|\"gpt\"|\"system\", \"value\"}, ...]}; "
           "prompt_completion: {\"prompt\", \"completion\"}; "
           "alpaca: {\"instruction\", \"input\", \"output\"} (input may be empty); "
           "preference: {\"prompt\", \"chosen\", \"rejected\"}, or chosen/rejected lists of turns; "
           "any other fields: --corpus.template with --corpus.completion_field")
ALPACA = Template("{instruction}[\\n\\n{input}]")  # the input part left out where a record has none


def layout_of(obj: dict, text_field: str) -> Optional[str]:
    """The layout a record is in (CorpusConfig.format's names, for auto), or None: the text field
    first, then a preference pair, a list of turns, prompt/completion, instruction/output."""
    if text_field in obj:
        return "text"
    if "chosen" in obj and "rejected" in obj:
        return "preference"
    if isinstance(obj.get("messages"), list):
        return "messages"
    if isinstance(obj.get("conversations"), list):
        return "sharegpt"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    return None


class RecordReader:
    """Turns input files into RawRecords under the configured policies, counting what it drops
    (with the first example of each reason, `first`)."""

    def __init__(self, text_field: str = "text", template: Optional[str] = None,
                 on_bad_record: Literal["error", "skip"] = "error",
                 on_bad_utf8: Literal["error", "skip", "replace"] = "error", completion_field: Optional[str] = None,
                 format: str = "auto"):
        self.text_field, self.completion_field, self.format = text_field, completion_field, format
        self.on_bad_record, self.on_bad_utf8 = on_bad_record, on_bad_utf8
        self.template = Template(template) if template else None
        if self.template is not None and format not in ("auto", "text"):
            raise UserError(f"--corpus.template and --corpus.format {format} are two layouts: give one")
        if completion_field is not None and self.template is None:
            raise UserError("--corpus.completion_field names the answer of a --corpus.template: give the template too")
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    @property
    def columns(self) -> Optional[list[str]]:
        """The columns a tabular input must have (None: whatever the layout needs)."""
        if self.template is not None:
            return self.template.required + ([self.completion_field] if self.completion_field else [])
        return [self.text_field] if self.format == "text" else None

    # -- policy helpers
    def _bad(self, kind: str, where: str, what: str) -> None:
        if self.on_bad_record == "error":
            raise UserError(f"{where}: {what} (pass --corpus.on_bad_record skip to drop such records)")
        self.counts[kind] += 1
        self.first.setdefault(kind, f"{where}: {what}")

    def _decode(self, raw: bytes, where: str, base_offset: int = 0) -> Optional[str]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if self.on_bad_utf8 == "error":
                raise UserError(f"{where}: byte offset {base_offset + exc.start} is not UTF-8 "
                                "(pass --corpus.on_bad_utf8 skip or replace)") from None
            self.counts[f"not_utf8_{'skipped' if self.on_bad_utf8 == 'skip' else 'replaced'}"] += 1
            return None if self.on_bad_utf8 == "skip" else raw.decode("utf-8", errors="replace")

    def _fields(self, obj: dict) -> str:
        return ", ".join(map(str, obj)) or "none"

    def _text_of(self, obj, where: str) -> Optional[str]:
        """The record's text: a string, or a ChatText for a conversation (its messages attached)."""
        if not isinstance(obj, dict):
            self._bad("not_an_object", where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        if self.template is not None:
            return self._templated(obj, where, self.template, self.completion_field)
        layout = layout_of(obj, self.text_field) if self.format == "auto" else self.format
        if layout is None:
            self._bad("missing_field", where, f"no field {self.text_field!r}, nor another layout this reads (fields: "
                      f"{self._fields(obj)}). Read are {LAYOUTS}; --corpus.format names one")
            return None
        if layout == "alpaca":
            return self._templated(obj, where, ALPACA, "output")
        if layout == "text":
            if self.text_field not in obj:
                seen = layout_of(obj, self.text_field)
                hint = f"it is in the {seen} layout, which --corpus.format {seen} reads" if seen else (
                    "set --corpus.text_field or --corpus.template")
                self._bad("missing_field", where, f"no field {self.text_field!r} (fields: {self._fields(obj)}; {hint})")
                return None
            text = obj[self.text_field]
            if isinstance(text, str):
                return text
            hint = ("; a list of turns is read as a conversation: leave --corpus.text_field out (--corpus.format "
                    f"{'sharegpt' if self.text_field == 'conversations' else 'messages'})"
                    if isinstance(text, list) and text and isinstance(text[0], dict) else "")
            self._bad("not_a_string", where, f"field {self.text_field!r} is a {type(text).__name__}, not a string{hint}")
            return None
        from lib.data.chat import parse_preference, parse_record

        need = {"messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
                "preference": ("chosen", "rejected")}
        missing = [k for k in need[layout] if k not in obj]
        if missing:
            self._bad("missing_field", where, f"no field {missing[0]!r} for --corpus.format {layout} "
                      f"(fields: {self._fields(obj)})")
            return None
        try:
            if layout == "preference":
                chosen, rejected = parse_preference(obj, where).conversations()
                return PairText.of(chosen.messages, rejected.messages)
            return ChatText.of(parse_record(obj, where).messages)
        except UserError as exc:
            self._bad("bad_pair" if layout == "preference" else "bad_conversation", where,
                      str(exc).removeprefix(f"{where}: "))
            return None

    def _templated(self, obj: dict, where: str, template: Template, completion_field: Optional[str]) -> Optional[str]:
        missing = [f for f in template.required if f not in obj or obj[f] is None]
        if missing:
            what = "the template" if template is self.template else "--corpus.format alpaca"
            self._bad("missing_field", where, f"no field {missing[0]!r} for {what} (fields: {self._fields(obj)})")
            return None
        text = template.render(obj)
        if completion_field is None:
            return text
        answer = obj.get(completion_field)
        if not isinstance(answer, str):
            option = "--corpus.completion_field" if template is self.template else "the alpaca layout's answer"
            self._bad("missing_field", where, f"no string field {completion_field!r} ({option}) "
                      f"(fields: {self._fields(obj)})")
            return None
        messages = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        system = obj.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return ChatText.of(messages)

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
        elif name.endswith(".json"):
            yield from self._read_json(f)
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

    def _read_jsonl(self, f: InputFile, lines=None) -> Iterator[RawRecord]:
        """Records of a file of JSON lines (`lines`: its lines, already read; else read as a stream)."""
        offset = 0
        with open(f.path, "rb") if lines is None else contextlib.nullcontext(lines) as fh:
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

    def _read_json(self, f: InputFile) -> Iterator[RawRecord]:
        """A .json file: an array of records (each named by its number and the line it starts on),
        or one record per line as in .jsonl."""
        raw = f.path.read_bytes()
        body = raw.lstrip(b"\xef\xbb\xbf \t\r\n")
        if body[:1] != b"[":
            if body[:1] == b"{" and not _parses(body.split(b"\n", 1)[0]):
                whole = _parses(raw)
                if isinstance(whole, dict):  # one pretty-printed object, not records
                    raise UserError(f"{f.path}: one JSON object (keys: {', '.join(map(str, whole)) or 'none'}), not "
                                    "an array of records or one record per line; write its records as an array, "
                                    "[{...}, ...], or one per line")
            yield from self._read_jsonl(f, raw.splitlines(keepends=True))
            return
        text = self._decode(raw, str(f.path))
        if text is None:
            return
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        number, line, counted = 0, 1, 0
        ws = re.compile(r"[\s,]*")
        while True:
            pos = ws.match(text, pos).end()
            if pos >= len(text) or text[pos] == "]":
                break
            number += 1
            line, counted = line + text.count("\n", counted, pos), pos
            where = f"{f.path}:{line}"
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise UserError(f"{f.path}:{exc.lineno}: record {number} of the array is malformed JSON ({json_error(exc)}); "
                                "the array cannot be read past it") from None
            got = self._text_of(obj, where)
            if got is not None:
                yield RawRecord(id=f"{f.rel}:{number}", text=got, source=f.rel, line=line)
        if pos >= len(text):
            raise UserError(f"{f.path}: the array is not closed with ]: the file is cut short")

    def _read_parquet(self, f: InputFile) -> Iterator[RawRecord]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(f.path)
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{f.path}: not a readable Parquet file ({exc})") from None
        names = pf.schema_arrow.names
        missing = [c for c in self.columns or [] if c not in names]
        layout = ("template" if self.template is not None else self.format if self.format != "auto"
                  else layout_of({n: [] for n in names}, self.text_field))
        if missing or layout is None:
            raise UserError(f"{f.path}: no column {(missing or [self.text_field])[0]!r} (columns: {', '.join(names)})"
                            + ("" if missing else f", nor another layout this reads. Read are {LAYOUTS}"))
        if self.template is not None:
            wanted = self.template.fields + ([self.completion_field, "system"] if self.completion_field else [])
        else:
            wanted = [self.text_field] if layout == "text" else None  # None: every column, for the layout
        columns = [c for c in wanted if c in names] if wanted else None
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


def _parses(raw: bytes):
    """The JSON value `raw` holds, or None where it is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, TypeError):
        return None


def hash_inputs(files: list[InputFile]) -> list[dict]:
    """[{file, bytes, sha256}] for every raw input file, in order."""
    from lib.files import sha256_file

    return [{"file": f.rel, "bytes": f.path.stat().st_size, "sha256": sha256_file(f.path)} for f in files]
