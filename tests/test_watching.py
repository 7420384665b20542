"""What a researcher watches during a run: greedy samples every --sample_every steps and at the
end, and harness tasks every --tasks_every steps, each in the log, metrics.jsonl and the run's
other sinks; a stopped and resumed run records the same as a straight one."""
from __future__ import annotations

import json

from conftest import BITWISE, train
from test_tasks import MC


def records(run, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_samples_every_n_steps_and_at_the_end_and_the_same_after_a_resume(tiny_data, tmp_path):
    common = (*BITWISE, "--max_steps", "12", "--log_every", "4", "--eval_every", "0", "--checkpoint_every", "0",
              "--sample_every", "5", "--sample_tokens", "12")
    proc = train(tiny_data, tmp_path, "straight", *common)
    samples = records(tmp_path / "straight", "sample")
    assert [r["step"] for r in samples] == [5] * 3 + [10] * 3 + [12] * 3  # three held-out openings each time
    assert all(r["prompt"] and isinstance(r["text"], str) for r in samples)
    assert len({r["prompt"] for r in samples}) == 3
    assert f"sample step 5: {samples[0]['prompt'][-60:]!r}" in proc.stdout
    text = (tmp_path / "straight" / "samples.txt").read_text()
    assert text.count("--- step ") == 9 and text.index("--- step 5,") < text.index("--- step 12,")
    assert samples[0]["prompt"] + samples[0]["text"] in text
    # stopped at step 7 (samples then, off their interval) and resumed: the log holds what the straight run's does
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "7")
    assert [r["step"] for r in records(tmp_path / "resumed", "sample")][-1] == 7
    train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert records(tmp_path / "resumed", "sample") == samples
    assert (tmp_path / "resumed" / "samples.txt").read_text() == text


def test_sample_prompts_are_continued_as_given(tiny_data, tmp_path):
    train(tiny_data, tmp_path, "prompts", *BITWISE, "--max_steps", "3", "--eval_every", "0", "--checkpoint_every", "0",
          "--sample_every", "100", "--sample_prompts", "import os", "def main(", "--sample_tokens", "6")
    samples = records(tmp_path / "prompts", "sample")
    assert [(r["step"], r["prompt"]) for r in samples] == [(3, "import os"), (3, "def main(")]


def test_tasks_every_n_steps_write_one_record_per_task_to_every_sink(tiny_data, tmp_path):
    from test_tracking import mlflow_runs

    tasks = tmp_path / "task_files"
    tasks.mkdir()
    rows = [{"question": f"def f{i}(x):\n    return", "choices": [" x", " 12345", " ((("], "answer": 0} for i in range(6)]
    (tasks / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mc.yaml").write_text(MC.format(data=tasks / "mc.jsonl"))
    proc = train(tiny_data, tmp_path, "tasks", "--max_steps", "10", "--eval_every", "5", "--checkpoint_every", "0",
                 "--tasks", "local_mc", "--tasks_dir", str(tasks), "--tasks_every", "4", "--tracking.mlflow", "--metrics_out", "ndjson,csv")
    found = records(tmp_path / "tasks", "task")
    assert [(r["step"], r["task"], r["documents"]) for r in found] == [(4, "local_mc", 6), (8, "local_mc", 6),
                                                                      (10, "local_mc", 6)]
    assert all(0 <= r["task_local_mc_acc"] <= 1 for r in found)
    assert "task step 4: local_mc acc" in proc.stdout
    client, runs = mlflow_runs(tmp_path / "mlflow.db")
    history = client.get_metric_history(runs[0].info.run_id, "task_local_mc_acc")
    assert [(m.step, m.value) for m in history] == [(r["step"], r["task_local_mc_acc"]) for r in found]
    assert "task_local_mc_acc" in (tmp_path / "tasks" / "metrics.csv").read_text().splitlines()[0]
    assert (tmp_path / "tasks" / "loss.png").is_file()


def test_tasks_that_cannot_run_are_refused_before_training(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "none", "--max_steps", "2", "--tasks_every", "4", check=False)
    assert proc.returncode == 2 and "--tasks_every 4: name the tasks to run with --tasks" in proc.stderr
    proc = train(tiny_data, tmp_path, "none", "--max_steps", "2", "--tasks", "no_such_task", "--tasks_dir",
                 str(tmp_path), check=False)
    assert proc.returncode == 2 and "--tasks no_such_task: no such task" in proc.stderr
    assert not (tmp_path / "none").exists()
