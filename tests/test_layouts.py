"""Instruction and chat data as people have it: templates typed in bash, optional template parts,
JSON arrays, ShareGPT, Alpaca, and the messages for what is not read."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script
from lib.data.corpus import CorpusConfig, build_corpus, iter_records
from lib.errors import UserError

WITH_INPUT = {"instruction": "Describe a process of making crepes.", "input": "Use two eggs.",
              "output": "Whisk the eggs with flour and milk, then fry thin layers."}
NO_INPUT = {"instruction": "Name a colour.", "input": "", "output": "Blue."}


def alpaca_array(path: Path, n: int = 40) -> Path:
    """An Alpaca-shaped file: a pretty-printed JSON array, two records in three with an empty input."""
    records = [dict(WITH_INPUT) if i % 3 == 0 else dict(NO_INPUT, instruction=f"Name colour {i}.") for i in range(n)]
    path.write_text(json.dumps(records, indent=4))
    return path


def sharegpt(path: Path, n: int = 30) -> Path:
    rows = [{"id": f"c{i}", "conversations": [
        {"from": "system", "value": "Answer briefly."}, {"from": "human", "value": f"What is {i} plus {i}?"},
        {"from": "gpt", "value": f"{2 * i}."}, {"from": "human", "value": "Twice that?"},
        {"from": "gpt", "value": f"{4 * i}."}]} for i in range(n)]
    path.write_text(json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def small(**kw) -> CorpusConfig:
    return CorpusConfig(val_min_bytes=100, val_min_docs=2, **kw)


def records(out: Path) -> list[dict]:
    return list(iter_records(out, "train")) + list(iter_records(out, "val"))


def readme_templates() -> list[str]:
    """Every --corpus.template argument the README shows, exactly as it is quoted there."""
    text = (REPO / "README.md").read_text()
    return re.findall(r"--corpus\.template\s+('[^']*')", text)


def test_readme_templates_typed_into_bash_give_newlines_and_leave_out_empty_parts():
    found = readme_templates()
    assert len(found) >= 2, found
    fields = {"title": "T", "body": "B", "instruction": "Do it.", "input": ""}
    for quoted in found:
        code = ("import sys, json; from lib.data.sources import Template; "
                f"print(json.dumps(Template(sys.argv[1]).render({fields!r})))")
        out = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {quoted}"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        rendered = json.loads(out)
        assert "\\" not in rendered, (quoted, rendered)
        assert rendered in ("T\n\nB", "Do it."), (quoted, rendered)


def test_template_escapes_and_optional_parts():
    from lib.data.sources import Template

    cli = Template(r"{instruction}[\n\n{input}]")  # as bash's single quotes pass it
    yaml_string = Template("{instruction}[\n\n{input}]")  # a YAML string holding real newlines
    for t in (cli, yaml_string):
        assert t.render({"instruction": "I", "input": "X"}) == "I\n\nX"
        assert t.render({"instruction": "I", "input": ""}) == "I"
        assert t.render({"instruction": "I", "input": "  "}) == "I"
        assert t.render({"instruction": "I"}) == "I"
        assert t.required == ["instruction"] and t.fields == ["instruction", "input"]
    assert Template(r"a\tb\\n").render({}) == "a\tb\\n"
    assert Template("[INST] {q} [/INST]").render({"q": "hi"}) == "[INST] hi [/INST]"
    assert Template(r"\[{q}\]").render({"q": ""}) == "[]"
    for bad, what in (("{a}[x", "unmatched"), ("{a}[[{b}]]", "unmatched"), ("{a", "expected '}'"),
                      ("{a.b}", "not a plain name")):
        with pytest.raises(UserError, match=re.escape(what)):
            Template(bad)


def test_the_readme_alpaca_command_as_printed(tmp_path):
    """The README's Alpaca tokenize command, copied into bash in a folder that has the files it names."""
    from helpers.base_models import save_gpt2_base

    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "alpaca_data.json" in b)
    command = next(c for c in block.replace("\\\n", " ").splitlines() if "tokenize.py" in c)
    for name in ("scripts", "lib", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    save_gpt2_base(tmp_path / "runs" / "default" / "final")
    alpaca_array(tmp_path / "alpaca_data.json")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = records(tmp_path / "data" / "alpaca" / "corpus")
    assert len(out) == 40 and all("messages" in r for r in out)
    prompts = {r["messages"][0]["content"] for r in out}
    assert f"{WITH_INPUT['instruction']}\n\n{WITH_INPUT['input']}" in prompts
    assert "Name colour 1." in prompts
    assert not any("\\" in p or p.endswith("\n") for p in prompts), prompts


def test_alpaca_recognised_and_named(tmp_path):
    src = alpaca_array(tmp_path / "alpaca_data.json")
    for kw in ({}, {"format": "alpaca"}):
        build_corpus(small(source=str(src), **kw), tmp_path / f"out{len(kw)}")
        got = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records(tmp_path / f"out{len(kw)}")}
        assert got["Name colour 2."] == "Blue." and len(got) == 27  # 13 alike with an input, 27 distinct prompts


