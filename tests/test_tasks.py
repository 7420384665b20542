"""eval.py --tasks: lm-evaluation-harness tasks from local files, offline, written to the same
metrics files; its rolling log-likelihood over the held-out text agrees with eval.py's bits per
byte."""
from __future__ import annotations

import json

import pytest

from conftest import BITWISE, run_script, train

MC = """task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""
ROLLING = """task: local_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("tasks")
    train(tiny_data, runs, "small", *BITWISE, "--max_steps", "60", "--checkpoint_every", "0", "--eval_every", "0")
    return runs / "small"


def test_local_tasks_run_offline_and_agree_with_eval(run, tiny_data, tmp_path):
    from lib.data.corpus import iter_records

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": f"def f{i}(x):\n    return", "choices": [" x", " 12345", " ((("], "answer": 0} for i in range(12)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(MC.format(data=tasks / "mc.jsonl"))
    texts = [r["text"] for r in iter_records(tiny_data / "corpus", "val")]
    (tasks / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tasks / "heldout.yaml").write_text(ROLLING.format(data=tasks / "heldout.jsonl"))

    proc = run_script("scripts/eval.py", "--model", str(run), "--tasks", "local_mc", "local_heldout",
                      "--tasks_dir", str(tasks), "--out_dir", str(tmp_path / "out"))
    rows = {r["task"]: r for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())}
    assert set(rows) == {"local_mc", "local_heldout"} and all(r["type"] == "task" for r in rows.values())
    assert 0 <= rows["local_mc"]["acc"] <= 1 and rows["local_mc"]["documents"] == 12
    assert (tmp_path / "out" / "metrics.parquet").is_file() and "local_heldout" in proc.stdout
    # the same text, in disjoint windows as the harness scores it: bits per byte within 0.5%
    run_script("scripts/eval.py", "--model", str(run), "--stride", "64", "--samples", "0", "--out_dir",
               str(tmp_path / "own"))
    own = json.loads((tmp_path / "own" / "metrics.jsonl").read_text().splitlines()[-1])["bits_per_byte"]
    assert abs(rows["local_heldout"]["bits_per_byte"] - own) / own < 0.005, (rows["local_heldout"], own)

    proc = run_script("scripts/eval.py", "--model", str(run), "--tasks", "no_such_task", "--tasks_dir", str(tasks),
                      check=False)
    assert proc.returncode != 0 and "--tasks no_such_task: no such task" in proc.stderr
