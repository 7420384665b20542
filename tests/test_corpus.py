"""The built-in corpus: deterministic shards and manifest, path-hash split, clear errors."""
from __future__ import annotations

import json

import pytest

from lib.data.corpus import CorpusConfig, build_corpus, iter_records, list_source_files, split_of, stdlib_root
from lib.errors import UserError


def test_two_builds_are_byte_identical(tmp_path):
    cfg = CorpusConfig(max_files=300, shard_bytes=500_000)
    m1 = build_corpus(cfg, tmp_path / "a")
    m2 = build_corpus(cfg, tmp_path / "b")
    assert m1 == m2
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert len([f for f in files_a if f.startswith("train-")]) > 1  # several shards
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_describes_shards(tmp_path):
    m = build_corpus(CorpusConfig(max_files=200), tmp_path / "c")
    for split, info in m["splits"].items():
        records = list(iter_records(tmp_path / "c", split))
        assert len(records) == info["records"] > 0
        assert sum(len(r["text"].encode()) for r in records) == info["text_bytes"]
        for r in records:
            assert set(r) == {"id", "text", "source"}
            assert split_of(r["source"], m["val_per_mille_used"]) == split
            assert "\r" not in r["text"]
            assert (stdlib_root() / r["source"]).is_file()


def test_split_depends_on_path_only(tmp_path):
    import hashlib

    files = list_source_files(stdlib_root())
    assert files == sorted(files) and len(files) > 300
    # the split is the sha256 of the path, bucketed per mille (an independent computation)
    bucket = {f: int(hashlib.sha256(f.encode()).hexdigest()[:16], 16) % 1000 for f in files}
    val = {f for f in files if split_of(f, 20) == "val"}
    assert val == {f for f in files if bucket[f] < 20} and 0.005 < len(val) / len(files) < 0.05
    # a larger held-out share only moves files from train to val
    assert val < {f for f in files if split_of(f, 40) == "val"}
    # built corpora of different sizes put every file they share in the same split
    splits = []
    for n in (40, 120):
        build_corpus(CorpusConfig(max_files=n, val_per_mille=100), tmp_path / str(n))
        splits.append({r["id"]: s for s in ("train", "val") for r in iter_records(tmp_path / str(n), s)})
    assert set(splits[0]) < set(splits[1]) and all(splits[1][i] == s for i, s in splits[0].items())
    assert set(splits[0].values()) == {"train", "val"}


def test_rebuild_keeps_existing_folder_when_unchanged(tmp_path):
    cfg = CorpusConfig(max_files=50)
    build_corpus(cfg, tmp_path / "d")
    before = (tmp_path / "d" / "manifest.json").stat().st_mtime_ns
    build_corpus(cfg, tmp_path / "d")
    assert (tmp_path / "d" / "manifest.json").stat().st_mtime_ns == before
    changed = build_corpus(CorpusConfig(max_files=60), tmp_path / "d")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["content_hash"] == changed["content_hash"]


