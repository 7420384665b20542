"""Many 2-process CPU DDP trainings launched at once, as the test suite does under pytest-xdist
but more: do any of them hang, or fail, and why? Not a test (minutes of CPU); run by hand:

    python tests/helpers/stress_launch.py --jobs 20 --data data/smoke

Each job is `accelerate launch --config_file configs/accelerate/cpu_ddp.yaml` on a port free at its
launch (tests/conftest.py's way), training the smoke preset for a few steps with a short
--dist_timeout_minutes, so a stuck collective ends as an error instead of a hang. Prints each
job's exit code, time and last error line, then a summary.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import accelerate_launch, train_command  # noqa: E402


def one(i: int, data: str, runs: Path, steps: int, timeout_min: float, limit_s: float) -> tuple:
    cmd = train_command(data, runs, f"job{i}", "--max_steps", str(steps), "--log_every", "1", "--eval_every", "0",
                        "--eval_tokens", "2000", "--checkpoint_every", str(steps // 2), "--precision", "fp32",
                        "--no_mfu", "--dist_timeout_minutes", str(timeout_min),
                        launcher=accelerate_launch("cpu_ddp"))
    t = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit_s,
                              env={**__import__("os").environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = "HUNG", (exc.stdout or b"").decode() + (exc.stderr or b"").decode() if isinstance(
            exc.stdout, bytes) else str(exc.stdout or "") + str(exc.stderr or "")
    errors = [line for line in out.splitlines() if line.startswith("error:") or "Error" in line[:40]]
    return i, code, time.time() - t, errors[-1][:200] if errors else ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--data", default=str(REPO / "data" / "smoke"))
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--timeout_minutes", type=float, default=2.0, help="each job's --dist_timeout_minutes")
    ap.add_argument("--limit_s", type=float, default=900, help="a job still running after this counts as hung")
    args = ap.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="stress-"))
    t = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda i: one(i, args.data, runs, args.steps, args.timeout_minutes, args.limit_s),
                                range(args.jobs)))
    for i, code, secs, err in results:
        print(f"job {i:>3}: exit {code!s:>4} in {secs:6.1f} s  {err}")
    codes = [c for _, c, _, _ in results]
    print(f"{args.jobs} jobs at once, {time.time() - t:.0f} s in all: {codes.count(0)} finished, "
          f"{sum(c not in (0, 'HUNG') for c in codes)} failed, {codes.count('HUNG')} hung (> {args.limit_s:.0f} s)")


if __name__ == "__main__":
    main()