def test_sharegpt_and_json_arrays_read_without_conversion(tmp_path):
    for name in ("chats.json", "chats.jsonl"):
        src = sharegpt(tmp_path / name)
        m = build_corpus(small(source=str(src)), tmp_path / name.replace(".", "_"))
        assert m["conversations"] == 30 and m["skipped"] == {}
        r = next(r for r in records(tmp_path / name.replace(".", "_")) if r["id"].endswith(":1"))
        assert [x["role"] for x in r["messages"]] == ["system", "user", "assistant", "user", "assistant"]
        assert r["messages"][1]["content"] == "What is 0 plus 0?" and r["messages"][4]["content"] == "0."
    # a JSON array of plain text records; a malformed element named by its line; one object is no record
    (tmp_path / "texts.json").write_text(json.dumps([{"text": f"doc {i}"} for i in range(12)], indent=1))
    build_corpus(small(source=str(tmp_path / "texts.json")), tmp_path / "texts")
    assert sorted(r["text"] for r in records(tmp_path / "texts")) == sorted(f"doc {i}" for i in range(12))
    (tmp_path / "bad.json").write_text('[\n {"text": "a"},\n {"text": "b",\n  "x": }\n]')
    with pytest.raises(UserError, match=r"bad.json:4: record 2 of the array is malformed JSON"):
        build_corpus(small(source=str(tmp_path / "bad.json")), tmp_path / "bad")
    (tmp_path / "one.json").write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    with pytest.raises(UserError, match=r"one.json: one JSON object \(keys: data\)"):
        build_corpus(small(source=str(tmp_path / "one.json")), tmp_path / "one")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "one").exists()


def test_sharegpt_through_the_tokenizer_trains_on_the_answers_alone(tmp_path):
    """tokenize.py on a ShareGPT file: the loss mask covers the gpt turns (and their eos) and nothing else."""
    import numpy as np

    from transformers import AutoTokenizer

    from lib.data.batches import load_masks, load_shards

    src = sharegpt(tmp_path / "chats.json")
    out = tmp_path / "data"
    run_script("scripts/tokenize.py", "--corpus.source", str(src), "--out_dir", str(out), "--tokenizer.vocab_size",
               "300", "--corpus.val_min_bytes", "100", "--corpus.val_min_docs", "2")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ids = np.concatenate(load_shards(out / "tokens", "train"))
    mask = np.concatenate(load_masks(out / "tokens", "train"))
    trained = tok.decode(ids[mask.astype(bool)].tolist())
    assert "plus" not in trained and "briefly" not in trained and "Twice" not in trained
    assert re.search(r"\d+\.", trained)


