"""Which run folder a training job writes, and whether it continues or starts over.

A run folder belongs to one job at a time: the job's main process holds an OS file lock on
`<runs_dir>/.<run_name>.lock` (beside the folder, so that --overwrite deleting the folder cannot
drop it) for as long as it runs. The OS releases it when the process ends, however it ends, so a
crashed or killed job never leaves it stuck; a second job meanwhile is refused with the holder's
pid, host, start time and command, which the lock file records.

A run folder is never replaced by accident: starting a run whose folder holds anything needs
--resume auto (continue from its newest intact checkpoint) or --overwrite (delete it). One
exception, because nothing of value can be lost: `--resume auto` on a run that stopped before
its first checkpoint (and has no final model) starts it over.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from lib import checkpoint as ckpt
from lib.errors import UserError

_held: dict[str, int] = {}  # lock file -> open descriptor: held until this process exits


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run folder: beside it, `.<name>.lock`."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.lock")


def acquire(run_dir: str | Path) -> None:
    """Hold `run_dir`'s lock for the rest of this process's life (again: no-op), or raise a
    UserError naming the job that holds it."""
    import fcntl

    path = lock_path(run_dir)
    if str(path) in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserError(f"run folder {Path(run_dir)} is in use by {holder(path)}; wait for that job to end (or "
                        f"stop it), or pick another --run_name") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}).encode())
    _held[str(path)] = fd


def holder(path: Path) -> str:
    """Who holds a lock file, as its record says."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']} since {info['since']} "
                f"({info['command'][:200]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another job (its lock record is unreadable)"


def claim(accelerator, run_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Take `run_dir` for this job (its lock, held by the main process until it exits) and make it
    ready; return the checkpoint to resume from, or None for a fresh start. Every process calls
    this; the main process decides (it alone reads, sets aside or deletes) and every process gets
    its answer, or the same UserError: the job holding the folder, or what to pass."""
    from lib.distributed import broadcast_from_main

    run_dir = Path(run_dir)
    answer = None
    if accelerator.is_main_process:
        try:
            acquire(run_dir)
            answer = ("resume", _decide(run_dir, resume, overwrite, accelerator.print))
        except UserError as exc:
            answer = ("error", str(exc))
    kind, value = broadcast_from_main(answer, accelerator)  # no process is left waiting for another
    if kind == "error":
        raise UserError(value)
    return value


def _decide(run_dir: Path, resume: str | None, overwrite: bool, say) -> Path | None:
    """claim's decision, on the main process: the checkpoint to resume from, or None after making
    the folder fresh (deleting it only where allowed)."""
    had_checkpoints = bool(ckpt.complete_checkpoints(run_dir))
    resume_from = ckpt.find_resume(run_dir, resume, say=say) if resume else None
    if resume == "auto" and resume_from is None and had_checkpoints and not overwrite:
        raise UserError(f"no checkpoint of {run_dir} verifies (see the warnings above; they are kept, set aside); "
                        "pass --overwrite to start the run over")
    if resume_from is None and run_dir.is_dir() and any(run_dir.iterdir()):
        # a run that stopped before its first checkpoint and has no final model: nothing to continue
        # or to lose (another job cannot be using it: this one holds its lock)
        nothing_kept = not had_checkpoints and not (run_dir / "final").exists() and not any(
            (run_dir / "checkpoints").glob("*.corrupt*"))
        if not (overwrite or nothing_kept):
            raise UserError(f"run folder {run_dir} already exists: pass --resume auto to continue it, "
                            "--overwrite to replace it, or another --run_name")
        if nothing_kept and not overwrite:
            say(f"{run_dir} has no checkpoint and no final model (it stopped before its first checkpoint): "
                "starting it over")
        ckpt.remove_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return resume_from
