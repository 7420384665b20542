"""Which run folder a training job writes, and whether it continues or starts over.

A run name is one folder name inside --runs_dir (`check_name`): never empty, `.`, `..`, a path
or a hidden name, so that no option can point a job, or --overwrite, at anything but its own
folder.

A run folder belongs to one job at a time: the job's main process holds an OS file lock on
`<runs_dir>/.<run_name>.lock` (beside the folder, so that --overwrite emptying the folder cannot
drop it) until the job ends, when it deletes the file. The OS releases the lock when the process
ends, however it ends, so a crashed or killed job never leaves it stuck (only its file, which the
next job of that name takes over); a second job meanwhile is refused with the holder's pid,
host, start time and command, which the lock file records.

A folder is a run only if it holds a run's own records (`run_records`: its status.json, its
provenance.json, a config.yaml that train.py wrote, a checkpoint's record): a folder of anything
else (a user's documents named by mistake) is refused by every start, --overwrite and --resume
included, with what was found there, and nothing in it is read, renamed or removed.

Nothing in a run folder is deleted unless the user named it for deletion:
- `--resume auto` continues from the newest checkpoint that verifies, a folder or a packed
  `.tar.gz` archive (scripts/audit.py pack), whichever is newer; corrupt ones are set aside as
  `*.corrupt` and kept. A run that stopped before its first checkpoint starts over in its
  folder, its earlier metrics.jsonl moved aside (`metrics.before-restart.jsonl`).
- Without --resume, a folder that holds anything of a run is refused (only one left by a start
  that never trained, holding nothing but its config, is started in).
- `--overwrite` empties the named run's folder and says what it removed, keeping the corrupt
  checkpoints set aside in it (they are kept for a person to look at; delete them by hand).

The job's end is recorded in `status.json` (`record_end`): finished, stopped (a signal: it
checkpointed and exited with EXIT_STOPPED) or failed, so that a wrapper tells a stopped job from
a failed one even where a launcher does not pass the exit code on (lib/train/requeue.py).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from lib.records import checkpoint as ckpt
from lib.errors import UserError

STATUS = "status.json"
# what a start writes before its first optimizer step: a folder holding only these never trained
START_FILES = {"config.yaml", "provenance.json", "tracking.json", "metrics.jsonl", STATUS}
_held: dict[str, int] = {}  # lock file -> open descriptor: held until this job ends


def check_name(name: str, option: str = "--run_name") -> str:
    """`name` if it is one plain folder name, else a UserError naming `option`: not empty, not `.`
    or `..`, no path separator or NUL, not hidden (the runs dir's own lock and scratch names begin
    with a dot), not one of the names MLflow's store takes in the runs dir."""
    from lib.records.tracking import ARTIFACTS_NAME, DB_NAME

    problem = ("is empty" if not name.strip() else
               f"names {'this' if name == '.' else 'the parent'} folder, not a run" if name in (".", "..") else
               "holds a path separator" if "/" in name or "\\" in name else
               "holds a NUL byte" if "\0" in name else
               "begins with a dot (hidden names are the runs dir's lock files)" if name.startswith(".") else
               "is taken by the MLflow store in the runs dir" if name in (DB_NAME, ARTIFACTS_NAME) else None)
    if problem:
        raise UserError(f"{option} {name!r} {problem}: a run name is one folder name inside --runs_dir "
                        f"(e.g. {option} my-run; --runs_dir says where runs go)")
    return name


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of a run folder: beside it, `.<name>.lock`."""
    run_dir = Path(run_dir)
    return run_dir.with_name(f".{run_dir.name}.lock")


def acquire(run_dir: str | Path, advice: str = "or pick another --run_name") -> None:
    """Hold `run_dir`'s lock until `release` (again: no-op), or raise a UserError naming the job
    that holds it (and `advice`, after "wait for that job to end (or stop it), ")."""
    import fcntl

    path = lock_path(run_dir)
    if str(path) in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(f"run folder {Path(run_dir)} is in use by {holder(path)}; wait for that job to end (or "
                            f"stop it), {advice}") from None
        try:  # the file we locked is still the lock file (its last holder deletes it as it ends)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}).encode())
    _held[str(path)] = fd


def release(run_dir: str | Path) -> None:
    """Delete the lock file and let go of it (no-op unless this process holds it)."""
    path = lock_path(run_dir)
    fd = _held.pop(str(path), None)
    if fd is None:
        return
    try:
        path.unlink()  # while still locked: a job waiting on this file sees it was replaced
    except OSError:
        pass
    os.close(fd)


def holder(path: Path) -> str:
    """Who holds a lock file, as its record says."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']} since {info['since']} "
                f"({info['command'][:200]})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another job (its lock record is unreadable)"


