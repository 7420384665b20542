"""A learning-rate schedule that fits a time budget, whatever the machine's speed.

With a budget (train.py --max_minutes), the schedule's horizon (the step where its decay ends)
is not a step count that suits one CPU: after its first steps the loop measures its step time and
fixes the horizon at the last step that fits the remaining budget, counting the evaluations,
checkpoints and the final evaluation and export still to come, and fits it again as more steps
are timed, until half the budget is spent. From then on the horizon is part
of the run's state (saved in every checkpoint), so a resumed run continues the same schedule.
"""
from __future__ import annotations

import time

SKIP_STEPS = 2  # untimed steps after a (re)start: compilation and first-touch allocations
MIN_TIMED_STEPS = 8  # timed steps the fit needs
MARGIN = 0.05  # share of the budget kept free: the step time measured early can drift
# The first fit uses a few steps' timing, which was seen 20% off the run's later pace either way
# (a schedule that ended early, or a budget spent before the decay): the horizon is fitted again
# every REFIT_EVERY steps from all the steps timed so far, until REFIT_UNTIL of the budget is
# spent, so that the decay itself runs on a settled horizon.
REFIT_EVERY = 50
REFIT_UNTIL = 0.5


class StepClock:
    """Seconds spent in optimizer steps (not evaluations or checkpoints) since this process
    started training, leaving out its first SKIP_STEPS steps."""

    def __init__(self) -> None:
        self.seen = 0
        self.timed = 0
        self.seconds = 0.0
        self.last_s = 0.0  # the latest step's seconds, timed or not
        self._t = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.seen += 1
        self.last_s = time.perf_counter() - self._t
        if self.seen > SKIP_STEPS:
            self.timed += 1
            self.seconds += self.last_s

    @property
    def ready(self) -> bool:
        return self.timed >= MIN_TIMED_STEPS

    @property
    def step_seconds(self) -> float:
        return self.seconds / max(self.timed, 1)


def fit_horizon(step: int, max_steps: int, seconds_left: float, seconds_per_step: float,
                final_seconds: float = 0.0) -> int:
    """The last optimizer step of a schedule that, from `step` (steps done), ends within
    `seconds_left`: each further step costs `seconds_per_step` (its share of evaluations and
    checkpoints included) and `final_seconds` are kept for what follows the last step. Never
    beyond max_steps, never before step + 1 (unless max_steps is reached: then max_steps)."""
    room = max(seconds_left - final_seconds, 0.0)
    return min(max_steps, max(step + 1, step + int(room // max(seconds_per_step, 1e-9))))


def plan(step: int, max_steps: int, budget_s: float, elapsed_s: float, step_s: float, *,
         periodic: list[tuple[int, float]], final_s: float) -> tuple[int, str]:
    """(horizon, explanation) for a budgeted run `elapsed_s` into its budget: `step_s` per
    optimizer step measured; `periodic`, each periodic action's (interval in steps, seconds of
    one call: evaluations, checkpoints, a plugin's); `final_s`, what follows the last step (its
    evaluation, checkpoint and the exported model), which is reserved for. MARGIN of the budget is
    kept free."""
    per_step = step_s + sum(seconds / every for every, seconds in periodic if every)
    left = budget_s * (1 - MARGIN) - elapsed_s
    horizon = fit_horizon(step, max_steps, left, per_step, final_s)
    why = (f"{step_s:.3f} s per step measured, {per_step:.3f} s with evaluations and checkpoints; "
           f"{max(left, 0) / 60:.1f} of the {budget_s / 60:g} minute budget left")
    if horizon == max_steps:
        why += f" (capped by max_steps {max_steps})"
    return horizon, why


def refit_due(step: int, fitted: bool, elapsed_s: float, budget_s: float) -> bool:
    """Whether the loop fits the horizon (again) after optimizer step `step`: the first time
    as soon as the clock is ready (`fitted` False), then every REFIT_EVERY steps while less than
    REFIT_UNTIL of the budget is spent."""
    return not fitted or (step % REFIT_EVERY == 0 and elapsed_s < REFIT_UNTIL * budget_s)
