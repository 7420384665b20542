"""Weighted mixtures (train.py --data.mix, lib/data/mixture.py): shares of training tokens held
row by row, a resumable draw, each source's held-out figures in every sink, and bad mixtures
refused in one line before anything is written."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from conftest import BITWISE, run_script, train
from helpers.base_models import book_texts
from lib.data.mixture import MixtureSampler, mixture_figures, parse_mix
from lib.errors import UserError
from lib.records.metrics import read_jsonl


@pytest.fixture(scope="module")
def book(tiny_data, tmp_path_factory):
    """English prose (Python's documentation topics) encoded with tiny_data's tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    text = root / "book.txt"
    text.write_text("\n\n".join(book_texts())[:200_000], encoding="utf-8")
    out = root / "book"
    run_script("scripts/tokenize.py", "--corpus.source", str(text), "--tokenizer", str(tiny_data / "tokenizer"),
               "--out_dir", str(out), "--corpus.val_per_mille", "100")
    return out


def test_weights_are_parsed_as_shares_and_bad_items_are_named():
    sources = parse_mix(["data/a:3,data/b:1"])
    assert [(str(s.dir), s.weight, s.name) for s in sources] == [("data/a", 0.75, "a"), ("data/b", 0.25, "b")]
    assert [s.weight for s in parse_mix(["data/a:0.7", "data/b:0.3"])] == pytest.approx([0.7, 0.3])  # a YAML list
    for spec, says in ((["data/a"], "DIR:WEIGHT"), (["data/a:x"], "'x' is not a number"),
                       (["data/a:0,data/b:1"], "above 0"), (["data/a:-1"], "above 0"), (["data/a:nan"], "above 0"),
                       (["data/a:1,data/a:2"], "named twice")):
        with pytest.raises(UserError, match=says):
            parse_mix(spec)
    assert [s.name for s in parse_mix(["x/data:1,y/data:1"])] == ["data_0", "data_1"]


def test_every_prefix_of_the_draw_keeps_each_share_within_one_row_and_resumes_exactly():
    sizes, weights = [50, 7, 20], [0.6, 0.1, 0.3]
    sampler = MixtureSampler(sizes, weights, batch_size=4, seed=3)
    rows = [item for _ in range(200) for item in sampler.next_batch()]
    for k in range(1, len(rows) + 1):
        counts = np.bincount([s for s, _ in rows[:k]], minlength=3)
        assert np.all(np.abs(counts - k * np.array(weights)) < 1), k
    # within a source: each pass a fresh permutation of all its blocks
    small = [i for s, i in rows if s == 1]
    assert sorted(small[:7]) == list(range(7)) and sorted(small[7:14]) == list(range(7)) and small[:7] != small[7:14]
    # a sampler restored from a state continues the same draw
    again = MixtureSampler(sizes, weights, batch_size=4, seed=3)
    first = [again.next_batch() for _ in range(50)]
    state = json.loads(json.dumps(again.state_dict()))  # as a checkpoint stores it
    resumed = MixtureSampler(sizes, weights, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert sum(first, []) + sum((resumed.next_batch() for _ in range(150)), []) == rows
    # two ranks take disjoint halves of the same schedule
    r0, r1 = (MixtureSampler(sizes, weights, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1))
    assert sum(([*r0.next_batch(), *r1.next_batch()] for _ in range(200)), []) == rows
    other = MixtureSampler(sizes, [0.5, 0.2, 0.3], batch_size=4, seed=3)
    with pytest.raises(UserError, match="weights"):
        other.load_state_dict(state)
    other.load_state_dict(state, allow_data_change=True)  # knowingly reweighted: continues from the counts


def test_conversations_and_plain_text_mix_each_row_with_its_own_loss_mask():
    from lib.data.batches import DocBoundary, TokenBlocks
    from lib.data.mixture import MixedBlocks
    from lib.model.loss import IGNORE_INDEX

    text = TokenBlocks([np.arange(1, 42, dtype=np.uint16)], 4)
    talk_ids = np.arange(100, 141, dtype=np.uint16)
    talk = TokenBlocks([talk_ids], 4, masks=[(talk_ids % 2).astype(np.uint8)])  # every other token an answer's
    batch = MixedBlocks([text, talk]).make_batch([(0, 0), (1, 2), (0, 3)], DocBoundary(1))
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [108, 109, 110, 111], [13, 14, 15, 16]]
    assert batch.labels.tolist() == [[2, 3, 4, 5], [109, IGNORE_INDEX, 111, IGNORE_INDEX], [14, 15, 16, 17]]
    assert batch.position_ids.tolist()[0] == [0, 1, 2, 3]


def test_a_source_repeated_past_16_passes_is_warned_about():
    from lib.data.mixture import describe

    sources = parse_mix(["data/big:0.9,data/small:0.1"])
    lines = describe(sources, [1_000_000, 2_000], [10_000, 20], rows=8_000, at_most=True)
    assert lines[0] == "big: data/big, weight 0.900, 1,000,000 tokens, up to 0.7 passes"
    assert lines[1].startswith("small: data/small, weight 0.100, 2,000 tokens, up to 40.0 passes")
    assert lines[2].startswith("warning: data/small would be repeated up to 40 times") and len(lines) == 3


def test_the_mixture_figure_is_what_text_drawn_by_the_weights_scores():
    a = {"loss": 1.0, "accuracy": 0.5, "tokens": 100, "bits_per_byte": 1.0 / math.log(2) / 4, "bytes": 400}
    b = {"loss": 3.0, "accuracy": 0.1, "tokens": 50, "bits_per_byte": 3.0 / math.log(2) / 2, "bytes": 100}
    out = mixture_figures({"a": a, "b": b}, {"a": 0.5, "b": 0.5})
    # a stream of equal token counts from each: 0.5 * 4 + 0.5 * 2 bytes per token
    assert out["loss"] == pytest.approx(2.0) and out["accuracy"] == pytest.approx(0.3)
    assert out["bits_per_byte"] == pytest.approx(2.0 / math.log(2) / 3.0)
    assert mixture_figures({"a": a}, {"a": 1.0})["bits_per_byte"] == pytest.approx(a["bits_per_byte"])


@pytest.fixture(scope="module")
def mixed_run(tiny_data, book, tmp_path_factory):
    runs = tmp_path_factory.mktemp("mixruns")
    proc = train(tiny_data, runs, "mixed", "--data.mix", f"{tiny_data}:0.8,{book}:0.2", "--max_steps", "40",
                 "--eval_every", "20", "--checkpoint_every", "0", "--eval_tokens", "4000", "--log_every", "10",
                 "--metrics_out", "ndjson,csv,parquet", "--tracking.mlflow",
                 "--precision", "fp32")
    return runs / "mixed", proc


def test_a_two_source_run_draws_its_weights_and_reports_each_source_everywhere(mixed_run, tiny_data, book):
    run, proc = mixed_run
    final = next(r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "final")
    shares = {name: final[f"mix_share_{name}"] for name in (tiny_data.name, book.name)}
    assert shares[tiny_data.name] == pytest.approx(0.8, abs=0.01) and shares[book.name] == pytest.approx(0.2, abs=0.01)
    assert f"{book.name} 20.00% (weight 20.00%" in proc.stdout
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        by = {n: (r[f"val_loss_{n}"], r[f"val_bits_per_byte_{n}"]) for n in (tiny_data.name, book.name)}
        assert by[tiny_data.name] != by[book.name]
        assert min(b for _, b in by.values()) < r["val_bits_per_byte"] < max(b for _, b in by.values())
        assert r["val_loss"] == pytest.approx(0.8 * by[tiny_data.name][0] + 0.2 * by[book.name][0])
    assert f"{book.name} {evals[-1][f'val_bits_per_byte_{book.name}']:.4f}" in proc.stdout  # the log line
    import pandas as pd

    for table in (pd.read_csv(run / "metrics.csv"), pd.read_parquet(run / "metrics.parquet")):
        assert table[f"val_bits_per_byte_{book.name}"].dropna().tolist() == pytest.approx(
            [r[f"val_bits_per_byte_{book.name}"] for r in evals])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run.parent / 'mlflow.db'}")
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    assert [m.value for m in client.get_metric_history(run_id, f"val_bits_per_byte_{book.name}")] == pytest.approx(
        [r[f"val_bits_per_byte_{book.name}"] for r in evals])
    report = (run / "report.md").read_text()
    assert f"source {book.name} ({book}): weight 20.00%, drawn 20.00%" in report
    assert f"held-out bits/byte {evals[-1][f'val_bits_per_byte_{book.name}']:.4f}" in report
    head = (run / "config.yaml").read_text().split("\n")
    assert head[0].startswith("# mixture of 2 sources") and any(f"{book.name}: {book}, weight 0.200" in h for h in head)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["mix"] == [f"{tiny_data}:0.8,{book}:0.2"] and config["data"]["dir"] == str(tiny_data)
    provenance = json.loads((run / "provenance.json").read_text())
    assert [m["name"] for m in provenance["data"]["mix"]] == [tiny_data.name, book.name]
    assert (run / "loss.png").stat().st_size > 0