def test_unknown_layouts_and_skips_that_leave_nothing_are_explained(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(5)))
    with pytest.raises(UserError) as err:
        build_corpus(small(source=str(src)), tmp_path / "a")
    msg = str(err.value)
    assert msg.startswith(f"{src}:1: ") and "question, answer" in msg
    for layout in ("messages", "sharegpt", "prompt_completion", "alpaca", "--corpus.template", "--corpus.format"):
        assert layout in msg, (layout, msg)
    with pytest.raises(UserError, match=r"every record was skipped \(5 missing_field\); the first: .*qa.jsonl:1"):
        build_corpus(small(source=str(src), on_bad_record="skip"), tmp_path / "b")
    chats = sharegpt(tmp_path / "chats.jsonl")
    with pytest.raises(UserError, match=r"is a list, not a string; a list of turns is read as a conversation"):
        build_corpus(small(source=str(chats), text_field="conversations"), tmp_path / "c")
    with pytest.raises(UserError, match=r"every record was skipped \(30 not_a_string\)"):
        build_corpus(small(source=str(chats), text_field="conversations", on_bad_record="skip"), tmp_path / "d")
    bad_role = tmp_path / "roles.jsonl"
    bad_role.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                      {"from": "function_call", "value": "{}"}]}) + "\n")
    with pytest.raises(UserError, match=r"roles.jsonl:1: message 2 has from 'function_call'"):
        build_corpus(small(source=str(bad_role)), tmp_path / "e")


def test_tokenize_help_names_every_layout():
    out = run_script("scripts/tokenize.py", "--help").stdout
    for layout in ("messages", "sharegpt", "prompt_completion", "alpaca", "conversations", ".json"):
        assert layout in out, layout


def test_advice_on_long_conversations_never_exceeds_the_models_positions(tmp_path):
    """A 128-position base and conversations of up to several hundred tokens: tokenize.py and
    train.py say what to do instead of advising a seq_len the model refuses, and transformers'
    "indexing errors" warning (the project cuts long documents itself) and bitsandbytes' kernel
    noise stay out of the output."""
    from helpers.base_models import save_gpt2_base

    base = save_gpt2_base(tmp_path / "base", n_positions=128)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**cfg, "model_max_length": 128}))
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": " ".join(["a longer answer with words"] * (60 if i % 4 == 0 else 2))}]}
            for i in range(40)]
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    proc = run_script("scripts/tokenize.py", "--corpus.source", str(src), "--tokenizer", str(base), "--out_dir",
                      str(data), "--corpus.val_min_bytes", "100", "--corpus.val_min_docs", "2")
    out = proc.stdout + proc.stderr
    advised = [int(n) for n in re.findall(r"--data\.seq_len (\d+)", out)]
    assert advised and max(advised) <= 128, out
    assert "more than the 128 positions" in out and "model with more positions" in out, out
    assert "indexing errors" not in out and "kernels-community" not in out, out

    from conftest import train

    proc = train(data, tmp_path / "runs", "long", "--model.init_from", str(base), "--data.seq_len", "64",
                 "--max_steps", "1", "--eval_every", "0", "--checkpoint_every", "0")
    out = proc.stdout + proc.stderr
    line = next(x for x in out.splitlines() if "conversation(s) are longer than --data.seq_len 64" in x)
    assert max(int(n) for n in re.findall(r"--data\.seq_len (\d+)", line)) <= 128, line
    assert "more than the model's 128" in line and "--data.seq_len 128, the most it takes" in line, line
    assert "kernels-community" not in out and "indexing errors" not in out


def test_the_held_out_warning_names_the_floor_it_missed(tmp_path):
    src = tmp_path / "notes.jsonl"
    src.write_text("".join(json.dumps({"text": f"note number {i} " * 5}) + "\n" for i in range(110)))
    out = run_script("scripts/tokenize.py", "--corpus.source", str(src), "--out_dir", str(tmp_path / "d"),
                     "--tokenizer.vocab_size", "300").stdout
    line = next(x for x in out.splitlines() if "held-out split:" in x)
    assert "WARNING: below the floor of 100,000 bytes (--corpus.val_min_bytes) even at" in line, line
    assert "documents (--corpus.val_min_docs)" not in line, line
