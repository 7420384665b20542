"""Nothing lost, nothing silent: one job per run folder, SIGTERM and Ctrl-C end with a
checkpoint, corrupt records are set aside, a full disk is named, bad input is one line."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import BITWISE, REPO, train, train_command


def start(data, runs, name, *args, launcher=()) -> tuple[subprocess.Popen, Path]:
    """A training run started in the background (its own process group), and its stderr file."""
    err = Path(runs) / f"{name}.stderr"
    Path(runs).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
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
    resumed = train(data, runs, "stopped", *args, "--resume", "auto", launcher=launcher)
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
        assert f"resumed from" in resumed and f"at step {step}" in resumed
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
    from lib.preemption import StopRequests

    stops = StopRequests()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stops.requested and stops.name == "SIGINT"  # the first: noted, nothing stops yet
        code = subprocess.run(
            [os.sys.executable, "-c", "import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); "
             "from lib.preemption import StopRequests; s = StopRequests(); signal.raise_signal(signal.SIGTERM); "
             "signal.raise_signal(signal.SIGTERM); time.sleep(5); print('still running')", str(REPO)],
            capture_output=True, text=True, timeout=60)
        assert code.returncode == 128 + signal.SIGTERM and "still running" not in code.stdout
        assert "Traceback" not in code.stderr and "stopping now" in code.stderr
    finally:
        stops.restore()


def test_unreadable_checkpoint_records_are_set_aside_and_the_step_rewritten(tiny_data, tmp_path):
    from lib.checkpoint import STATE, complete_checkpoints, verify
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
    from lib.checkpoint import STATE, find_resume

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
