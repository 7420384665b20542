"""lib/files.py: the writers every stage uses leave the old version or the new one, never a mix,
and never a temporary file behind."""
from __future__ import annotations

import hashlib
import json

import pytest

from lib.errors import UserError
from lib.files import atomic_file, atomic_folder, canonical_hash, read_json, sha256_file, write_json


def test_hashes(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"x" * (3 << 20))  # more than one read chunk
    assert sha256_file(f) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": 1}) != canonical_hash({"a": 2})


def test_atomic_file_replaces_only_when_complete(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    with atomic_file(path, "wb", durable=True) as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_json_round_trip_and_errors_name_the_file(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": "é"})
    assert read_json(tmp_path / "a.json") == {"a": "é", "b": 1}
    assert (tmp_path / "a.json").read_text(encoding="utf-8").startswith('{\n  "a"')
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe garbage")
    for name in ("bad.json", "missing.json"):
        with pytest.raises(UserError, match=name):
            read_json(tmp_path / name, "record")


def test_atomic_folder_publishes_keeps_or_discards(tmp_path):
    out = tmp_path / "data"
    with atomic_folder(out) as build:
        (build.path / "a").write_text("1")
    assert [p.name for p in out.iterdir()] == ["a"]
    # a failure in the middle of a rebuild leaves the old folder exactly as it was
    with pytest.raises(ValueError):
        with atomic_folder(out) as build:
            (build.path / "b").write_text("2")
            raise ValueError("bad input")
    assert [p.name for p in out.iterdir()] == ["a"]
    # a discarded rebuild (nothing changed) too
    with atomic_folder(out) as build:
        (build.path / "c").write_text("3")
        build.discard()
    assert [p.name for p in out.iterdir()] == ["a"]
    # a complete one replaces it, and nothing temporary is left beside it
    with atomic_folder(out, durable=True) as build:
        (build.path / "d").write_text(json.dumps(4))
    assert [p.name for p in out.iterdir()] == ["d"] and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
