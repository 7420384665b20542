"""A learning-rate schedule that follows the clock, so that a budgeted run ends decayed on a fast
machine and a slow one, and when the machine's load changes midway.

With a budget (train.py --max_minutes) the schedule's progress is the share of the run's training
time spent: from its first step to the budget, less a small margin and what the work after the
last step costs (the final evaluation and checkpoint, the exported model). Before each step the
loop asks for the learning rate at the time that step will end; the step after which another one
would not end in time is the last, at the schedule's floor. A machine that slows down midway
(another job starts) thus takes fewer steps but still decays on time; one that speeds up takes
more. The progress never goes back, and max_steps still bounds it (whichever is further on
counts). What the last step's work costs is measured as the run goes (each evaluation and
checkpoint is timed) and scaled by the current step time, since an evaluation timed on a quiet
machine takes longer on a busy one.

The progress, the time the first step began and the warmup's end are the loop's state, saved in
every checkpoint: a resumed run continues the schedule from the time it had spent. Time differs
between runs, so --deterministic runs keep their schedule over max_steps
(lib.train.optim.lr_at) and the budget only stops them.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

SKIP_STEPS = 2  # untimed steps after a (re)start: torch.compile's compilation and first-touch allocations
MARGIN = 0.02  # share of the budget kept free: what the estimate of the final work misses
PACE_STEPS = 10  # the pace is the mean of this many latest steps: it follows a change of load within them
WORST_STEPS = 100  # the last step is planned for the longest of this many latest steps


class StepClock:
    """Seconds spent in optimizer steps (not evaluations or checkpoints) since this process
    started training, leaving out its first SKIP_STEPS steps; `pace`, the latest steps' mean."""

    def __init__(self) -> None:
        self.seen = 0
        self.timed = 0
        self.last_s = 0.0  # the latest step's seconds, timed or not
        self.window: deque = deque(maxlen=WORST_STEPS)  # the latest timed steps' seconds
        self._t = None

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self) -> None:
        self.seen += 1
        self.last_s = time.perf_counter() - self._t
        if self.seen > SKIP_STEPS:
            self.timed += 1
            self.window.append(self.last_s)

    @property
    def pace(self) -> float:
        """Seconds of a step now: the mean of the latest timed steps (before any is timed, the
        latest step's own, compilation included: an overestimate that only moves the first
        learning rates a little further on)."""
        recent = list(self.window)[-PACE_STEPS:]
        return sum(recent) / len(recent) if recent else self.last_s

    @property
    def steady(self) -> float:
        """The mean of the latest WORST_STEPS steps: the step time that work timed now is compared
        by (lib.train.actions.Action.cost), steadier than `pace` on a machine whose steps jump."""
        return sum(self.window) / len(self.window) if self.window else self.last_s

    @property
    def worst(self) -> float:
        """The longest of the latest WORST_STEPS steps (the latest one included, timed or not): on a
        busy machine a step now and then takes a hundred times the mean, and the last one must
        still end in time."""
        return max(max(self.window, default=0.0), self.last_s)


@dataclass
class ClockSchedule:
    """Where a budgeted run is in its schedule (see the module's note)."""

    budget_s: float
    max_steps: int
    start_s: Optional[float] = None
    """The run's elapsed seconds when its first step began (its start-up is not training time)."""
    progress: float = 0.0
    """The schedule's progress at the end of the latest step, 0 to 1."""
    warm_end: Optional[float] = None
    """The progress at which warmup (counted in steps) ended."""
    kept_s: float = 0.0
    """The seconds kept for the work after the last step, as last estimated (not saved)."""

    def end_s(self, final_s: float) -> float:
        """The elapsed seconds by which the last step must end: the budget, less the margin and
        `final_s` (the work after the last step)."""
        return self.budget_s * (1 - MARGIN) - final_s

    def advance(self, step: int, elapsed_s: float, pace_s: float, final_s: float, between_s: float = 0.0,
                worst_s: Optional[float] = None) -> bool:
        """Move the progress to the end of optimizer step `step` (0-based, about to run), which
        starts `elapsed_s` into the run and takes `pace_s`; True when it is the last step: after
        it and the periodic actions due after it (`between_s`), a next one as long as the longest
        lately (`worst_s`, default pace_s) would not end by end_s(final_s), or max_steps is
        reached. The last step's progress is 1."""
        if self.start_s is None:
            self.start_s = elapsed_s
        self.kept_s = final_s
        end = self.end_s(final_s)
        worst_s = pace_s if worst_s is None else max(worst_s, pace_s)
        last = elapsed_s + pace_s + between_s + worst_s > end or step + 1 >= self.max_steps
        by_time = (elapsed_s + pace_s - self.start_s) / max(end - self.start_s, 1e-9)
        self.progress = 1.0 if last else min(1.0, max(self.progress, by_time, (step + 1) / self.max_steps))
        return last

    def projected_steps(self, step: int, elapsed_s: float, final_s: float) -> int:
        """The step the schedule will likely end at, at the pace so far (evaluations and checkpoints
        included): for the progress bar and the log, never for the learning rate."""
        if self.start_s is None or step == 0 or elapsed_s <= self.start_s:
            return self.max_steps
        per_step = (elapsed_s - self.start_s) / step
        return min(self.max_steps, step + 1 + max(int((self.end_s(final_s) - elapsed_s) // per_step), 0))

    def state_dict(self) -> dict:
        return {"start_s": self.start_s, "progress": self.progress, "warm_end": self.warm_end}

    def load_state_dict(self, d: dict) -> None:
        self.start_s, self.progress, self.warm_end = d["start_s"], d["progress"], d.get("warm_end")
