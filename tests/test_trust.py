"""Nothing trusted unchecked (#33): only a run's own folder is emptied or continued, every reader
of a model folder or token shard verifies it first, the precision is decided once per run and a
probe's absurd or failed reading never decides it, task folders that carry code are refused
unless allowed, an evaluation names (and holds) the weights it scored, and an operator's mistakes
end in one line with nothing written half."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_script, train

QUICK = ("--eval_every", "0", "--eval_tokens", "2000", "--log_every", "1", "--no_mfu")


def listing(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def one_line_error(proc) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode != 0 and lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-step run with a checkpoint at 2 and 4, and its final model."""
    runs = tmp_path_factory.mktemp("trust")
    train(tiny_data, runs, "done", *QUICK, "--max_steps", "4", "--checkpoint_every", "2", "--keep_last_n", "3")
    return runs / "done"


# 1. a folder that was never a run

@pytest.mark.parametrize("extra", [(), ("--overwrite",), ("--resume", "auto")])
def test_a_folder_that_is_not_a_run_is_refused_and_left_untouched(tiny_data, tmp_path, extra):
    home = tmp_path / "home"
    (home / "Documents" / "sub").mkdir(parents=True)
    for name in ("f1.txt", "f2.txt", "sub/f3.txt"):
        (home / "Documents" / name).write_text(f"{name}: the user's own\n")
    (home / "other.txt").write_text("beside it\n")
    before = listing(tmp_path)
    proc = train(tiny_data, home, "Documents", *QUICK, "--max_steps", "2", *extra, check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "not a run" in line and "f1.txt" in line and "sub/" in line, line
    assert "--run_name" in line
    assert listing(tmp_path) == before


def test_a_run_folder_is_still_overwritten_and_resumed(run, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "done")
    proc = train(tiny_data, runs, "done", *QUICK, "--max_steps", "4", "--resume", "auto")
    assert "resumed from" in proc.stdout
    assert "token shards verified against the manifest" in proc.stdout, proc.stdout[-3000:]
    proc = train(tiny_data, runs, "done", *QUICK, "--max_steps", "2", "--overwrite")
    assert "--overwrite: removed the contents" in proc.stdout


# 2. generate checks final/'s checksums

def test_generate_refuses_changed_weights(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "final" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    proc = run_script("scripts/eval.py", "generate", "--model", str(copy), "--prompt", "def ",
                      "--max_new_tokens", "4", check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "model.safetensors" in line and "sha256" in line, line
    proc = run_script("scripts/eval.py", "generate", "--model", str(run), "--prompt", "def ", "--max_new_tokens", "4")
    assert "match checksums.json" in proc.stderr + proc.stdout


# 3. damaged token shards

def damaged_copy(tiny_data: Path, tmp_path: Path, how: str) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    tok = data / "tokens"
    manifest = json.loads((tok / "manifest.json").read_text())
    split = "val" if how == "truncate" else "train"
    entry = manifest["splits"][split]["shards"][0]
    shard = tok / entry["file"]
    if how == "flip":
        blob = bytearray(shard.read_bytes())
        blob[-3] ^= 0x01
        shard.write_bytes(bytes(blob))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif how == "oov":  # ids past the vocabulary, the manifest's sha256 updated to match
        from lib.files import sha256_file

        arr = np.load(shard)
        arr[len(arr) // 2] = manifest["vocab_size"] + 7
        np.save(shard, arr)
        entry["sha256"] = sha256_file(shard)
        (tok / "manifest.json").write_text(json.dumps(manifest))
    elif how == "escape":
        entry["file"] = "../../../../etc/passwd"
        (tok / "manifest.json").write_text(json.dumps(manifest))
    return data, split


@pytest.mark.parametrize("how", ["flip", "truncate", "oov", "escape"])
def test_damaged_token_shards_are_one_line_before_any_work(tiny_data, run, tmp_path, how):
    data, split = damaged_copy(tiny_data, tmp_path, how)
    proc = train(data, tmp_path / "runs", "r", *QUICK, "--max_steps", "2", check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    if how == "escape":
        assert "../../../../etc/passwd" in line and "outside" in line, line
    else:
        assert "tokens/" in line and ".npy" in line and "audit.py --checks data" in line, line
    assert not (tmp_path / "runs" / "r").exists()
    proc = run_script("scripts/eval.py", "--model", str(run), "--data", str(data), "--split", split, "--samples", "0",
                      "--out_dir", str(tmp_path / "eval"), "--no_tracking", check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and ("audit.py --checks data" in line or "outside" in line), line
    assert not (tmp_path / "eval" / "metrics.jsonl").exists()


# 4. the precision probe

def test_implausible_probe_figures_are_measured_again_then_fall_back(monkeypatch):
    from lib.train import flops, precision

    readings = iter([{"flops": {"model_fp32": 0.0, "model_bf16": 289e9}, "other_cores": 0.0},
                     {"flops": {"model_fp32": 1e9, "model_bf16": 87e9}, "other_cores": 0.0}])
    monkeypatch.setattr(flops, "_probe_in_subprocess", lambda jobs, threads: next(readings))
    monkeypatch.setattr(flops, "_read_cache", lambda: {})
    written = []
    monkeypatch.setattr(flops, "_write_cache", written.append)
    choice = precision.resolve("auto", [(64, 64, 64)], cuda=False)
    assert choice.mixed_precision == "no" and "implausible" in choice.reason and "fp32" in choice.reason
    assert written == []  # never cached

    readings = iter([{"flops": {"model_fp32": 0.0, "model_bf16": 289e9}, "other_cores": 0.0},
                     {"flops": {"model_fp32": 150e9, "model_bf16": 120e9}, "other_cores": 0.0}])
    choice = precision.resolve("auto", [(64, 64, 64)], cuda=False)
    assert choice.mixed_precision == "no" and "again" in choice.reason and "150" in choice.reason


def test_a_failed_probe_is_a_warning_that_shows_the_childs_error(monkeypatch):
    import subprocess

    from lib.train import flops, precision

    def fail(*args, **kwargs):
        raise subprocess.CalledProcessError(1, ["python"], output="", stderr="Traceback...\nMemoryError: boom\n")

    monkeypatch.setattr(flops, "_read_cache", lambda: {})
    monkeypatch.setattr(subprocess, "run", fail)
    choice = precision.resolve("auto", [(64, 64, 64)], cuda=False)
    assert choice.mixed_precision == "no" and "MemoryError: boom" in choice.reason, choice.reason


def test_a_resume_keeps_the_precision_the_run_chose(tiny_data, tmp_path):
    train(tiny_data, tmp_path, "p", *QUICK, "--max_steps", "4", "--stop_at_step", "2", "--precision", "auto")
    chosen = json.loads((tmp_path / "p" / "provenance.json").read_text())["mixed_precision"]
    proc = train(tiny_data, tmp_path, "p", *QUICK, "--max_steps", "4", "--resume", "auto", "--precision", "auto")
    assert "chose at its start (its provenance.json)" in proc.stdout and "GFLOP/s on the model" not in proc.stdout, proc.stdout
    assert json.loads((tmp_path / "p" / "provenance.json").read_text())["mixed_precision"] == chosen


# 5. one line, nothing half written

def test_a_template_with_a_broken_field_is_one_line(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"do {i}", "output": "ok"}) + "\n" for i in range(30)))
    proc = run_script("scripts/tokenize.py", "--corpus.source", str(src), "--corpus.template", "{instruction",
                      "--out_dir", str(tmp_path / "out"), "--tokenizer.vocab_size", "300", check=False)
    line = one_line_error(proc)
    assert "--corpus.template" in line and "{instruction" in line, line
    assert not (tmp_path / "out").exists()


def test_a_run_name_that_is_a_file_is_refused_before_any_work(tiny_data, tmp_path):
    (tmp_path / "notes").write_text("mine\n")
    proc = train(tiny_data, tmp_path, "notes", *QUICK, "--max_steps", "2", check=False)
    line = one_line_error(proc)
    assert "notes" in line and "file" in line and "model:" not in proc.stdout, (line, proc.stdout[-2000:])
    assert (tmp_path / "notes").read_text() == "mine\n"


def test_a_torn_last_metrics_line_does_not_stop_eval(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "st')
    (copy / "eval").mkdir(exist_ok=True)
    (copy / "eval" / "metrics.jsonl").write_text('{"time": "x", "loss": 1.0}\n{"time": "y", "lo')
    proc = run_script("scripts/eval.py", "--model", str(copy), "--samples", "0", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (copy / "eval" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["loss"] == 1.0 and "bits_per_byte" in rows[1]
    assert "torn" in proc.stdout + proc.stderr


def test_a_full_disk_inside_a_shard_write_is_one_line_and_leaves_nothing(tmp_path):
    from test_robustness import tmpfs

    with tmpfs(tmp_path / "disk", size="2500k") as disk:  # the corpus fits, its token shards do not
        proc = run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir",
                          str(disk / "out"), "--corpus.max_files", "80", "--tokenizer.vocab_size", "512", check=False)
        line = one_line_error(proc)
        assert "disk full" in line and "Traceback" not in proc.stderr, line
        assert (disk / "out" / "corpus" / "manifest.json").is_file(), proc.stdout[-2000:]  # the shards' step failed
        assert not (disk / "out" / "tokens").exists()
        assert not any(p.is_file() and p.name.endswith(".npy") for p in disk.rglob("*")), list(disk.rglob("*"))


def test_a_task_yaml_naming_a_missing_file_or_a_hub_dataset_is_one_line(run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text(
        f"task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'nothing.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (tasks / "hub.yaml").write_text(
        "task: hub\ndataset_path: someone/some_dataset\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    (tasks / "broken.yaml").write_text("task: broken\n  dataset_path: [\n")
    for task, says in (("gone", "nothing.jsonl"), ("hub", "someone/some_dataset"), ("broken", "broken.yaml")):
        proc = run_script("scripts/eval.py", "--model", str(run), "--tasks", task, "--tasks_dir", str(tasks),
                          "--out_dir", str(tmp_path / "out"), "--no_tracking", check=False)
        line = one_line_error(proc)
        assert proc.returncode == 2 and says in line, (task, line)
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


# 6. task folders are code

def test_a_task_that_runs_code_from_its_folder_is_refused_unless_allowed(run, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(): pass\n"}) + "\n" for i in range(4)))
    marker = tmp_path / "ran"
    (tasks / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef proc(docs):\n    return docs\n")
    (tasks / "code.yaml").write_text(
        f"task: code_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"
        "test_split: test\nprocess_docs: !function utils.proc\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    proc = run_script("scripts/eval.py", "--model", str(run), "--tasks", "code_task", "--tasks_dir", str(tasks),
                      "--out_dir", str(tmp_path / "out"), "--no_tracking", check=False)
    line = one_line_error(proc)
    assert "!function" in line and "code.yaml" in line and "--allow_task_code" in line, line
    assert not marker.exists()
    proc = run_script("scripts/eval.py", "--model", str(run), "--tasks", "code_task", "--tasks_dir", str(tasks),
                      "--out_dir", str(tmp_path / "out"), "--no_tracking", "--allow_task_code")
    assert marker.exists() and "code_task" in proc.stdout
    proc = run_script("scripts/audit.py", "--checks", "security", "--security.parts", "code",
                      "--security.tasks_dir", str(tasks), check=False)
    assert "code.yaml" in proc.stdout and "!function" in proc.stdout, proc.stdout[-3000:]


# 7. an evaluation names and holds the weights it scored

def test_eval_holds_the_run_and_names_the_weights_it_scored(run, tmp_path):
    import subprocess
    import sys

    from lib.files import sha256_file

    copy = tmp_path / "runs" / "done"
    shutil.copytree(run, copy)
    # another process holds the run, as a training job on it would
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from lib.records import run_folder; run_folder.acquire(sys.argv[2]); print('held', "
                               "flush=True); time.sleep(120)", str(REPO), str(copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_script("scripts/eval.py", "--model", str(copy), "--samples", "0", check=False)
        line = one_line_error(proc)
        assert "in use by pid" in line and str(holder.pid) in line, line
        assert not (copy / "eval").exists()
    finally:
        holder.kill()
        holder.wait()
    run_script("scripts/eval.py", "--model", str(copy), "--samples", "0")
    sha = sha256_file(copy / "final" / "model.safetensors")
    assert sha[:12] in (copy / "report.md").read_text()
    assert not list(copy.parent.glob(".*.lock"))


# 8. status.json, random states, advice

def test_a_failed_run_records_its_error(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "nan", *QUICK, "--max_steps", "4", env={"LM_TEST_NAN_STEP": "2"}, check=False)
    line = one_line_error(proc)
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] and status["error"] in line, (status, line)


def test_a_checkpoint_whose_random_state_cannot_be_restored_is_never_resumed_silently(run, tiny_data, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "done")
    newest = runs / "done" / "checkpoints" / "step_0000004"
    record = json.loads((newest / "trainer_state.json").read_text())
    (newest / "random_states_0.pkl").unlink()
    record["files"].pop("random_states_0.pkl")
    (newest / "trainer_state.json").write_text(json.dumps(record))
    shutil.rmtree(runs / "done" / "final")
    proc = train(tiny_data, runs, "done", *QUICK, "--max_steps", "4", "--resume", "auto")
    assert "random_states_0.pkl" in proc.stdout and "resumed from" in proc.stdout and "step_0000002" in proc.stdout
    assert (runs / "done" / "checkpoints" / "step_0000004.corrupt").is_dir()


def test_advice_that_works(tmp_path):
    from lib.data.corpus import text_documents
    from lib.data.tokenizer import sentencepiece_advice

    high = sentencepiece_advice("Internal: trainer_interface.cc(661) [(trainer_spec_.vocab_size()) == "
                                "(model_proto->pieces_size())] Vocabulary size too high (400). Please set it to a "
                                "value <= 312.", 400, 0.9995)
    assert "Lower --tokenizer.vocab_size to 312 or less" in high and "Raise" not in high, high
    low = sentencepiece_advice("Internal: Vocabulary size is smaller than required_chars. 50 vs 80.", 50, 1.0)
    assert "Raise --tokenizer.vocab_size" in low
    # a file of one 200 kB line, in chunks: several documents, joined back exactly
    line = " ".join(f"word{i}" for i in range(30_000))
    docs = text_documents(line, "chunks", 8000)
    assert len(docs) > 10 and "".join(t for _, t in docs) == line
    assert max(len(t.encode()) for _, t in docs) <= 2 * 8000
    # the first checkpoint that does not fit names no --keep_last_n that changes nothing
    from lib.records.checkpoint import _room_for

    assert "--keep_last_n 1" not in (_room_for(tmp_path, 1 << 60, keep_last_n=1, has_checkpoint=False) or "")
    assert "--keep_last_n 1" in (_room_for(tmp_path, 1 << 60, keep_last_n=3, has_checkpoint=True) or "")
