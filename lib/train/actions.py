"""The periodic work of the training loop, timed so that a time budget can charge it: the loop's own
jobs (evaluation, samples, tasks, checkpoint: `if` blocks in train.py's loop) and the actions
plugins register here.

A plugin's action is a function of the run (train.py's `Run`) registered in ACTIONS with the
option that sets its interval, in optimizer steps:

    # samples.py: train.py --plugins samples.py --actions.samples_every 500
    @dataclass
    class SampleOptions:
        samples_every: int = 0                   # 0: off

    @ACTIONS.register("samples", options=SampleOptions, every="actions.samples_every")
    def write_samples(run):
        ...                                       # run.unwrapped, run.metrics, run.loop.step, run.say

The loop runs every action whose interval divides the step, and at the last step (the schedule's
end, a spent budget, --stop_at_step) every action registered with `at_end=True` (the default).
Every job is timed. A time budget's schedule follows the clock, so a periodic job's time is
simply spent; the jobs due after the last step are reserved for, at their measured seconds
(before the first call, the `estimate` they were registered with, if any), so none makes a
budgeted run overrun.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from lib.plugins import Registry

ACTIONS = Registry("periodic action")
"""Plugins' periodic actions by name: fn(run) -> anything, registered with `every` (the dotted
option that holds its interval; 0 there: only at the end, or never with at_end=False), `at_end`
(default True) and `estimate` (fn(run) -> seconds of one call, used until one is measured)."""


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
class Job:
    """One periodic job: when it is due, and what its calls cost."""

    name: str
    every: int
    at_end: bool
    estimate: Optional[Callable] = None
    fn: Optional[Callable] = None  # a plugin's action; the loop's own jobs are called by the loop
    seconds: list = field(default_factory=list)
    paces: list = field(default_factory=list)  # the step time when each call was timed (None: unknown)
    estimated: tuple | None = None  # (seconds, step time) of the registered estimate, made once

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
    """A run's periodic jobs: the loop's own, then the plugins' actions in registration order."""

    def __init__(self, cfg, own: dict[str, tuple[int, bool, Optional[Callable]]]):
        """`own`: the loop's jobs, name -> (interval, at the end too, estimate); one with neither
        an interval nor at_end never runs and is left out."""
        self.jobs = [Job(name, every, at_end, estimate) for name, (every, at_end, estimate) in own.items()
                     if every or at_end]
        for name in ACTIONS.names():
            every = ACTIONS.meta(name, "every")
            interval = int(option(cfg, every)) if every else 0
            at_end = ACTIONS.meta(name, "at_end", True)
            if interval or at_end:
                self.jobs.append(Job(name, interval, at_end, ACTIONS.meta(name, "estimate"),
                                     fn=ACTIONS.get(name, "actions")))

    def __getitem__(self, name: str) -> Job:
        return next(j for j in self.jobs if j.name == name)

    @contextlib.contextmanager
    def timed(self, name: str, pace: float | None) -> Iterator[None]:
        """Time the block as one call of job `name`; `pace`: the step time now (Job.cost)."""
        t = time.perf_counter()
        yield
        self[name].seconds.append(time.perf_counter() - t)
        self[name].paces.append(pace)

    def run_actions(self, run, step: int, last: bool, pace: float | None = None) -> None:
        """Call, in order, the plugins' actions due after optimizer step `step` (all at_end ones
        if `last`), timing each."""
        for job in self.jobs:
            if job.fn is not None and job.due(step, last):
                with self.timed(job.name, pace):
                    job.fn(run)

    def due_seconds(self, run, step: int, pace: float | None = None) -> float:
        """Seconds of the jobs due by their interval after optimizer step `step`, at the step
        time `pace`."""
        return sum(j.cost(run, pace) for j in self.jobs if j.due(step, last=False))

    def final_seconds(self, run, pace: float | None = None) -> float:
        """Seconds of the jobs that run after the last step, at the step time `pace`."""
        return sum(j.cost(run, pace) for j in self.jobs if j.at_end)
