"""Kill training with SIGKILL at random moments (some of them while a checkpoint is being
written), resume with --resume auto each time: the final weights and logged losses are bitwise
those of an uninterrupted run, and once a checkpoint exists there is always a complete one."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

from conftest import BITWISE, REPO, subprocess_env, train, train_command
from lib.records.checkpoint import TEST_PAUSE, complete_checkpoints
from test_resume import assert_same_run


def test_killed_anywhere_and_resumed_is_the_uninterrupted_run(tiny_data, tmp_path):
    common = [*BITWISE, "--log_every", "1", "--max_steps", "500", "--checkpoint_every", "5", "--keep_last_n", "2",
              "--eval_every", "100"]
    train(tiny_data, tmp_path, "straight", *common)
    run = tmp_path / "killed"
    seen = {"min_after_first": None, "polls": 0}
    stop_watch = threading.Event()

    def watch():  # count complete checkpoints as often as we can
        while not stop_watch.is_set():
            n = len(complete_checkpoints(run))
            if n or seen["min_after_first"] is not None:
                seen["min_after_first"] = n if seen["min_after_first"] is None else min(seen["min_after_first"], n)
            seen["polls"] += 1
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    rng = random.Random(0)
    env = subprocess_env()
    kills = {"random": 0, "during_checkpoint_write": 0}
    for attempt in range(12):
        # stderr to a file, not a pipe: nobody reads a pipe while we wait, and a full one would
        # block the run's next write for ever. Odd attempts hold every save open for a moment
        # (files written, record not yet), so that the kill lands inside one whatever the speed
        err = tmp_path / f"stderr_{attempt}.txt"
        mid_save = attempt % 2 == 1 and attempt < 8
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(train_command(tiny_data, tmp_path, "killed", *common, "--resume", "auto"), cwd=REPO,
                                    env={**env, **({TEST_PAUSE: "0.5"} if mid_save else {})},
                                    stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
        if attempt >= 8:  # enough: let it finish
            assert proc.wait(timeout=600) == 0, err.read_text()[-3000:]
            break
        # strike at a random moment once training is under way (it wrote metrics.jsonl: timed from
        # there, not from the launch, whose start-up time differs between machines), or, holding
        # saves open, as soon as a checkpoint is being written (its .tmp folder exists)
        launched = time.time()
        metrics = run / "metrics.jsonl"
        while proc.poll() is None and time.time() < launched + 300 and not (
                metrics.is_file() and metrics.stat().st_mtime > launched):
            time.sleep(0.005)
        deadline = time.time() + (120 if mid_save else rng.uniform(0.2, 1.5))
        mode = "random"
        while proc.poll() is None and time.time() < deadline:
            if mid_save and any(p.name.endswith(".tmp") for p in (run / "checkpoints").glob("step_*")):
                mode = "during_checkpoint_write"
                break
            time.sleep(0.005)
        if proc.poll() is not None:  # it finished before we struck
            assert proc.returncode == 0, err.read_text()[-3000:]
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills[mode] += 1
    stop_watch.set()
    watcher.join()
    assert kills == {"random": 4, "during_checkpoint_write": 4}, kills
    assert seen["min_after_first"] is not None and seen["min_after_first"] >= 1, seen
    assert_same_run(tmp_path / "straight", run)
