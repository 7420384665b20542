"""Metric sinks: append-only JSON lines (NDJSON), and CSV / Parquet tables rebuilt from it.

train.py and eval.py write the same files: metrics.jsonl always (one record per line, appended
and flushed as it happens; a resume truncates it), and metrics.csv / metrics.parquet when asked
(`--metrics_out`), rebuilt whole from metrics.jsonl, so they never hold a row it does not."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from lib.files import atomic_file, atomic_text

METRICS = "metrics.jsonl"
FORMATS = ("ndjson", "csv", "parquet")
"""The one name of a metrics file (one JSON object per line: NDJSON), train.py's in the run folder and
eval.py's in its eval/ folder, beside metrics.csv and metrics.parquet."""


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlWriter:
    """Append one JSON object per line, flushed per line so a crash loses at most one record;
    each record is also handed to `mirror.write` when given (lib.records.tracking's MLflow tracker).

    Only the main process should own one.
    """

    def __init__(self, path: str | Path, mirror=None, say=print):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path, say)  # a record appended to a torn line would be torn with it
        self._f = open(self.path, "a", encoding="utf-8")
        self.mirror = mirror

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False) + "\n")
        self._f.flush()
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        self._f.close()


def parse_formats(spec: str, option: str = "--metrics_out") -> tuple[str, ...]:
    """The formats of a comma-separated list ("ndjson,csv,parquet"); ndjson is always among them."""
    from lib.errors import UserError

    names = [s.strip().lower() for s in spec.replace(" ", ",").split(",") if s.strip()]
    bad = [n for n in names if n not in FORMATS]
    if bad:
        raise UserError(f"{option} {spec}: unknown format {bad[0]!r}; give a comma-separated list of "
                        f"{', '.join(FORMATS)} (metrics.jsonl is always written)")
    return tuple(f for f in FORMATS if f == "ndjson" or f in names)


class MetricsSink(JsonlWriter):
    """metrics.jsonl, appended record by record, and the tables of `formats` beside it, rebuilt
    from it on `refresh_tables()` (at evaluations, checkpoints and the end) and on `close()`."""

    def __init__(self, path: str | Path, formats: tuple[str, ...] = ("ndjson",), mirror=None):
        super().__init__(path, mirror)
        self.tables = tuple(f for f in formats if f != "ndjson")

    def refresh_tables(self) -> list[Path]:
        if not self.tables:
            return []
        return write_tables(read_jsonl(self.path), self.path.with_suffix(""), self.tables)

    def close(self) -> None:
        super().close()
        self.refresh_tables()


def _cut_torn_tail(path: Path, say) -> None:
    """Remove a last line that a killed writer left without its newline (it holds no whole
    record), saying so."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
    except FileNotFoundError:
        return
    say(f"warning: {path}: its last line was torn (a write cut short, {len(data) - keep} bytes): removed before "
        "appending")


def read_jsonl(path: str | Path, say=print) -> list[dict]:
    """All records of an NDJSON file (an empty list when it does not exist). A torn last line (a
    writer killed mid-line) is skipped, saying so; any other line that is not a JSON object is a
    UserError naming the file and line."""
    from lib.errors import UserError, json_error

    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                say(f"warning: {path}: its last line is torn (a write cut short): skipped")
                continue
            raise UserError(f"{path}:{i}: not a JSON record ({json_error(exc)}); remove or repair that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{i}: not a JSON object; remove or repair that line")
        records.append(record)
    return records


def truncate_after_step(path: str | Path, step: int, drop_at_step: tuple[str, ...] = ()) -> int:
    """Keep the records of an NDJSON log up to `step` (a resumed run logs the later steps
    again), less those of `step` itself whose type is in `drop_at_step` (logged again too), and
    drop a torn last line a kill may have left; rewritten atomically. Returns the number of
    records dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-write
                dropped += 1
                continue
            if not isinstance(record, dict):  # not a record this code wrote
                dropped += 1
                continue
            if record.get("step", 0) < step or (record.get("step", 0) == step
                                                 and record.get("type") not in drop_at_step):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    with atomic_text(path) as f:
        f.write("".join(kept))
    return dropped


NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _column(values: list):
    """A column's values with the non-finite floats NDJSON stores as strings ("inf") turned back
    into floats, where the column is otherwise numeric, so Parquet types it as a float column."""
    numeric = any(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and all(v is None or isinstance(v, (int, float)) or (isinstance(v, str) and v in NON_FINITE) for v in values):
        return [NON_FINITE[v] if isinstance(v, str) else v for v in values]
    return values


def write_tables(records: list[dict], stem: str | Path, formats: tuple[str, ...] = ("csv", "parquet")) -> list[Path]:
    """Write `records` as `stem.csv` and/or `stem.parquet` (columns: the union of keys, in the order
    first seen; a record without a key leaves its cell empty), each atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = Path(stem)
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    written = []
    if "csv" in formats:
        written.append(stem.with_suffix(".csv"))
        with atomic_file(written[-1], "w") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
    if "parquet" in formats:
        written.append(stem.with_suffix(".parquet"))
        table = pa.table({c: _column([r.get(c) for r in records]) for c in columns})
        with atomic_file(written[-1], "wb") as f:
            pq.write_table(table, f)
    return written
