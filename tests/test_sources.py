"""Corpora from local files: formats, templates, normalization, and bad input named by file and
line, with skip policies that count what they drop and never a partial manifest on error."""
from __future__ import annotations

import json

import pytest

from lib.data.corpus import CorpusConfig, NormalizeConfig, build_corpus, iter_records
from lib.errors import UserError


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def all_records(out):
    return list(iter_records(out, "train")) + list(iter_records(out, "val"))


def build(tmp_path, **kw):
    kw.setdefault("val_per_mille", 300)
    return build_corpus(CorpusConfig(**kw), tmp_path / "out")


def test_jsonl_records_keep_file_and_line(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}", "n": i} for i in range(30)])
    m = build(tmp_path, source=str(src))
    recs = sorted(all_records(tmp_path / "out"), key=lambda r: r["line"])
    assert len(recs) == 30 and recs[4] == {"id": "a.jsonl:5", "text": "doc 4", "source": "a.jsonl", "line": 5}
    assert m["inputs"][0]["file"] == "a.jsonl" and len(m["inputs"][0]["sha256"]) == 64


def test_template_over_fields_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"title": f"T{i}", "body": f"B{i}", "n": i} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    build(tmp_path, source=str(tmp_path / "d.parquet"), template="{title}\n\n{body}")
    recs = sorted(all_records(tmp_path / "out"), key=lambda r: r["line"])
    assert recs[0]["text"] == "T0\n\nB0" and recs[0]["id"] == "d.parquet:1"
    with pytest.raises(UserError, match="no column 'text'"):
        build(tmp_path, source=str(tmp_path / "d.parquet"))


