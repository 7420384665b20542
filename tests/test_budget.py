"""A run with a time budget ends on time with its learning rate decayed, whatever the machine's
speed and however its load changes: the schedule follows the clock (lib/train/budget.py), its
progress kept in checkpoints, so a stopped and resumed run continues it."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import train
from lib.train import budget
from lib.train.optim import OptimConfig, lr_at, lr_at_progress


def test_the_clock_schedule_ends_at_its_floor_on_time_whatever_the_pace():
    """Simulated runs: 60 s budgets, 5 s of start-up, 1 s kept for the final work; steps that take
    0.05 s, or 0.05 s and then 0.15 s from a third of the way in (a second job), or 0.15 s and then
    0.05 s from halfway: each ends with its last step at progress 1, the step before it short of
    1, and no step ending after the budget less its margin."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    for pace_at in (lambda t: 0.05, lambda t: 0.05 if t < 20 else 0.15, lambda t: 0.15 if t < 30 else 0.05):
        clock = budget.ClockSchedule(60.0, 1_000_000)
        t, step, lrs, progress = 5.0, 0, [], []
        while True:
            pace = pace_at(t)
            last = clock.advance(step, t, pace, final_s=1.0)
            if clock.warm_end is None and step >= cfg.warmup_steps:
                clock.warm_end = progress[-1]
            lrs.append(lr_at_progress(step, clock.progress, cfg, clock.warm_end))
            progress.append(clock.progress)
            t += pace
            step += 1
            if last:
                break
        assert t <= 60 * (1 - budget.MARGIN) - 1.0 + 1e-9 and t > 60 * (1 - budget.MARGIN) - 1.0 - 2 * 0.15
        assert progress[-1] == 1.0 and progress[-2] < 1.0 and progress == sorted(progress)
        assert lrs[-1] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-2, rel=0.01)
        assert lrs[:10] == pytest.approx([1e-2 * (i + 1) / 10 for i in range(10)])  # warmup by steps
    # max_steps still bounds it: the schedule ends there, decayed, however much time is left
    clock = budget.ClockSchedule(600.0, 50)
    ends = [clock.advance(i, 1.0 + 0.01 * i, 0.01, 0.0) for i in range(50)]
    assert ends.index(True) == 49 and clock.progress == 1.0


def test_the_progress_never_goes_back_and_a_checkpoint_keeps_it():
    clock = budget.ClockSchedule(100.0, 10_000)
    clock.advance(0, 10.0, 1.0, final_s=5.0)
    clock.advance(1, 50.0, 1.0, final_s=5.0)
    reached = clock.progress
    clock.advance(2, 51.0, 1.0, final_s=0.0)  # the final work now looks cheaper: the deadline moves out
    assert clock.progress == reached
    again = budget.ClockSchedule(100.0, 10_000)
    again.load_state_dict(clock.state_dict())
    assert (again.start_s, again.progress) == (10.0, reached)


def test_warmup_fraction_is_a_share_of_the_training_time():
    cfg = OptimConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1, schedule="linear")
    assert lr_at_progress(0, 0.05, cfg) == pytest.approx(0.5)
    assert lr_at_progress(500, 0.1, cfg) == pytest.approx(1.0)
    assert lr_at_progress(900, 0.55, cfg) == pytest.approx(0.55)
    assert lr_at_progress(901, 1.0, cfg) == pytest.approx(0.1)


def test_step_clock_leaves_out_the_first_steps():
    """The first steps (compilation, first-touch allocations: here one of 0.3 s) stay out of the pace,
    the steady mean and, once a later step is the latest, the longest step."""
    clock = budget.StepClock()
    for i in range(budget.SKIP_STEPS + 3):
        clock.start()
        time.sleep(0.3 if i == 0 else 0.0)
        clock.stop()
        if i == 0:
            assert clock.worst >= 0.3 and clock.pace >= 0.3  # nothing timed yet: the latest step is all it knows
    assert clock.timed == 3 and len(clock.window) == 3
    assert clock.pace < 0.1 and clock.steady < 0.1 and clock.worst < 0.1


def _rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# one process, bitwise reproducible, a quick held-out sample, logged every step
QUIET = ("--eval_tokens", "2000", "--log_every", "1", "--precision", "fp32", "--deterministic", "--no_mfu",
         "--checkpoint_every", "0", "--eval_every", "100")


def test_budgeted_run_decays_in_time_and_resumes_on_its_clock(tiny_data, tmp_path):
    budgeted = ["--max_steps", "100000", "--max_minutes", "0.25", "--fit_schedule", "True"]
    first = train(tiny_data, tmp_path, "resumed", *QUIET, *budgeted, "--stop_at_step", "30")
    assert "the learning rate follows the budget's clock" in first.stdout
    stopped = _rows(tmp_path / "resumed")
    assert stopped[-1]["step"] == 30 and 1e-3 < stopped[-1]["lr"] <= 1e-2
    again = train(tiny_data, tmp_path, "resumed", *QUIET, *budgeted, "--resume", "auto")
    rows = _rows(tmp_path / "resumed")
    assert "budget is spent" not in again.stdout
    assert rows[-1]["step"] == rows[-1]["horizon"] > 30 and rows[-1]["lr"] == pytest.approx(1e-3)  # decayed
    assert rows[-1]["elapsed_s"] <= 15 * (1 - budget.MARGIN)  # both parts together, in the budget
    lrs = [r["lr"] for r in rows if r["step"] > 10]  # after warmup: falling, across the resume too
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lrs, lrs[1:]))
    report = (tmp_path / "resumed" / "report.md").read_text()
    assert f"{rows[-1]['step']} of {rows[-1]['step']}" in report and "on a 0.25 minute budget's clock" in report


