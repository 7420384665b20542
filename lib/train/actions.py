"""Periodic actions of the training loop: evaluations, checkpoints, and what plugins add.

An action is a function of the run (train.py's `Run`) registered in ACTIONS with the option that
sets its interval, in optimizer steps:

    # samples.py: train.py --plugins samples.py --actions.samples_every 500
    @dataclass
    class SampleOptions:
        samples_every: int = 0                   # 0: off

    @ACTIONS.register("samples", options=SampleOptions, every="actions.samples_every")
    def write_samples(run):
        ...                                       # run.model, run.metrics, run.loop.step, run.say

The loop runs every action whose interval divides the step, and at the last step (the schedule's
end, a spent budget, --stop_at_step) every action registered with `at_end=True` (the default), so
the final evaluation and checkpoint go through the same code as the periodic ones. Each call is
timed. A time budget's schedule follows the clock, so a periodic action's time is simply spent;
the actions due after the last step are reserved for, at their measured seconds (before the
first call, the `estimate` they were registered with, if any), so none makes a budgeted run overrun.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from lib.plugins import Registry

ACTIONS = Registry("periodic action")
"""Periodic actions by name: fn(run) -> anything, registered with `every` (the dotted option that
holds its interval; 0 there: only at the end, or never with at_end=False), `at_end` (default True)
and `estimate` (fn(run) -> seconds of one call, used until one is measured)."""


@dataclass
class ActionsConfig:
    """Options of periodic actions that plugins register (lib/train/actions.py): `--actions.<name>`."""


def option(cfg, dotted: str):
    """The value of a dotted option of `cfg` ("actions.samples_every")."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@dataclass
class Action:
    name: str
    fn: Callable
    every: int
    at_end: bool
    estimate: Optional[Callable] = None
    seconds: list = field(default_factory=list)
    paces: list = field(default_factory=list)  # the step time when each call was timed (None: unknown)
    estimated: tuple | None = None  # (seconds, step time) of the registered estimate, made once
    last_result: object = None

    def due(self, step: int, last: bool) -> bool:
        return (last and self.at_end) or (bool(self.every) and step % self.every == 0)

    def cost(self, run, pace: float | None = None) -> float:
        """Seconds of one call: the median of those measured, each scaled by `pace` over the step
        time when it was timed (work timed on a quiet machine takes longer on a busy one; the median,
        since one call caught by a change of load took twenty times the others), else the
        registered estimate (made once: an evaluation's times a few batches), scaled alike, else 0."""
        def scaled(seconds: float, then: float | None) -> float:
            return seconds * (pace / then if pace and then else 1.0)

        if self.seconds:
            return statistics.median(scaled(s, p) for s, p in zip(self.seconds, self.paces))
        if self.estimate is None:
            return 0.0
        if self.estimated is None:
            self.estimated = (float(self.estimate(run)), pace)
        return scaled(*self.estimated)


class Periodic:
    """The run's actions, in registration order (the built-in evaluation and checkpoint first)."""

    def __init__(self, cfg):
        self.actions = []
        for name in ACTIONS.names():
            every = ACTIONS.meta(name, "every")
            interval = int(option(cfg, every)) if every else 0
            at_end = ACTIONS.meta(name, "at_end", True)
            if interval or at_end:
                self.actions.append(Action(name, ACTIONS.get(name, "actions"), interval, at_end,
                                           ACTIONS.meta(name, "estimate")))

    def __getitem__(self, name: str) -> Action:
        return next(a for a in self.actions if a.name == name)

    def run(self, run, step: int, last: bool, pace: float | None = None) -> None:
        """Call, in order, the actions due after optimizer step `step` (all at_end ones if `last`),
        timing each; `pace`: the step time now, kept with each timing (Action.cost)."""
        for action in self.actions:
            if action.due(step, last):
                t = time.perf_counter()
                action.last_result = action.fn(run)
                action.seconds.append(time.perf_counter() - t)
                action.paces.append(pace)

    def due_seconds(self, run, step: int, pace: float | None = None) -> float:
        """Seconds of the actions due by their interval after optimizer step `step`, at the step
        time `pace`."""
        return sum(a.cost(run, pace) for a in self.actions if a.due(step, last=False))

    def final_seconds(self, run, pace: float | None = None) -> float:
        """Seconds of the actions that run after the last step, at the step time `pace`."""
        return sum(a.cost(run, pace) for a in self.actions if a.at_end)
