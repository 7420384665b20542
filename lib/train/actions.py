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
timed; a time budget's fit charges each action its measured seconds (before its first call, the
`estimate` it was registered with, if any), so adding an action never makes a fitted run overrun.
"""
from __future__ import annotations

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
    last_result: object = None

    def due(self, step: int, last: bool) -> bool:
        return (last and self.at_end) or (bool(self.every) and step % self.every == 0)

    def cost(self, run) -> float:
        """Seconds of one call: the mean of those measured, else the registered estimate, else 0."""
        if self.seconds:
            return sum(self.seconds) / len(self.seconds)
        return float(self.estimate(run)) if self.estimate is not None else 0.0


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

    def run(self, run, step: int, last: bool) -> None:
        """Call, in order, the actions due after optimizer step `step` (all at_end ones if `last`)."""
        for action in self.actions:
            if action.due(step, last):
                t = time.perf_counter()
                action.last_result = action.fn(run)
                action.seconds.append(time.perf_counter() - t)

    def budget_terms(self, run) -> tuple[list[tuple[int, float]], float]:
        """(interval, seconds) of each periodic action, and the seconds of those at the last step."""
        periodic = [(a.every, a.cost(run)) for a in self.actions if a.every]
        final = sum(a.cost(run) for a in self.actions if a.at_end)
        return periodic, final
