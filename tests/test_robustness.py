"""Nothing lost, nothing silent: one job per run folder, SIGTERM and Ctrl-C end with a
checkpoint, corrupt records are set aside, a full disk is named, bad input is one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BITWISE, REPO, subprocess_env, train, train_command


def start(data, runs, name, *args, launcher=()) -> tuple[subprocess.Popen, Path]:
    """A training run started in the background (its own process group), and its stderr file."""
    err = Path(runs) / f"{name}.stderr"
    Path(runs).mkdir(parents=True, exist_ok=True)
    env = subprocess_env()
    with open(err, "wb") as f:
        proc = subprocess.Popen(train_command(data, runs, name, *args, launcher=launcher), cwd=REPO, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, err


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run has logged `step` (or the process ended)."""
    deadline = time.time() + timeout
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(x).get("step", 0) >= step for x in metrics.read_text().splitlines()
                                     if x.strip().startswith("{") and x.strip().endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{run} never logged step {step}")


LONG = ("--max_steps", "100000", "--log_every", "1", "--eval_every", "0", "--eval_tokens", "2000",
        "--checkpoint_every", "0")


def test_a_second_job_on_a_run_folder_is_refused_naming_the_holder(tiny_data, tmp_path):
    first, err = start(tiny_data, tmp_path, "busy", *LONG)
    try:
        wait_for_step(tmp_path / "busy", 3, first)
        for extra in ((), ("--resume", "auto"), ("--overwrite",)):
            proc = train(tiny_data, tmp_path, "busy", "--max_steps", "2", *extra, check=False)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert "in use" in proc.stderr and f"pid {first.pid}" in proc.stderr, proc.stderr
        rows = (tmp_path / "busy" / "metrics.jsonl").read_text().splitlines()
        wait_for_step(tmp_path / "busy", len(rows) + 3, first)  # the first job went on undisturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # a killed job leaves no lock behind: the run starts over (it had no checkpoint)
    proc = train(tiny_data, tmp_path, "busy", "--max_steps", "2", "--eval_every", "0", "--eval_tokens", "2000",
                 "--resume", "auto")
    assert "starting it over" in proc.stdout


def _stop_and_resume(data, runs, sig, launcher=()):
    """A run of 300 steps sent `sig` once under way (to the launcher when there is one), then resumed
    with --resume auto: returns (the stopped process's exit code, its output, the resumed output)."""
    args = (*BITWISE, "--log_every", "1", "--max_steps", "300", "--eval_every", "0", "--checkpoint_every", "0")
    proc, err = start(data, runs, "stopped", *args, launcher=launcher)
    try:
        wait_for_step(runs / "stopped", 5, proc)
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = err.read_text()
    # how the job ended, for a wrapper that only sees the launcher's exit code
    assert json.loads((runs / "stopped" / "status.json").read_text())["state"] == "stopped"
    resumed = train(data, runs, "stopped", *args, "--resume", "auto", launcher=launcher)
    assert json.loads((runs / "stopped" / "status.json").read_text())["state"] == "finished"
    train(data, runs, "straight", *args, launcher=launcher)
    return code, out, resumed.stdout


def test_sigterm_and_ctrl_c_checkpoint_the_step_and_resume_exactly(tiny_data, tmp_path):
    from test_resume import assert_same_run

    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        runs = tmp_path / name
        code, out, resumed = _stop_and_resume(tiny_data, runs, sig)
        assert code == 75 and "Traceback" not in out, out[-3000:]
        line = next(x for x in out.splitlines() if x.startswith(f"stopped by {name} after step"))
        step = int(line.split("after step ")[1].split(":")[0])
        assert 5 <= step < 300 and f"step_{step:07d}" in line and "--resume auto" in line
        assert "resumed from" in resumed and f"at step {step}" in resumed
        assert_same_run(runs / "straight", runs / "stopped")


def test_sigterm_to_a_ddp_launcher_checkpoints_every_process_and_resumes_exactly(tiny_data, tmp_path):
    from conftest import accelerate_launch
    from test_resume import assert_same_run

    code, out, resumed = _stop_and_resume(tiny_data, tmp_path, signal.SIGTERM, launcher=accelerate_launch("cpu_ddp"))
    assert code != 0 and "stopped by SIGTERM after step" in out, out[-3000:]
    assert "[rank0]: Traceback" not in out and "[rank1]: Traceback" not in out
    assert "resumed from" in resumed
    assert_same_run(tmp_path / "straight", tmp_path / "stopped")