def test_empty_split_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(UserError, match="val split is empty"):
        build_corpus(CorpusConfig(max_files=3, val_per_mille=0), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    assert list(tmp_path.iterdir()) == []


def test_local_folder_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.txt").write_bytes(f"line {i}\r\nsecond\n".encode())
    m = build_corpus(CorpusConfig(source=str(src), val_per_mille=200), tmp_path / "out")
    assert m["splits"]["train"]["records"] + m["splits"]["val"]["records"] == 40
    assert [i["file"] for i in m["inputs"]][:3] == ["f0.txt", "f1.txt", "f10.txt"]
    assert all("\r" not in r["text"] for r in iter_records(tmp_path / "out", "train"))
    with pytest.raises(UserError, match="matches no"):
        build_corpus(CorpusConfig(source=str(tmp_path / "missing")), tmp_path / "out2")


def test_atomic_npy_streams_rows_and_never_leaves_a_partial_file(tmp_path):
    import numpy as np

    from lib.files import atomic_npy, npy_header

    path = tmp_path / "ids.npy"
    rows = np.arange(3000, dtype=np.int64).reshape(-1, 2)
    with atomic_npy(path, "<i8", (2,)) as out:
        for part in np.array_split(rows, 7):
            out.write(part.tobytes())
    assert np.array_equal(np.load(path), rows) and np.array_equal(np.load(path, mmap_mode="r"), rows)
    with pytest.raises(RuntimeError):  # a failure midway: the earlier file stays as it was
        with atomic_npy(path, "<i8", (2,)) as out:
            out.write(rows[:5].tobytes())
            raise RuntimeError("interrupted")
    with pytest.raises(ValueError, match="not whole rows"):
        with atomic_npy(path, "<i8", (2,)) as out:
            out.write(b"\0" * 8)
    assert np.array_equal(np.load(path), rows) and [p.name for p in tmp_path.iterdir()] == ["ids.npy"]
    with atomic_npy(path, "<u2") as out:  # nothing written: an empty array
        pass
    assert np.load(path).shape == (0,)
    assert len(npy_header("<u4", (10**18,))) == len(npy_header("<i8", (0, 2))) == 128


def test_plain_text_becomes_documents_that_join_back_exactly():
    from lib.data.corpus import text_documents

    text = "Title\n\nFirst paragraph,\ntwo lines.\n\n  \n\nSecond.\n" + ("A long line of words here.\n" * 400) + "\nEnd"
    for mode in ("paragraphs", "chunks", "auto"):
        docs = text_documents(text, mode, chunk_bytes=2000)
        assert "".join(piece for _, piece in docs) == text  # nothing lost, nothing added
        # each document starts on the line its number says
        assert all(text.splitlines()[line - 1] == piece.splitlines()[0] for line, piece in docs)
    paragraphs = text_documents(text, "paragraphs", 2000)
    assert [p for _, p in paragraphs[:3]] == ["Title\n\n", "First paragraph,\ntwo lines.\n\n  \n\n",
                                              "Second.\n" + "A long line of words here.\n" * 400 + "\n"]
    chunks = text_documents(text, "chunks", 2000)
    sizes = [len(p.encode()) for _, p in chunks]
    assert len(chunks) >= 5 and all(1000 <= s <= 3000 for s in sizes[:-1]), sizes
    assert text_documents(text, "auto", 100_000) == [(1, text)] == text_documents(text, "file", 10)


def test_one_text_file_is_split_and_held_out_by_chunk(tmp_path):
    from pydoc_data.topics import topics

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(topics[k] for k in sorted(topics))[:300_000], encoding="utf-8")
    manifest = build_corpus(CorpusConfig(source=str(book)), tmp_path / "c")
    records = {s: list(iter_records(tmp_path / "c", s)) for s in ("train", "val")}
    assert manifest["splits"]["val"]["records"] >= 1 and manifest["splits"]["train"]["records"] > 20
    assert {r["id"] for r in records["val"]}.isdisjoint(r["id"] for r in records["train"])
    ordered = sorted(records["train"] + records["val"], key=lambda r: r["line"])
    assert "".join(r["text"] for r in ordered) == book.read_text(encoding="utf-8")
    # a file of a few chunks still gets a held-out one (no floors): the chunk with the lowest hash
    small = tmp_path / "small.txt"
    small.write_text("\n\n".join(f"paragraph {i} " * 40 for i in range(6)), encoding="utf-8")
    manifest = build_corpus(CorpusConfig(source=str(small), text_docs="paragraphs", val_min_bytes=0, val_min_docs=0),
                            tmp_path / "s")
    assert manifest["splits"]["val"]["records"] == 1 and manifest["splits"]["train"]["records"] == 5
    assert manifest["held_out_by_rule"] == [next(iter(iter_records(tmp_path / "s", "val")))["id"]]


def test_held_out_split_is_raised_to_its_floor_in_bytes_and_documents(tmp_path):
    """A share too small for a small corpus is raised, a tenth of a percent at a time and by
    document hash alone, until the split holds val_min_bytes and val_min_docs; capped at
    val_max_per_mille, where tokenize.py warns that the figures on it are noisy."""
    from lib.data.corpus import bucket_of

    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": f"document {i} " + "word " * 400}) + "\n" for i in range(300)))
    cfg = CorpusConfig(source=str(src), val_per_mille=20, val_min_bytes=40_000, val_min_docs=15)
    m = build_corpus(cfg, tmp_path / "c")
    val, train = (list(iter_records(tmp_path / "c", s)) for s in ("val", "train"))
    share = m["val_per_mille_used"]
    assert 20 < share <= 100 and m["splits"]["val"]["text_bytes"] >= 40_000 and len(val) >= 15
    assert all(bucket_of(r["id"]) < share for r in val) and all(bucket_of(r["id"]) >= share for r in train)
    # the smallest share that reaches the floors: one tenth of a percent less does not
    below = [r for r in val if bucket_of(r["id"]) < share - 1]
    assert sum(len(r["text"].encode()) for r in below) < 40_000 or len(below) < 15
    assert build_corpus(cfg, tmp_path / "again") == m  # deterministic

    # a floor out of reach stops at the cap, and tokenize.py says so
    from conftest import run_script

    proc = run_script("scripts/tokenize.py", "--corpus.source", str(src), "--out_dir", str(tmp_path / "t"),
                      "--tokenizer.vocab_size", "300", "--corpus.val_min_bytes", "10000000")
    m = json.loads((tmp_path / "t" / "corpus" / "manifest.json").read_text())
    assert m["val_per_mille_used"] == 100
    assert "share raised from 2% to 10% of documents" in proc.stdout and "WARNING: below the floor" in proc.stdout