def test_globs_and_directories(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for i in range(12):
        (tmp_path / "d" / "sub" / f"{i}.txt").write_text(f"text {i}")
    jsonl(tmp_path / "d" / "x.jsonl", [{"text": f"j{i}"} for i in range(12)])
    m = build(tmp_path, source=f"{tmp_path / 'd'},{tmp_path / 'd' / 'sub' / '1*.txt'}")
    # the directory gives 13 files, the glob 3 more (1, 10, 11: listed again on purpose)
    assert len(m["inputs"]) == 16
    with pytest.raises(UserError, match=r"'.*nothing\*\.txt' matches no"):
        build(tmp_path, source=str(tmp_path / "nothing*.txt"))


def test_saved_dataset(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict({"content": [f"row {i}" for i in range(20)]})
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    build(tmp_path, source=str(tmp_path / "ds"), text_field="content", dataset_split="train")
    assert sorted(r["text"] for r in all_records(tmp_path / "out")) == sorted(f"row {i}" for i in range(20))
    with pytest.raises(UserError, match="dataset_split"):
        build(tmp_path, source=str(tmp_path / "ds"), text_field="content")


@pytest.mark.parametrize("bad_line, message, kind", [
    ('{"text": "ok", ', "malformed JSON", "malformed_json"),
    ('{"body": "no text field"}', "no field 'text'", "missing_field"),
    ('{"text": 42}', "is a int, not a string", "not_a_string"),
    ('["a", "list"]', "expected a JSON object", "not_an_object"),
])
def test_bad_jsonl_line_named_or_skipped(tmp_path, bad_line, message, kind):
    rows = [{"text": f"good {i}"} for i in range(20)]
    src = jsonl(tmp_path / "b.jsonl", rows[:6] + [bad_line] + rows[6:])
    with pytest.raises(UserError) as err:
        build(tmp_path, source=str(src))
    assert f"{src}:7" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp*"))  # nothing half-written
    m = build(tmp_path, source=str(src), on_bad_record="skip")
    assert m["skipped"] == {kind: 1}
    assert len(all_records(tmp_path / "out")) == 20


def test_bad_utf8_error_skip_replace(tmp_path):
    src = tmp_path / "u.jsonl"
    good = "".join(json.dumps({"text": f"g{i}"}) + "\n" for i in range(15)).encode()
    src.write_bytes(good + b'{"text": "bad \xff byte"}\n' + good)
    with pytest.raises(UserError, match=rf"{src}:16: byte offset {len(good) + 14} is not UTF-8"):
        build(tmp_path, source=str(src))
    assert build(tmp_path, source=str(src), on_bad_utf8="skip")["skipped"] == {"not_utf8_skipped": 1}
    m = build(tmp_path, source=str(src), on_bad_utf8="replace")
    assert m["skipped"] == {"not_utf8_replaced": 1}
    assert "bad \ufffd byte" in [r["text"] for r in all_records(tmp_path / "out")]
    txt = tmp_path / "t.txt"
    txt.write_bytes(b"abc\xfe")
    with pytest.raises(UserError, match=rf"{txt}: byte offset 3 is not UTF-8"):
        build(tmp_path, source=str(txt))


def test_empty_inputs(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match=rf"{tmp_path / 'e.jsonl'}: the file is empty"):
        build(tmp_path, source=str(tmp_path / "e.jsonl"))
    jsonl(tmp_path / "few.jsonl", [{"text": "only one"}])
    with pytest.raises(UserError, match="split is empty"):
        build(tmp_path, source=str(tmp_path / "few.jsonl"))
    assert not (tmp_path / "out").exists()


def test_normalization_is_applied_and_recorded(tmp_path):
    src = jsonl(tmp_path / "n.jsonl", [{"text": "  caf\u0065\u0301\r\nx  "}] * 10)
    m = build(tmp_path, source=str(src), normalize=NormalizeConfig(unicode="NFC", strip=True))
    assert {r["text"] for r in all_records(tmp_path / "out")} == {"caf\u00e9\nx"}
    assert m["normalization"] == {"unicode": "NFC", "newlines": "lf", "strip": True}
    build(tmp_path, source=str(src), normalize=NormalizeConfig(newlines="keep"))
    assert {r["text"] for r in all_records(tmp_path / "out")} == {"  caf\u0065\u0301\r\nx  "}


def test_datasets_loader_streams_local_files(tmp_path):
    """--corpus.loader reads any builder's local files through datasets' streaming mode, hashes
    them, and names the row of a bad record."""
    (tmp_path / "csv").mkdir()
    for k in range(2):
        (tmp_path / "csv" / f"part{k}.csv").write_text(
            "title,body\n" + "".join(f"t{k}{i},body {k} {i}\n" for i in range(20)), encoding="utf-8")
    m = build(tmp_path, source=str(tmp_path / "csv"), loader="csv", template="{title}: {body}")
    recs = all_records(tmp_path / "out")
    assert sorted(r["text"] for r in recs) == sorted(f"t{k}{i}: body {k} {i}" for k in range(2) for i in range(20))
    assert [i["file"] for i in m["inputs"]] == ["part0.csv", "part1.csv"] and all(len(i["sha256"]) == 64 for i in m["inputs"])
    assert {r["source"] for r in recs} == {"csv"} and sorted(r["line"] for r in recs) == list(range(1, 41))

    src = jsonl(tmp_path / "rows.json", [{"text": f"doc {i}" if i != 1 else 2} for i in range(12)])
    with pytest.raises(UserError, match=r"json over corpus.source: row 2: field 'text' is a int"):
        build(tmp_path, source=str(src), loader="json")
    m = build(tmp_path, source=str(src), loader="json", on_bad_record="skip")
    assert m["skipped"] == {"not_a_string": 1} and len(all_records(tmp_path / "out")) == 11
    with pytest.raises(UserError, match="matches no file"):
        build(tmp_path, source=str(tmp_path / "nothing*.json"), loader="json")
    with pytest.raises(UserError, match="loading scripts"):
        build(tmp_path, source=str(src), loader="my_loader.py")
    with pytest.raises(UserError, match="'someone/dataset': neither a datasets builder name .* hub datasets are not fetched"):
        build(tmp_path, source=str(src), loader="someone/dataset")


def test_parquet_instructions_keep_their_answer_and_system_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}", "system": "Be brief.", "n": i} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "i.parquet")
    build(tmp_path, source=str(tmp_path / "i.parquet"), template="{instruction}[\\n\\n{input}]",
          completion_field="output")
    rec = next(r for r in all_records(tmp_path / "out") if r["line"] == 1)
    assert rec["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q0"},
                               {"role": "assistant", "content": "A0"}]