def test_eval_of_a_mixture_run_scores_each_source_and_the_mixture(mixed_run, tiny_data, book):
    run, _ = mixed_run
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", "--max_tokens", "3000")
    records = read_jsonl(run / "eval" / "metrics.jsonl")
    assert [r["source"] for r in records] == [tiny_data.name, book.name, "mixture"]
    by = {r["source"]: r for r in records}
    assert by["mixture"]["loss"] == pytest.approx(0.8 * by[tiny_data.name]["loss"] + 0.2 * by[book.name]["loss"])
    assert "the mixture, by its weights" in proc.stdout
    assert by[book.name]["data"] == str(book / "tokens") and "lzma_bits_per_byte" in by[book.name]


def test_stop_and_resume_on_a_mixture_equals_a_straight_run(tiny_data, book, tmp_path):
    common = ("--data.mix", f"{tiny_data}:0.7,{book}:0.3", "--max_steps", "8", "--checkpoint_every", "4",
              "--eval_every", "4", *BITWISE)
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "parted", *common, "--stop_at_step", "4")
    proc = train(tiny_data, tmp_path, "parted", *common, "--resume", "auto", "--no_overwrite")
    assert "resumed from" in proc.stdout
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("straight", "parted"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["type"] == "train"]
              for name in ("straight", "parted")]
    assert losses[0] == losses[1][-len(losses[0]):]


