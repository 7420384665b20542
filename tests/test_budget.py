"""A run with a time budget ends with its learning rate decayed, whatever the machine's speed:
the schedule's horizon is fitted from the measured step time after warmup, kept in checkpoints,
and a stopped and resumed run continues the same schedule bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train
from lib.train import budget
from lib.train.optim import OptimConfig, lr_at
from test_resume import assert_same_run


def test_fit_horizon_counts_steps_that_fit_and_caps_them():
    assert budget.fit_horizon(50, 10_000, 100.0, 0.5) == 250  # 200 more steps of 0.5 s
    assert budget.fit_horizon(50, 10_000, 100.0, 0.5, final_seconds=10.0) == 230
    assert budget.fit_horizon(50, 120, 100.0, 0.5) == 120  # never past max_steps
    assert budget.fit_horizon(50, 10_000, -5.0, 0.5) == 51  # budget already spent: end at once
    # a fit at the last step of max_steps (a refit at a multiple of REFIT_EVERY) ends there: once a
    # 200-step fine-tune ran a 201st step at its floor learning rate
    assert budget.fit_horizon(200, 200, 100.0, 0.5) == 200


def test_plan_charges_evaluations_checkpoints_and_the_final_ones():
    # 0.4 s steps; an evaluation every 100 steps costs 10 s (0.1 s per step), a checkpoint every
    # 200 costs 4 s (0.02 s per step); the final evaluation and two saves (18 s) are kept back
    horizon, why = budget.plan(50, 100_000, budget_s=600.0, elapsed_s=60.0, step_s=0.4,
                               periodic=[(100, 10.0), (200, 4.0)], final_s=10.0 + 2 * 4.0)
    left = 600 * (1 - budget.MARGIN) - 60 - 18
    assert horizon == 50 + int(left // 0.52)
    assert "0.400 s per step" in why and "0.520 s with evaluations" in why
    # twice as slow a machine: about half the steps, and the schedule still ends in the budget
    slow, _ = budget.plan(50, 100_000, budget_s=600.0, elapsed_s=60.0, step_s=0.8,
                          periodic=[(100, 20.0), (200, 4.0)], final_s=20.0 + 2 * 4.0)
    assert slow < horizon * 0.55


def test_step_clock_leaves_out_the_first_steps():
    clock = budget.StepClock()
    for _ in range(budget.SKIP_STEPS + budget.MIN_TIMED_STEPS - 1):
        clock.start()
        clock.stop()
    assert not clock.ready and clock.timed == budget.MIN_TIMED_STEPS - 1
    clock.start()
    clock.stop()
    assert clock.ready and 0 <= clock.step_seconds < 0.1


def _rows(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


# one process, bitwise reproducible, a quick held-out sample, logged every step
QUIET = ("--eval_tokens", "2000", "--log_every", "1", "--precision", "fp32", "--deterministic", "--no_mfu",
         "--checkpoint_every", "0", "--eval_every", "100")


def test_budgeted_run_decays_in_time_and_resumes_the_same_schedule(tiny_data, tmp_path):
    budgeted = ["--max_steps", "100000", "--max_minutes", "0.2", "--fit_schedule", "True"]
    # stopped after the fit, then resumed: the horizon comes from the checkpoint (no budget needed)
    first = train(tiny_data, tmp_path, "resumed", *QUIET, *budgeted, "--stop_at_step", "30")
    assert "schedule fitted to the budget at step 10" in first.stdout
    rows = _rows(tmp_path / "resumed")
    horizon = rows[-1]["horizon"]
    assert 30 < horizon < 100000 and all(r["horizon"] == horizon for r in rows if r["step"] >= 10)
    train(tiny_data, tmp_path, "resumed", *QUIET, "--max_steps", "100000", "--max_minutes", "None", "--resume", "auto")
    rows = _rows(tmp_path / "resumed")
    assert rows[-1]["step"] == horizon and {r["horizon"] for r in rows[10:]} == {horizon}
    cfg = OptimConfig(lr=1e-2, warmup_steps=10)  # smoke.yaml's
    assert rows[-1]["lr"] == pytest.approx(lr_at(horizon - 1, horizon, cfg)) == pytest.approx(1e-3)  # decayed
    report = (tmp_path / "resumed" / "report.md").read_text()
    assert f"{horizon} of {horizon}" in report and "fitted to a 0.2 minute budget" in report
    # bit for bit the run that was given that horizon as its step count from the start
    train(tiny_data, tmp_path, "straight", *QUIET, "--max_steps", str(horizon))
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_deterministic_runs_keep_the_schedule_off_the_clock(tiny_data, tmp_path):
    proc = train(tiny_data, tmp_path, "det", *QUIET, "--max_steps", "40", "--max_minutes", "5")
    assert "--deterministic: a horizon measured from time would differ" in proc.stdout
    assert "schedule fitted" not in proc.stdout
    rows = _rows(tmp_path / "det")
    assert rows[-1]["step"] == 40 and {r["horizon"] for r in rows} == {40}


def test_the_horizon_is_fitted_again_when_the_pace_changes(tiny_data, tmp_path):
    assert budget.refit_due(7, False, 100.0, 60.0)  # the first fit: whenever the clock is ready
    assert budget.refit_due(budget.REFIT_EVERY * 3, True, 20.0, 60.0)
    assert not budget.refit_due(budget.REFIT_EVERY * 3 + 1, True, 20.0, 60.0)
    assert not budget.refit_due(budget.REFIT_EVERY * 3, True, 31.0, 60.0)  # half the budget spent: settled
    # a 3-second stall before step 30, after the first fit at step 10: the fit at step 50 sees it
    # and ends the schedule earlier, so that it still decays within the budget
    # (a 30-second budget: the fit at step 50 falls in its first half even on a loaded machine)
    proc = train(tiny_data, tmp_path, "stalled", *QUIET, "--max_steps", "100000", "--max_minutes", "0.5",
                 "--fit_schedule", "True", "--debug_stall", "0:30:3")
    first = int(proc.stdout.split("schedule fitted to the budget at step 10: it ends at step ")[1].split()[0])
    again = proc.stdout.split(f"schedule fitted again at step {budget.REFIT_EVERY}: it ends at step ")[1]
    assert int(again.split(",")[0]) < first and f"not {first}" in again
    rows = _rows(tmp_path / "stalled")
    assert rows[-1]["step"] == rows[-1]["horizon"] < first  # ended by its schedule, decayed
    assert "budget is spent" not in proc.stdout


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
    last one, and the fitted schedule counts its measured cost: a run whose steps take a small
    fraction of what the action costs still ends, decayed, within its budget."""
    plugin = tmp_path / "slow.py"
    plugin.write_text(SLOW_ACTION)
    proc = train(tiny_data, tmp_path, "slow", *QUIET, "--max_steps", "100000", "--max_minutes", "0.5",
                 "--fit_schedule", "True", "--plugins", str(plugin), "--actions.slow_every", "10")
    assert "budget is spent" not in proc.stdout, proc.stdout
    rows = _rows(tmp_path / "slow")
    last = rows[-1]
    assert last["step"] == last["horizon"] and last["elapsed_s"] <= 30  # ended by its schedule, in time
    records = [json.loads(x) for x in (tmp_path / "slow" / "metrics.jsonl").read_text().splitlines()]
    slow_steps = [r["step"] for r in records if r["type"] == "slow"]
    expected = list(range(10, last["step"] + 1, 10))
    assert slow_steps == expected + ([last["step"]] if last["step"] % 10 else [])
    # without it the same run fits far more steps: the action's seconds were charged
    again = int(proc.stdout.split(f"schedule fitted again at step {budget.REFIT_EVERY}: it ends at step ")[1].split(",")[0])
    first = int(proc.stdout.split("schedule fitted to the budget at step 10: it ends at step ")[1].split()[0])
    assert again < first / 2