def claim(accelerator, run_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Take `run_dir` for this job (its lock, held by the main process until the job ends) and make
    it ready; return the checkpoint to resume from, or None for a fresh start. Every process calls
    this; the main process decides (it alone reads, sets aside or removes) and every process gets
    its answer, or the same UserError: the job holding the folder, or what to pass. The main
    process records in status.json how the job ends, then releases the lock."""
    from lib import errors
    from lib.train.distributed import broadcast_from_main

    run_dir = Path(run_dir)
    check_name(run_dir.name)
    answer = None
    if accelerator.is_main_process:
        try:
            acquire(run_dir)
            try:
                answer = ("resume", _decide(run_dir, resume, overwrite, accelerator.print))
            except BaseException:
                release(run_dir)  # refused: the folder is left exactly as it was
                raise
            _write_status(run_dir, "running")
            errors.at_exit(lambda exc: (record_end(run_dir, exc), release(run_dir)))
        except UserError as exc:
            answer = ("error", str(exc))
    kind, value = broadcast_from_main(answer, accelerator)  # no process is left waiting for another
    if kind == "error":
        raise UserError(value)
    return value


def _has_records(metrics: Path) -> bool:
    try:
        return metrics.is_file() and bool(metrics.read_bytes().strip())
    except OSError:
        return True  # unreadable: assume it holds something


def _read_dict(path: Path, parse) -> dict | None:
    try:
        found = parse(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception:  # noqa: BLE001 -- unreadable or malformed (YAML's own errors included): not a record
        return None
    return found if isinstance(found, dict) else None


def run_records(run_dir: str | Path) -> list[str]:
    """The records in `run_dir` that only a training job writes: status.json (with a job state),
    provenance.json (with the command and precision), config.yaml (a resolved train config, with
    run_name), checkpoints/step_*/trainer_state.json. Empty for a folder that is not a run."""
    import yaml

    run_dir = Path(run_dir)
    found = []
    status = _read_dict(run_dir / STATUS, json.loads)
    if status and status.get("state") in ("running", "finished", "stopped", "failed"):
        found.append(STATUS)
    prov = _read_dict(run_dir / "provenance.json", json.loads)
    if prov and "argv" in prov and "mixed_precision" in prov:
        found.append("provenance.json")
    config = _read_dict(run_dir / "config.yaml", yaml.safe_load)
    if config and "run_name" in config:
        found.append("config.yaml")
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob(f"{ckpt.PREFIX}*/{ckpt.STATE}")):
        found.append(f"checkpoints/{ckpt.PREFIX}*")
    return found


def refuse_unless_run(run_dir: Path) -> None:
    """A UserError when `run_dir` holds entries but none of a run's records: it was never a run,
    and nothing may be written, renamed or removed there."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise UserError(f"--run_name {run_dir.name}: {run_dir} is a file, not a run folder; pick another "
                        "--run_name (or --runs_dir)")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
    if entries and not run_records(run_dir):
        shown = ", ".join(entries[:8]) + (f", ... ({len(entries)} entries)" if len(entries) > 8 else "")
        raise UserError(f"{run_dir} is not a run folder: it holds {shown} and none of a run's records (status.json, "
                        "provenance.json, config.yaml, checkpoints/); nothing there was touched. Pick another "
                        "--run_name (or --runs_dir); --overwrite and --resume act on run folders only")


