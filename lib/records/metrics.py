"""Metric sinks: append-only JSON lines (NDJSON), and CSV / Parquet tables rebuilt from it."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from lib.files import atomic_file, atomic_text

METRICS = "metrics.jsonl"
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

    def __init__(self, path: str | Path, mirror=None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.mirror = mirror

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}, sort_keys=False) + "\n")
        self._f.flush()
        if self.mirror is not None:
            self.mirror.write(record)

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of an NDJSON file (an empty list when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


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


def write_tables(records: list[dict], stem: str | Path) -> list[Path]:
    """Write `records` as `stem.csv` and `stem.parquet` (columns: union of keys, in order seen)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = Path(stem)
    columns: list[str] = []
    for r in records:
        columns += [k for k in r if k not in columns]
    csv_path, pq_path = stem.with_suffix(".csv"), stem.with_suffix(".parquet")
    with atomic_file(csv_path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in records])
    with atomic_file(pq_path, "wb") as f:
        pq.write_table(table, f)
    return [csv_path, pq_path]
