"""An operator's faults end in one line that says what happened and what to do: a full disk
during the final export, running out of memory, Ctrl-C during start-up, a file that cannot be
read, malformed JSON; a stopped job is told from a failed one without its exit code (status.json,
and the SLURM script that requeues on it); a failed tokenize leaves no empty folder; a damaged
gzip trailer fails a checkpoint archive."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_script, subprocess_env, train, train_command
from test_robustness import tmpfs

QUICK = ("--eval_every", "0", "--eval_tokens", "2000", "--log_every", "1", "--no_mfu")


def one_line_error(proc) -> str:
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_a_full_disk_during_the_final_export_is_one_line_and_resumable(tiny_data, tmp_path):
    # a model of about 7 MB of weights: its checkpoint (weights and AdamW's moments, ~21 MB) fits,
    # the final model after it does not
    args = (*QUICK, "--model.d_model", "256", "--max_steps", "2", "--checkpoint_every", "0")
    with tmpfs(tmp_path / "disk", size="40m") as disk:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 25_000_000))
        proc = train(tiny_data, disk / "runs", "big", *args, check=False)
        line = one_line_error(proc)
        assert "final model" in line and "MB" in line and "--resume auto" in line, line
        assert not (disk / "runs" / "big" / "final").exists()
        filler.unlink()
        proc = train(tiny_data, disk / "runs", "big", *args, "--resume", "auto")
        assert "at step 2" in proc.stdout and (disk / "runs" / "big" / "final" / "model.safetensors").is_file()


def test_out_of_memory_is_one_line(tiny_data, tmp_path):
    import resource

    def limit():  # 6 GiB of address space: torch starts; the first activation (5.5 GiB) does not fit
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    proc = subprocess.run(train_command(tiny_data, tmp_path, "oom", *QUICK, "--max_steps", "1", "--precision", "fp32",
                                        "--micro_batch_size", "10000", "--model.d_model", "2304",
                                        "--model.n_layers", "1"),
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600,
                          preexec_fn=limit)
    line = one_line_error(proc)
    assert "out of memory" in line and "GiB" in line and "--micro_batch_size" in line, line


def test_ctrl_c_during_start_up_is_one_line(tiny_data, tmp_path):
    proc = subprocess.Popen(train_command(tiny_data, tmp_path, "early", *QUICK), cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    maps = Path(f"/proc/{proc.pid}/maps")
    while time.time() < deadline and proc.poll() is None and "libtorch_cpu" not in maps.read_text():
        time.sleep(0.002)  # torch's import has begun once its library is mapped
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    line = one_line_error(subprocess.CompletedProcess([], proc.returncode, out, err))
    assert proc.returncode == 130 and "interrupted" in line, line
    assert not (tmp_path / "early").exists()


def test_unreadable_files_full_disks_and_memory_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    from lib import errors

    existing = tmp_path / "shard.npy"
    existing.write_bytes(b"x")

    def ends(exc, access=None) -> str:
        if access is not None:
            monkeypatch.setattr(os, "access", access)

        @errors.exit_on_user_error
        def main():
            raise exc

        with pytest.raises(SystemExit) as stop:
            main()
        monkeypatch.undo()
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    # a file that cannot be read is not called "not writable"
    msg = ends(PermissionError(errno.EACCES, "Permission denied", str(existing)), lambda p, m: m != os.R_OK)
    assert "cannot read" in msg and str(existing) in msg and "writ" not in msg, msg
    msg = ends(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "new.json")))
    assert "not writable" in msg and "new.json" in msg, msg
    # a full disk whose error names no file names the folder being written, and its free space
    errors.writing_to(tmp_path / "runs" / "x")
    msg = ends(OSError(errno.ENOSPC, "No space left on device"))
    assert f"under {tmp_path / 'runs' / 'x'}" in msg and "MB free" in msg, msg
    # running out of memory, host or GPU
    msg = ends(RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 53687091200 bytes. Error code 12 (Cannot allocate memory)"))
    assert "out of memory" in msg and "50.00 GiB" in msg, msg


def test_malformed_json_is_named_once_with_its_column(tmp_path):
    from lib.errors import UserError
    from lib.data.sources import RecordReader, expand_inputs

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut off')
    with pytest.raises(UserError) as exc:
        list(RecordReader().read(expand_inputs(str(bad))[0]))
    text = str(exc.value)
    assert f"{bad}:2" in text and " at at " not in text and "Unterminated string starting at column 10" in text, text


def test_a_failed_tokenize_leaves_no_empty_output_folder(tmp_path):
    out = tmp_path / "new" / "data"
    proc = run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(out),
                      "--corpus.source", str(tmp_path / "missing*.jsonl"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_damaged_gzip_trailer_fails_the_archive(tmp_path):
    import hashlib

    from lib.records.archive import _check_members, pack
    from lib.records.checkpoint import STATE
    from lib.errors import UserError

    folder = tmp_path / "checkpoints" / "step_0000002"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 5000)
    (folder / "random_states_0.pkl").write_bytes(b"r" * 100)
    files = {"model.safetensors": hashlib.sha256(b"w" * 5000).hexdigest(),
             "random_states_0.pkl": hashlib.sha256(b"r" * 100).hexdigest()}
    (folder / STATE).write_text(json.dumps({"step": 2, "tokens_seen": 1, "sampler": {}, "data_content_hash": "h",
                                            "files": files}))
    archive = pack(folder)
    blob = bytearray(archive.read_bytes())
    blob[-6] ^= 0xFF  # the CRC-32 in the gzip trailer: every tar member still reads back intact
    archive.write_bytes(bytes(blob))
    assert subprocess.run(["gzip", "-t", str(archive)], capture_output=True).returncode != 0
    with pytest.raises(UserError, match="damaged"):
        _check_members(archive)


def test_status_json_tells_a_stopped_job_from_a_failed_one(tmp_path):
    from lib.train.requeue import decide

    run = tmp_path / "run"
    run.mkdir()
    t0 = time.time() - 1

    def status(state, when=None):
        (run / "status.json").write_text(json.dumps({"state": state, "time": when or time.time()}))

    assert decide(run, 1, t0)[0] == "failed"  # no record
    status("stopped")
    for code in (75, 143, 130, 1):  # whatever the launcher made of the worker's 75
        assert decide(run, code, t0)[0] == "requeue"
    assert decide(run, 143, t0, restarts=50, max_restarts=50)[0] == "failed"
    assert decide(run, 143, time.time() + 10)[0] == "failed"  # a record of an earlier attempt
    status("finished")
    assert decide(run, 0, t0)[0] == "done" and decide(run, 1, t0)[0] == "failed"
    status("running")  # killed: its record never got to say how it ended
    assert decide(run, 137, t0)[0] == "failed"
    status("failed")
    assert decide(run, 2, t0)[0] == "failed"


FAKE_SRUN = """#!/bin/bash
# srun on one node: drop srun's options, run the command as node 0
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1" in
  show) echo localhost ;;
  requeue) echo "$@" >> "$SCONTROL_LOG" ;;
