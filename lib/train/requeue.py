"""Whether a cluster job should be requeued: it stopped on request (a signal before its time limit,
checkpoint written) rather than finished or failed.

`accelerate launch` and torchrun do not pass a worker's exit code on (a stopped job reads 143,
130 or 1 there), so the decision rests on the run folder's status.json, which train.py's main
process writes as the job ends (lib/run_folder.record_end), and only on one written by this
attempt. configs/accelerate/slurm.sbatch calls it after each launch:

    python -m lib.train.requeue --run_dir runs/big --exit_code $? --since $START_EPOCH --restarts N --max_restarts M

prints `requeue`, `done` or `failed` with the reason on stderr, and exits 0, 0 or 1.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lib.train.preemption import EXIT_STOPPED


def decide(run_dir: str | Path, exit_code: int, since: float, restarts: int = 0,
           max_restarts: int = 50) -> tuple[str, str]:
    """('requeue' | 'done' | 'failed', why) for a launch that began at `since` (epoch seconds) and
    exited `exit_code`. Requeue: the run recorded a stop during this attempt (or a single process
    exited EXIT_STOPPED), and fewer than `max_restarts` requeues happened so far. Done: it recorded
    that it finished, and the launch exited 0. Anything else failed: a crash, a killed job (its
    record still says running), or a record left by an earlier attempt."""
    from lib.records.run_folder import read_status

    status = read_status(run_dir)
    fresh = status is not None and float(status.get("time", 0)) >= since
    state = status.get("state") if fresh else None
    if state == "stopped" or (exit_code == EXIT_STOPPED and state in (None, "stopped")):
        if restarts >= max_restarts:
            return "failed", f"stopped again after {restarts} requeues (limit {max_restarts}); not requeued"
        return "requeue", f"{run_dir} stopped on request with a checkpoint (exit code {exit_code}): requeue"
    if state == "finished" and exit_code == 0:
        return "done", f"{run_dir} finished"
    if status is None:
        return "failed", f"exit code {exit_code}, and {run_dir} has no status.json (it failed before it started)"
    if not fresh:
        return "failed", f"exit code {exit_code}, and {run_dir}/status.json is from an earlier attempt"
    detail = f": {status['error']}" if status.get("error") else ""
    return "failed", f"exit code {exit_code}, {run_dir} recorded '{state}'{detail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.train.requeue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, type=Path)
    parser.add_argument("--exit_code", required=True, type=int)
    parser.add_argument("--since", required=True, type=float, help="when the launch began, epoch seconds")
    parser.add_argument("--restarts", type=int, default=0, help="requeues so far (SLURM_RESTART_COUNT)")
    parser.add_argument("--max_restarts", type=int, default=50)
    args = parser.parse_args(argv)
    verdict, why = decide(args.run_dir, args.exit_code, args.since, args.restarts, args.max_restarts)
    print(verdict)
    print(why, file=sys.stderr)
    return 1 if verdict == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