def _decide(run_dir: Path, resume: str | None, overwrite: bool, say) -> Path | None:
    """claim's decision, on the main process: the checkpoint to resume from, or None for a fresh
    start in `run_dir` (emptied first only with --overwrite)."""
    refuse_unless_run(run_dir)
    resume_from = ckpt.find_resume(run_dir, resume, say=say) if resume else None
    if resume_from is not None or not run_dir.is_dir() or not any(run_dir.iterdir()):
        run_dir.mkdir(parents=True, exist_ok=True)
        return resume_from
    if overwrite:
        _empty(run_dir, say)
        return None
    if resume == "auto":
        # find_resume found no checkpoint that verifies: any left (folders set aside, archives) are broken
        kept = sorted([p.name for p in (run_dir / "checkpoints").glob("*.corrupt*")]
                      + [p.name for p in ckpt.archived_checkpoints(run_dir)])
        if kept:
            raise UserError(f"no checkpoint of {run_dir} verifies (kept as they are: {', '.join(kept)}; see the "
                            "warnings above): to train this run again from the start pass --overwrite, which removes "
                            "its other files and keeps the corrupt checkpoints, or use another --run_name")
        if (run_dir / "final").exists():
            raise UserError(f"run folder {run_dir} has a final model but no checkpoint to continue from: it is "
                            "finished; pass --overwrite to train it again (removing its files), or use another "
                            "--run_name")
        # it stopped before its first checkpoint: it starts over here, its earlier records kept aside
        note = ""
        if _has_records(run_dir / "metrics.jsonl"):
            aside = _free_name(run_dir / "metrics.before-restart.jsonl")
            os.replace(run_dir / "metrics.jsonl", aside)
            note = f"; its earlier metrics.jsonl is kept as {aside.name}"
        say(f"{run_dir} has no checkpoint and no final model (it stopped before its first checkpoint): "
            f"starting it over{note}")
        return None
    entries = {p.name for p in run_dir.iterdir()}
    if resume is None and entries <= START_FILES and not _has_records(run_dir / "metrics.jsonl"):
        say(f"{run_dir} holds only what a start that never trained wrote ({', '.join(sorted(entries))}): "
            "starting it over")
        return None
    raise UserError(f"run folder {run_dir} already exists: pass --resume auto to continue it, --overwrite to replace "
                    "it (removing its files but the corrupt checkpoints set aside there), or another --run_name")


def _free_name(path: Path) -> Path:
    """`path`, or `<stem>-2<suffix>`, `-3`...: the first that does not exist."""
    n, found = 1, path
    while found.exists():
        n += 1
        found = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return found


def _empty(run_dir: Path, say) -> None:
    """--overwrite: remove everything in `run_dir` but the corrupt checkpoints set aside in its
    checkpoints/ (kept, as promised), saying what went. The folder is first renamed to a hidden
    name beside it, so that an interruption never leaves a half-removed run that looks resumable
    (a leftover is removed by the next --overwrite of that name)."""
    doomed = run_dir.with_name(f".{run_dir.name}.removing")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(run_dir, doomed)
    run_dir.mkdir()
    kept = []
    if (doomed / "checkpoints").is_dir():
        for p in sorted((doomed / "checkpoints").glob("*.corrupt*")):
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            os.replace(p, run_dir / "checkpoints" / p.name)
            kept.append(f"checkpoints/{p.name}")
    gone = sorted(p.name + ("/" if p.is_dir() else "") for p in doomed.iterdir())
    n_ckpt = len(list((doomed / "checkpoints").glob(f"{ckpt.PREFIX}*"))) if (doomed / "checkpoints").is_dir() else 0
    shutil.rmtree(doomed)
    say(f"--overwrite: removed the contents of {run_dir}: {', '.join(gone) or 'nothing'}"
        + (f" ({n_ckpt} checkpoint(s))" if n_ckpt else "")
        + (f"; kept the corrupt checkpoint(s) set aside there: {', '.join(kept)} (delete them by hand when done)"
           if kept else ""))


def _write_status(run_dir: Path, state: str, **info) -> None:
    from lib.files import write_json

    write_json(run_dir / STATUS, {"state": state, "time": time.time(), "pid": os.getpid(), **info})


def record_end(run_dir: Path, exc: BaseException | None) -> None:
    """Write how the job ended into status.json: 'finished' (main() returned), 'stopped' (it exited
    with EXIT_STOPPED: a signal, checkpoint written) or 'failed' (anything else, with the exit code
    or exception)."""
    from lib.errors import last_error, one_line
    from lib.train.preemption import EXIT_STOPPED

    if not run_dir.is_dir():
        return
    code = exc.code if isinstance(exc, SystemExit) else (0 if exc is None else 1)
    if code in (0, None):
        _write_status(run_dir, "finished", exit_code=0)
    elif code == EXIT_STOPPED:
        _write_status(run_dir, "stopped", exit_code=EXIT_STOPPED)
    else:
        # a one-line error ends as SystemExit: the line it printed is the error
        _write_status(run_dir, "failed", exit_code=code if isinstance(code, int) else 1,
                      error=(last_error() or (code if isinstance(code, str) else None)) if isinstance(exc, SystemExit)
                      else one_line(exc))


def read_status(run_dir: str | Path) -> dict | None:
    """status.json of a run folder, or None when it has none (or it cannot be read)."""
    try:
        data = json.loads((Path(run_dir) / STATUS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