esac
"""
# stands in for `accelerate launch` on one CPU: runs train.py's arguments as one process; with
# STOP_AFTER_STEP set, sends it SIGTERM once it logged that step, then exits as the launcher
# would (143), not with the worker's 75
FAKE_ACCELERATE = """#!/bin/bash
while [[ "$1" != scripts/train.py ]]; do shift; done
"$PY" "$@" &
pid=$!
if [[ -n "${STOP_AFTER_STEP:-}" ]]; then
  while kill -0 $pid 2>/dev/null; do
    if grep -q "\\"step\\": $STOP_AFTER_STEP," "$RUN_DIR/metrics.jsonl" 2>/dev/null; then kill -TERM $pid; break; fi
    sleep 0.05
  done
  wait $pid
  exit 143
fi
wait $pid
"""


def test_the_slurm_script_requeues_a_stopped_run_only(tiny_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("accelerate", FAKE_ACCELERATE)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    runs, log = tmp_path / "runs", tmp_path / "scontrol.log"
    args = ["--config", str(REPO / "configs" / "train" / "smoke.yaml"), "--data.dir", str(tiny_data),
            "--runs_dir", str(runs), "--run_name", "job", "--tracking.no_mlflow", *QUICK, "--max_steps", "300",
            "--checkpoint_every", "0", "--precision", "fp32"]

    def attempt(restarts: int, **env) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "configs" / "accelerate" / "slurm.sbatch"), *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600, env=subprocess_env({
                                  "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
                                  "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
                                  "SLURM_RESTART_COUNT": str(restarts), "SCONTROL_LOG": str(log),
                                  "PY": sys.executable, "ACCELERATE": str(bin_dir / "accelerate"),
                                  "RUN_DIR": str(runs / "job"), **env}))

    stopped = attempt(0, STOP_AFTER_STEP="5")
    assert stopped.returncode == 0 and "requeue" in stopped.stdout, stopped.stdout[-2000:] + stopped.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "42"]
    assert json.loads((runs / "job" / "status.json").read_text())["state"] == "stopped"
    finished = attempt(1)  # the requeued job: continues and finishes; not requeued again
    assert finished.returncode == 0 and "done" in finished.stdout, finished.stderr[-3000:]
    assert "resumed from" in finished.stdout + finished.stderr and log.read_text().split() == ["requeue", "42"]
    args[args.index("--data.dir") + 1] = str(tmp_path / "nowhere")  # a failing run: not requeued
    failed = attempt(2)
    assert failed.returncode != 0 and "failed" in failed.stdout and log.read_text().split() == ["requeue", "42"]
