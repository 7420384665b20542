"""Nothing is deleted that the user did not name: a run name is one folder name inside --runs_dir,
--overwrite removes only that folder (keeping the corrupt checkpoints set aside in it), packed
checkpoints are found by --resume auto, and a folder the project wrote is continued or refused,
never removed implicitly. Each case lists the runs dir's parent before and after."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_script, train

QUICK = ("--eval_every", "0", "--eval_tokens", "2000", "--log_every", "1", "--no_mfu")


def listing(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder under `root`."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at 2 and 4, and its final model."""
    runs = tmp_path_factory.mktemp("finished")
    train(tiny_data, runs, "done", *QUICK, "--max_steps", "4", "--checkpoint_every", "2", "--keep_last_n", "3")
    return runs / "done"


def parent_with_runs(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """tmp/parent/{unrelated.txt, runs/{other (a finished run), mlflow-like file}}: (parent, runs)."""
    parent = tmp_path / "parent"
    runs = parent / "runs"
    runs.mkdir(parents=True)
    (parent / "unrelated.txt").write_text("not the project's\n")
    shutil.copytree(finished, runs / "other")
    return parent, runs


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../escaped", "/abs"])
def test_a_run_name_that_is_not_one_folder_name_is_refused_and_nothing_is_touched(
        tiny_data, finished, tmp_path, name):
    parent, runs = parent_with_runs(finished, tmp_path)
    before = listing(parent)
    for extra in ((), ("--overwrite",), ("--resume", "auto")):
        proc = train(tiny_data, runs, name, *QUICK, "--max_steps", "2", *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "--run_name" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert listing(parent) == before, (name, extra)
        assert not (tmp_path / "escaped").exists() and not Path("/abs").exists()


def test_packed_checkpoints_are_found_by_resume_auto_and_kept(tiny_data, finished, tmp_path):
    from lib.records.archive import pack

    parent, runs = parent_with_runs(finished, tmp_path)
    # a run stopped at step 2 of 4 whose checkpoints were all packed (audit.py pack --remove)
    train(tiny_data, runs, "packed", *QUICK, "--max_steps", "4", "--checkpoint_every", "1", "--keep_last_n", "3",
          "--stop_at_step", "2")
    shutil.rmtree(runs / "packed" / "final")  # stopped rather than ended: nothing but the checkpoints to go on
    for folder in sorted((runs / "packed" / "checkpoints").glob("step_*")):
        pack(folder, remove=True)
    assert sorted(p.name for p in (runs / "packed" / "checkpoints").iterdir()) == [
        "step_0000001.tar.gz", "step_0000002.tar.gz"]
    before = listing(parent)
    proc = train(tiny_data, runs, "packed", *QUICK, "--max_steps", "4", "--checkpoint_every", "1",
                 "--keep_last_n", "3", "--resume", "auto")
    assert "at step 2" in proc.stdout and "starting it over" not in proc.stdout, proc.stdout[-3000:]
    after = listing(parent)
    assert all(k in after for k in before), set(before) - set(after)  # the run's own records continue
    assert {k: v for k, v in after.items() if k.endswith(".tar.gz") or not k.startswith("runs/packed")} == {
        k: v for k, v in before.items() if k.endswith(".tar.gz") or not k.startswith("runs/packed")}
    records = [json.loads(x) for x in (runs / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_finished_run_kept_only_as_archives_and_final_resumes(tiny_data, finished, tmp_path):
    from lib.records.archive import pack

    parent, runs = parent_with_runs(finished, tmp_path)
    for folder in sorted((runs / "other" / "checkpoints").glob("step_*")):
        pack(folder, remove=True)
    audit = run_script("scripts/audit.py", "--checks", "run", "--run", str(runs / "other"))
    assert "0 complete checkpoint(s) and 2 packed" in audit.stdout and "step_0000004.tar.gz" in audit.stdout
    before = listing(parent)
    proc = train(tiny_data, runs, "other", *QUICK, "--max_steps", "4", "--checkpoint_every", "2",
                 "--keep_last_n", "3", "--resume", "auto", check=False)
    assert proc.returncode == 0 and "at step 4" in proc.stdout, proc.stderr[-3000:]
    after = listing(parent)
    assert all(k in after for k in before), set(before) - set(after)


def test_overwrite_after_every_checkpoint_went_corrupt_keeps_the_corrupt_ones(tiny_data, finished, tmp_path):
    from lib.records.checkpoint import STATE

    parent, runs = parent_with_runs(finished, tmp_path)
    shutil.copytree(finished, runs / "broken")
    for folder in (runs / "broken" / "checkpoints").glob("step_*"):
        (folder / STATE).write_bytes(b"garbage")
    proc = train(tiny_data, runs, "broken", *QUICK, "--max_steps", "4", "--resume", "auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    corrupt = sorted(p.name for p in (runs / "broken" / "checkpoints").iterdir())
    assert corrupt == ["step_0000002.corrupt", "step_0000004.corrupt"], corrupt
    before = listing(parent)
    proc = train(tiny_data, runs, "broken", *QUICK, "--max_steps", "2", "--overwrite")
    assert "removed" in proc.stdout and "kept" in proc.stdout, proc.stdout[-3000:]
    after = listing(parent)
    kept = {k: v for k, v in before.items() if ".corrupt" in k or not k.startswith("runs/broken")}
    assert {k: after.get(k, "GONE") for k in kept} == kept  # the corrupt records and every other run
    assert (runs / "broken" / "final" / "model.safetensors").is_file()


def test_a_run_that_stopped_before_its_first_checkpoint_is_continued_not_deleted(tiny_data, finished, tmp_path):
    parent, runs = parent_with_runs(finished, tmp_path)
    train(tiny_data, runs, "early", *QUICK, "--max_steps", "3", "--checkpoint_every", "0")
    shutil.rmtree(runs / "early" / "checkpoints")
    shutil.rmtree(runs / "early" / "final")  # as if killed before its first checkpoint
    before = listing(parent)
    # without --resume: refused, nothing touched
    proc = train(tiny_data, runs, "early", *QUICK, "--max_steps", "3", check=False)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr and listing(parent) == before, proc.stderr
    # --resume auto: started over in the same folder, the earlier records moved aside, not deleted
    proc = train(tiny_data, runs, "early", *QUICK, "--max_steps", "3", "--resume", "auto")
    assert "starting it over" in proc.stdout
    aside = [p for p in (runs / "early").iterdir() if p.name.startswith("metrics.") and p.name != "metrics.jsonl"]
    assert len(aside) == 1 and aside[0].read_bytes() == before["runs/early/metrics.jsonl"], aside
    assert all(k in listing(parent) for k in before if k != "runs/early/metrics.jsonl")


def test_no_lock_file_is_left_behind_and_the_run_records_how_it_ended(finished):
    runs = finished.parent
    assert not [p.name for p in runs.iterdir() if p.name.endswith(".lock")]
    assert json.loads((finished / "status.json").read_text())["state"] == "finished"


def test_eval_refuses_a_final_model_without_its_checksums_unless_trusted(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "final" / "checksums.json").unlink()
    report = (run / "report.md").read_bytes()
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", "--max_tokens", "2000",
                      "--no_tracking", check=False)
    assert proc.returncode == 2 and "--trust_unverified" in proc.stderr and "Traceback" not in proc.stderr
    assert "bits/byte" not in proc.stdout and (run / "report.md").read_bytes() == report
    proc = run_script("scripts/eval.py", "--model", str(run), "--samples", "0", "--max_tokens", "2000",
                      "--no_tracking", "--trust_unverified")
    assert "bits/byte" in proc.stdout and "not checked" in proc.stdout


def test_a_second_config_file_is_refused_by_name(tiny_data, tmp_path):
    from conftest import REPO

    other = tmp_path / "other.yaml"
    other.write_text("max_steps: 3\n")
    proc = run_script("scripts/train.py", "--config", str(REPO / "configs" / "train" / "smoke.yaml"),
                      "--config", str(other), "--data.dir", str(tiny_data), "--runs_dir", str(tmp_path / "runs"),
                      check=False)
    assert proc.returncode == 2 and str(other) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