def test_deterministic_runs_keep_the_schedule_off_the_clock(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "det", *QUIET, "--max_steps", "40", "--max_minutes", "5")
    assert "--deterministic: a learning rate on the clock would differ" in proc.stdout
    assert "follows the budget's clock" not in proc.stdout
    rows = _rows(tmp_path / "det")
    assert rows[-1]["step"] == 40 and {r["horizon"] for r in rows} == {40}
    cfg = OptimConfig(lr=1e-2, warmup_steps=10)  # smoke.yaml's
    assert [r["lr"] for r in rows] == pytest.approx([lr_at(s, 40, cfg) for s in range(40)])


def _busy(n: int) -> list:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def test_a_budgeted_run_ends_on_time_and_decayed_when_the_load_changes(tiny_data, tmp_path):
    """A second heavy process started a third of the way into a 30 s budget, or running from the
    start and stopped halfway: either run ends within 5% of its budget (start-up, final evaluation
    and export included), at the schedule's floor, with no step cut short by the budget."""
    budget_s = 30.0
    for name, start_at, stop_at in (("loaded_later", budget_s / 3, None), ("relieved_later", 0.0, budget_s / 2)):
        procs: list = []

        def change_load():
            time.sleep(start_at)
            procs.extend(_busy(1))
            if stop_at is not None:
                time.sleep(stop_at - start_at)
                for p in procs:
                    p.kill()

        loader = threading.Thread(target=change_load, daemon=True)
        t0 = time.perf_counter()
        loader.start()
        try:
            proc = train(tiny_data, tmp_path, name, "--eval_tokens", "2000", "--log_every", "1", "--precision",
                         "fp32", "--no_mfu", "--checkpoint_every", "500", "--max_steps", "1000000",
                         "--max_minutes", str(budget_s / 60))
            wall = time.perf_counter() - t0
        finally:
            loader.join()
            for p in procs:
                p.kill()
                p.wait()
        print(f"{name}: {wall:.1f} s for a {budget_s:g} s budget; {proc.stdout.splitlines()[-1]}")
        assert abs(wall - budget_s) <= 0.05 * budget_s, (name, wall, proc.stdout[-2000:])
        assert "budget is spent" not in proc.stdout
        rows = _rows(tmp_path / name)
        assert rows[-1]["lr"] == pytest.approx(1e-3) and rows[-1]["step"] == rows[-1]["horizon"]
        # the load did change the pace: steps per second differ between the two halves of the run
        quiet = [r["tokens_per_s"] for r in rows if (r["elapsed_s"] < start_at - 1) or
                 (stop_at is not None and r["elapsed_s"] > stop_at + 1)]
        busy = [r["tokens_per_s"] for r in rows if start_at + 1 < r["elapsed_s"] < (stop_at or budget_s) - 1]
        assert sorted(busy)[len(busy) // 2] < 0.8 * sorted(quiet)[len(quiet) // 2], name


SLOW_ACTION = '''
import time
from dataclasses import dataclass

from lib.train.actions import ACTIONS


@dataclass
class SlowOptions:
    slow_every: int = 0


@ACTIONS.register("slow", options=SlowOptions, every="actions.slow_every")
def slow(run):
    time.sleep(0.4)
    if run.metrics:
        run.metrics.write({"type": "slow", "step": run.loop.step})
'''


def test_a_plugins_periodic_action_runs_on_its_interval_and_the_budget_pays_for_it(tiny_data, tmp_path):
    """A periodic action registered by a plugin (lib/train/actions.py) runs every N steps and after the
    last one, and the budget keeps its measured cost for the final call: a run whose steps take a
    small fraction of what the action costs still ends, decayed, within its budget."""
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_ACTION)
    proc = train(tiny_data, tmp_path, "slow", *QUIET, "--max_steps", "100000", "--max_minutes", "0.5",
                 "--fit_schedule", "True", "--plugins", str(plugin), "--actions.slow_every", "10")
    assert "budget is spent" not in proc.stdout, proc.stdout
    rows = _rows(tmp_path / "slow")
    last = rows[-1]
    # ended by its schedule, decayed, in time: the final call's 0.4 s was kept for
    assert last["step"] == last["horizon"] and last["lr"] == pytest.approx(1e-3) and last["elapsed_s"] <= 30
    records = [json.loads(x) for x in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    slow_steps = [r["step"] for r in records if r["type"] == "slow"]
    expected = list(range(10, last["step"] + 1, 10))
    assert slow_steps == expected + ([last["step"]] if last["step"] % 10 else [])