def test_bad_mixtures_are_one_line_errors_and_nothing_is_written(tiny_data, micro_data, book, tmp_path):
    for mix, says in ((f"{tiny_data}:0.5,{micro_data}:0.5", f"{micro_data} was encoded with another tokenizer"),
                      (f"{tiny_data}:0.5,{book}:0", "above 0"),
                      (f"{tiny_data}:0.5,{tmp_path / 'nothing'}:0.5", "holds no tokenized dataset"),
                      (f"{tiny_data}:half", "is not a number")):
        proc = train(tiny_data, tmp_path, "bad", "--data.mix", mix, check=False)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "bad").exists()
        if "another tokenizer" in says:  # the command that re-encodes the odd one
            assert f"--tokenizer {tiny_data / 'tokenizer'} --out_dir {micro_data} --force" in proc.stderr


def test_the_readme_mixture_commands_as_printed(tiny_data, book, tmp_path):
    """The README's --data.mix recipe in bash as printed (shorter, on the test data: a tiny
    runs/default, data/stdlib and data/book in its tokenizer)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import REPO

    block = next(b for b in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
                 if "--data.mix" in b)
    commands = [c.split("  #")[0] for c in block.replace("\\\n", " ").splitlines() if c.startswith("python ")]
    assert [c.split()[1] for c in commands] == ["scripts/train.py", "scripts/eval.py"]
    for name in ("scripts", "lib", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stdlib").symlink_to(tiny_data)
    (tmp_path / "data" / "book").symlink_to(book)
    train(tiny_data, tmp_path / "runs", "default", "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "0",
          "--eval_tokens", "2000")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    extra = (" --tracking.no_mlflow --max_steps 6 --eval_every 3 --checkpoint_every 0 --eval_tokens 2000 "
             "--data.seq_len 64 --precision fp32", " --max_tokens 2000 --samples 0")
    for command, more in zip(commands, extra):
        proc = subprocess.run(["bash", "-c", command + more], cwd=tmp_path, capture_output=True, text=True, env=env,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "the mixture, by its weights" in proc.stdout
    records = read_jsonl(tmp_path / "runs" / "book-mix" / "eval" / "metrics.jsonl")
    assert [r["source"] for r in records] == ["book", "stdlib", "mixture"]
    assert [r["weight"] for r in records[:2]] == pytest.approx([0.3, 0.7])
