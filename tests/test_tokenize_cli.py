"""scripts/tokenize.py train | encode | decode | inspect, as real subprocesses."""
from __future__ import annotations

import json

from conftest import run_script


def test_train_encode_decode_inspect(tmp_path, tiny_data):
    src = tmp_path / "texts.jsonl"
    lines = [{"text": f"def f{i}(x):\n    return x * {i}\n"} for i in range(200)]
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    tok = tmp_path / "tok"
    run_script("scripts/tokenize.py", "train", "--corpus.source", str(src), "--out_dir", str(tok),
               "--tokenizer.vocab_size", "300")
    assert (tok / "sp.model").is_file() and (tok / "tokenizer.json").is_file()

    proc = run_script("scripts/tokenize.py", "inspect", "--tokenizer", str(tok), "--text", "def f(x):")
    assert "vocab size  300" in proc.stdout and "bos=1" in proc.stdout and "round trip exact: True" in proc.stdout

    ids_file, out_file = tmp_path / "ids.jsonl", tmp_path / "back.jsonl"
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(tok / "sp.model"), "--input", str(src),
                      "--output", str(ids_file), "--max_length", "16", "--padding", "max_length", "--add_eos")
    rows = [json.loads(line) for line in ids_file.read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["ids"]) == 16 == len(r["attention_mask"]) for r in rows)
    assert "padding" in proc.stdout and "MB/s" in proc.stdout
    run_script("scripts/tokenize.py", "decode", "--tokenizer", str(tok), "--input", str(ids_file),
               "--output", str(out_file))
    back = [json.loads(line)["text"] for line in out_file.read_text().splitlines()]
    # short texts survive the round trip; long ones were truncated to 14 tokens of text
    full = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(tok), "--input", str(src),
                      "--output", str(tmp_path / "full.jsonl"))
    assert "padding 0.0%" in full.stdout
    for rec, row, text in zip(lines, rows, back):
        if sum(row["attention_mask"]) < 16:
            assert text == rec["text"]
        else:
            assert rec["text"].startswith(text)


def test_bad_inputs_are_named(tmp_path, tiny_data):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(tiny_data / "tokenizer"), "--input", str(bad),
                      "--output", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and f"{bad}:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.jsonl.tmp").exists()
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(tmp_path / "nope"), "--input", str(bad),
                      check=False)
    assert proc.returncode == 2 and "--tokenizer" in proc.stderr and "no such folder, and not a model name" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(tmp_path / "empty"), "--input", str(bad),
                      check=False)
    assert proc.returncode == 2 and "neither a SentencePiece" in proc.stderr
    proc = run_script("scripts/tokenize.py", "--corpus.source", str(tmp_path / "missing*.jsonl"),
                      "--out_dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "matches no" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d" / "corpus" / "manifest.json").exists()


def test_encode_paths_agree_and_errors_name_the_line(tmp_path, tiny_data):
    """Two worker processes, one, and the general (truncating) path write the same bytes; the ids
    are SentencePiece's own."""
    import sentencepiece as spm

    texts = [f"    def f{i}(self, x):\n        return x  * {i}  \n\n" * (1 + i % 7) for i in range(300)]
    texts += ["", " ", "<s> literal", "tab\there\u2581▁ x"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    model = tiny_data / "tokenizer" / "sp.model"
    outs = {}
    for name, extra in {"two": ["--workers", "2", "--batch_size", "7"], "one": ["--workers", "1"],
                        "general": ["--max_length", "1000000", "--add_eos"]}.items():
        outs[name] = tmp_path / f"{name}.jsonl"
        run_script("scripts/tokenize.py", "encode", "--tokenizer", str(model), "--input", str(src),
                   "--text_field", "body", "--output", str(outs[name]), *extra)
    assert outs["two"].read_bytes() == outs["one"].read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(model))
    rows = [json.loads(line) for line in outs["one"].read_text().splitlines()]
    general = [json.loads(line) for line in outs["general"].read_text().splitlines()]
    assert [r["ids"] for r in rows] == [[1] + sp.encode(t) for t in texts]
    assert [r["ids"] for r in general] == [[1] + sp.encode(t) + [2] for t in texts]
    assert all(r["attention_mask"] == [1] * len(r["ids"]) for r in rows + general)


    # .npy: the same ids end to end, indexed per text, from the fast and the general path
    import numpy as np

    for name, extra in {"npy": ["--workers", "2", "--batch_size", "7"], "npy_general": ["--max_length", "1000000",
                                                                                        "--add_eos"]}.items():
        proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(model), "--input", str(src),
                          "--text_field", "body", "--output", str(tmp_path / f"{name}.npy"), *extra)
        ids, docs = np.load(tmp_path / f"{name}.npy"), np.load(tmp_path / f"{name}.docs.npy")
        want = [r["ids"] for r in (rows if name == "npy" else general)]
        assert ids.dtype == np.uint16 and ids.tolist() == [i for r in want for i in r]
        assert docs.tolist() == [[len(r), len(t.encode())] for r, t in zip(want, texts)]
        assert f"into {len(ids):,} ids" in proc.stdout
    back = tmp_path / "back.jsonl"
    run_script("scripts/tokenize.py", "decode", "--tokenizer", str(model), "--input", str(tmp_path / "npy.npy"),
               "--output", str(back))
    # (SentencePiece decodes a literal "\u2581" as a space: that one text comes back changed)
    assert [json.loads(line)["text"] for line in back.read_text().splitlines()] == [sp.decode(sp.encode(t)) for t in texts]
    # padding has no place in a flat stream; a stream without its table cannot be decoded
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(model), "--input", str(src),
                      "--text_field", "body", "--output", str(tmp_path / "p.npy"), "--padding", "longest",
                      "--pad_token", "eos", check=False)
    assert proc.returncode == 2 and "takes no --padding" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("p.*"))
    (tmp_path / "npy.docs.npy").unlink()
    proc = run_script("scripts/tokenize.py", "decode", "--tokenizer", str(model), "--input", str(tmp_path / "npy.npy"),
                      "--output", str(back), check=False)
    assert proc.returncode == 2 and "npy.docs.npy not found" in proc.stderr
    assert json.loads(back.read_text().splitlines()[0])["text"] == texts[0]  # the earlier output is intact

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nbad \xff byte\n")
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(model), "--input", str(bad),
                      "--output", str(tmp_path / "o.jsonl"), "--workers", "2", check=False)
    assert proc.returncode == 2 and f"{bad}:2: not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
    proc = run_script("scripts/tokenize.py", "encode", "--tokenizer", str(model), "--input", str(bad),
                      "--output", str(tmp_path / "o.npy"), check=False)
    assert proc.returncode == 2 and f"{bad}:2: not UTF-8" in proc.stderr
    assert not list(tmp_path.glob("o.*"))