def test_a_second_signal_stops_at_once():
    from lib.train.preemption import StopRequests

    stops = StopRequests()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stops.requested and stops.name == "SIGINT"  # the first: noted, nothing stops yet
        code = subprocess.run(
            [os.sys.executable, "-c", "import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); "
             "from lib.train.preemption import StopRequests; s = StopRequests(); signal.raise_signal(signal.SIGTERM); "
             "signal.raise_signal(signal.SIGTERM); time.sleep(5); print('still running')", str(REPO)],
            capture_output=True, text=True, timeout=60)
        assert code.returncode == 128 + signal.SIGTERM and "still running" not in code.stdout
        assert "Traceback" not in code.stderr and "stopping now" in code.stderr
    finally:
        stops.restore()


def test_unreadable_checkpoint_records_are_set_aside_and_the_step_rewritten(tiny_data, tmp_path):
    from lib.records.checkpoint import STATE, complete_checkpoints, verify
    from test_resume import assert_same_run

    common = (*BITWISE, "--log_every", "1", "--max_steps", "8", "--checkpoint_every", "2", "--keep_last_n", "3",
              "--eval_every", "0")
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "run", *common, "--stop_at_step", "6")
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_0000006" / STATE).write_bytes(b"\x89\xff garbage")
    # audit names it and fails, without a traceback
    proc = run_audit("--checks", "run", "--run", str(tmp_path / "run"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "step_0000006" in proc.stdout
    proc = train(tiny_data, tmp_path, "run", *common, "--resume", "auto")
    assert "step_0000004 at step 4" in proc.stdout and "Traceback" not in proc.stderr
    assert "step_0000006.corrupt" in proc.stdout  # warned about and set aside, not deleted
    assert (ckpts / "step_0000006.corrupt" / STATE).read_bytes() == b"\x89\xff garbage"
    # reached again, step 6 was written anew (then pruned like any other), and the run is the straight one
    assert verify(complete_checkpoints(tmp_path / "run")[-1])["step"] == 8
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def run_audit(*args):
    from conftest import run_script

    return run_script("scripts/audit.py", *args, check=False)


def test_records_without_their_checks_are_not_trusted(tmp_path):
    from lib.records.checkpoint import STATE, find_resume

    run = tmp_path / "run"
    for step, record in ((2, None), (4, b""), (6, b"{}"), (8, b'{"step": 8, "files": {}}')):
        folder = run / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights")
        if record is not None:
            (folder / STATE).write_bytes(record)
    said = []
    assert find_resume(run, "auto", say=said.append) is None
    assert len(said) == 3 and all("corrupt" in s for s in said), said  # 8, 6, 4 (2 never completed)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004.corrupt", "step_0000006.corrupt", "step_0000008.corrupt"]


import contextlib  # noqa: E402
import shutil  # noqa: E402


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "8m", read_only: bool = False):
    """A small tmpfs mounted at `where` (a full disk, or a read-only folder: as root, permissions
    alone do not stop writes). These tests need root, as CI and the development machines have."""
    assert os.geteuid() == 0, "this test mounts a tmpfs: run the suite as root (CI does)"
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs",
                    str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory):
    """A finished 6-step run with checkpoints at 3 and 6."""
    runs = tmp_path_factory.mktemp("small")
    train(tiny_data, runs, "small", "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3",
          "--eval_tokens", "2000", "--log_every", "1")
    return runs / "small"


def test_corrupt_final_weights_fail_the_audit_and_stop_eval(small_run, tmp_path):
    from conftest import run_script

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    assert run_audit("--checks", "run", "--run", str(run)).returncode == 0
    weights = run / "final" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    weights.write_bytes(bytes(blob))
    proc = run_audit("--checks", "run", "--run", str(run))
    assert proc.returncode == 1 and "final/model.safetensors" in proc.stdout and "[FAIL]" in proc.stdout
    proc = run_script("scripts/eval.py", "--model", str(run), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "model.safetensors" in proc.stderr
    assert "bits/byte" not in proc.stdout  # nothing was scored


def test_bad_values_and_broken_inputs_are_one_line_errors(tiny_data, small_run, tmp_path):
    for args, says in ((("--optim.lr", "-1"), "optim.lr"), (("--max_steps", "0"), "max_steps"),
                       (("--micro_batch_size", "0"), "micro_batch_size"),
                       (("--optim.warmup_fraction", "1.5"), "--optim.warmup_fraction 1.5: must be from 0 up to"),
                       (("--optim.name", "lion"), "--optim.name lion: no such optimizer")):
        proc = train(tiny_data, tmp_path, "bad", *args, check=False)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "bad").exists()  # nothing written
    broken = tmp_path / "broken"
    shutil.copytree(small_run / "final", broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = train(tiny_data, tmp_path, "ft", "--model.init_from", str(broken), "--max_steps", "2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(broken) in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ft").exists()


def test_read_only_output_folders_are_named_before_any_work(tiny_data, small_run, tmp_path):
    from conftest import run_script

    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        cases = [
            ("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(ro / "data"),
             "--corpus.max_files", "20"),
            ("scripts/train.py", "--config", "configs/train/smoke.yaml", "--data.dir", str(tiny_data),
             "--runs_dir", str(ro / "runs"), "--max_steps", "2"),
            ("scripts/eval.py", "--model", str(small_run), "--out_dir", str(ro / "eval")),
            ("scripts/tokenize.py", "encode", "--tokenizer", str(tiny_data / "tokenizer"), "--input",
             str(REPO / "README.md"), "--output", str(ro / "ids.jsonl")),
        ]
        for script, *args in cases:
            proc = run_script(script, *args, check=False)
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert "not writable" in proc.stderr and str(ro) in proc.stderr, proc.stderr
            assert "bits/byte" not in proc.stdout  # eval.py: refused before scoring anything


def test_a_failed_tokenize_leaves_the_dataset_and_its_config_alone(tiny_data, tmp_path):
    from conftest import run_script

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    proc = run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(data),
                      "--corpus.source", str(tmp_path / "missing*.jsonl"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_resuming_a_finished_run_logs_nothing_twice_and_reports_whole_run_speed(small_run, tiny_data, tmp_path):
    run = tmp_path / "small"
    shutil.copytree(small_run, run)
    first = (run / "report.md").read_text()
    train(tiny_data, tmp_path, "small", "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3",
          "--eval_tokens", "2000", "--log_every", "1", "--resume", "auto")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = [(r["type"], r["step"]) for r in rows]
    assert len(kinds) == len(set(kinds)), kinds  # each record once
    assert kinds.count(("final", 6)) == 1 and kinds.count(("eval", 6)) == 1

    def speed(report: str) -> float:
        return float(report.split(" tokens/s")[0].rsplit(" ", 1)[1].replace(",", ""))

    assert speed((run / "report.md").read_text()) == pytest.approx(speed(first), rel=0.05)


def test_a_full_disk_is_named_leaves_nothing_half_written_and_keep_last_n_1_makes_room(tiny_data, tmp_path):
    args = ("--max_steps", "12", "--checkpoint_every", "4", "--keep_last_n", "2", "--eval_every", "0",
            "--eval_tokens", "2000", "--log_every", "1", "--no_mfu")
    with tmpfs(tmp_path / "disk", size="10m") as disk:
        runs = disk / "runs"
        # a filler leaving room for the run's small files and one checkpoint (1.7 MB), not two
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - 3_300_000))
        proc = train(tiny_data, runs, "full", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "disk" in proc.stderr and "full" in proc.stderr and str(disk) in proc.stderr, proc.stderr
        ckpts = sorted(p.name for p in (runs / "full" / "checkpoints").iterdir())
        assert ckpts == ["step_0000004"], ckpts  # complete, and nothing half-written beside it
        leftovers = [p for p in runs.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]
        assert not leftovers, leftovers
        # the advice followed: with --keep_last_n 1 the older checkpoint makes room for the next
        proc = train(tiny_data, runs, "full", *args, "--resume", "auto", "--keep_last_n", "1")
        assert "step_0000004 at step 4" in proc.stdout and (runs / "full" / "final" / "model.safetensors").is_file()
        assert "to make room" in proc.stdout, proc.stdout[-3000:]
        assert sorted(p.name for p in (runs / "full" / "checkpoints").iterdir()) == ["step_0000012"]
    # a fresh start on a full disk writes nothing at all
    with tmpfs(tmp_path / "disk2", size="1m") as disk:
        (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - 4096))
        proc = train(tiny_data, disk / "runs", "none", *args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not (disk / "runs" / "none").exists() or not any((disk / "runs" / "none").iterdir())


def test_a_save_that_fails_midway_is_removed_and_only_a_full_disk_is_called_one(tmp_path):
    import errno

    from lib.records.checkpoint import complete_checkpoints, save
    from lib.errors import UserError

    class Half:
        """An Accelerator of one process whose save_state writes a file, then fails."""
        is_main_process, num_processes = True, 1

        def __init__(self, exc):
            self.exc = exc

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            (Path(path) / "model.safetensors").write_bytes(b"x" * 1000)
            raise self.exc

    with pytest.raises(UserError, match="disk full|No space"):
        save(Half(OSError(errno.ENOSPC, "No space left on device")), tmp_path, 2, 1, {"step": 2})
    with pytest.raises(RuntimeError, match="a bug"):  # plenty of space: not called a full disk
        save(Half(RuntimeError("a bug")), tmp_path, 2, 1, {"step": 2})
    assert complete_checkpoints(tmp_path) == [] and list((tmp_path / "checkpoints").iterdir()) == []


def test_a_process_that_stops_answering_ends_the_job_with_an_error_naming_rank_and_step(tiny_data, tmp_path):
    """Process 1 of a 2-process job stalls at step 3 for longer than the collective timeout: the
    job ends by itself, saying which process waited at which step (process 0 after 6 s; process 1,
    once it wakes, finds the other gone)."""
    from conftest import accelerate_launch

    t = time.time()
    proc = train(tiny_data, tmp_path, "stall", "--max_steps", "8", "--log_every", "1", "--eval_every", "0",
                 "--eval_tokens", "2000", "--checkpoint_every", "0", "--precision", "fp32", "--no_mfu",
                 "--dist_timeout_minutes", "0.1", env={"LM_TEST_STALL": "1:3:25"},
                 launcher=accelerate_launch("cpu_ddp"), check=False, timeout=300)
    assert proc.returncode != 0 and time.time() - t < 100, (time.time() - t, proc.stderr[-3000:])
    out = proc.stdout + proc.stderr
    assert "process 0 of 2" in out and "step 3" in out and "waited more than 0.1 min" in out, out[-3000:]
    assert "[rank0]: Traceback" not in out


def test_a_packed_checkpoint_resumes_exactly_and_a_damaged_archive_is_named(tiny_data, tmp_path):
    from conftest import run_script
    from test_resume import assert_same_run

    common = (*BITWISE, "--log_every", "1", "--max_steps", "8", "--checkpoint_every", "4", "--eval_every", "0")
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "run", *common, "--stop_at_step", "4")
    folder = tmp_path / "run" / "checkpoints" / "step_0000004"
    proc = run_script("scripts/audit.py", "pack", "--checkpoint", str(folder), "--remove")
    archive = folder.with_name("step_0000004.tar.gz")
    assert archive.is_file() and not folder.exists() and "every file checked" in proc.stdout
    damaged = tmp_path / "damaged.tar.gz"
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.write_bytes(bytes(blob))
    proc = run_script("scripts/audit.py", "unpack", "--archive", str(damaged), "--into", str(tmp_path / "x"),
                      check=False)
    assert proc.returncode == 2 and "damaged" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x" / "step_0000004").exists()
    shutil.move(archive, tmp_path / "elsewhere.tar.gz")  # --resume takes the archive wherever it is
    proc = train(tiny_data, tmp_path, "run", *common, "--resume", str(tmp_path / "elsewhere.tar.gz"))
    assert "unpacked" in proc.stdout and "at step 4" in proc.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_unreadable_manifests_and_log_lines_are_named_or_rebuilt(tiny_data, small_run, tmp_path):
    from conftest import run_script

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = data / "tokens" / "manifest.json"
    good = manifest.read_bytes()
    for bad in (b"\xff\xfe", b"[]", json.dumps({"kind": "tokens"}).encode()):
        manifest.write_bytes(bad)
        proc = train(data, tmp_path, "x", "--max_steps", "1", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(manifest) in proc.stderr, proc.stderr
    # the pipeline rebuilds what it cannot read, and ends with the same tokens
    proc = run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(data),
                      "--corpus.max_files", "80", "--tokenizer.vocab_size", "512")
    assert "tokens: encoded" in proc.stdout
    assert json.loads(manifest.read_bytes())["content_hash"] == json.loads(good)["content_hash"]
    # a metrics line that is not a record is dropped on resume, not a traceback
    run = tmp_path / "small"
    shutil.copytree(small_run, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[1, 2]\n{\"type\": \"train\", \"st")
    proc = train(tiny_data, tmp_path, "small", "--max_steps", "6", "--checkpoint_every", "3", "--eval_every", "3",
                 "--eval_tokens", "2000", "--log_every", "1", "--resume", "auto")
    assert "dropped" in proc.stdout and all(x.startswith("{") for x in (run / "metrics.jsonl").read_text().splitlines())


def test_a_folder_left_by_a_failed_start_does_not_block_the_next(tiny_data, tmp_path):
    left = tmp_path / "early"
    left.mkdir()
    (left / "config.yaml").write_text("run_name: early\n")
    (left / "metrics.jsonl").write_text("")
    proc = train(tiny_data, tmp_path, "early", "--max_steps", "2", "--eval_every", "0", "--eval_tokens", "2000")
    assert "starting it over" in proc.stdout and (left / "final" / "model.safetensors").is_file()
