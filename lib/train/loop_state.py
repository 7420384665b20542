"""The training loop's own state, in one object that a checkpoint saves and restores.

Where the loop is (optimizer step, tokens seen, the schedule's horizon, or its progress on a time
budget's clock, training time of earlier parts of the run), what it has counted (updates skipped for a
non-finite loss, updates fp16's loss scaler dropped), the last evaluation, and the logging window:
the loss and token sums since the last log line, so that the first line logged after a resume is
the one an uninterrupted run logs.

Most of it is the same in every process. The logging window is not: each process sums the loss
of its own micro-batches (the logged mean is their sum over processes), so every process's window
is saved, in process order, and each process restores its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class LogWindow:
    """Sums since the last log line. `loss` (nats, a float32 tensor on the device, so adding to it
    never waits for the device) and `slots`/`pad` (input positions, padded ones) are this
    process's; `tokens` counts the target tokens of every process (the mean's denominator; of
    preference pairs, the pairs)."""

    loss: object = None
    tokens: int = 0
    slots: int = 0
    pad: int = 0

    def state_dict(self) -> dict:
        """This process's sums; the float32 loss sum as a Python float (exact, restored bit for bit)."""
        return {"loss": float(self.loss.double().item()) if self.loss is not None else 0.0,
                "tokens": self.tokens, "slots": self.slots, "pad": self.pad}

    def load_state_dict(self, d: dict) -> None:
        """Restore sums saved by state_dict (an empty dict: an empty window)."""
        self.loss.zero_()
        self.loss += d.get("loss", 0.0)
        self.tokens, self.slots, self.pad = d.get("tokens", 0), d.get("slots", 0), d.get("pad", 0)

    def reset(self) -> None:
        """Empty the window (after a log line)."""
        self.loss.zero_()
        self.tokens = self.slots = self.pad = 0


@dataclass
class LoopState:
    """Everything the loop carries from one optimizer step to the next, besides the model, the
    optimizer, the sampler and random states (which Accelerate and the sampler save)."""

    horizon: int
    """The schedule's last optimizer step (max_steps); under a time budget's clock, the step it is
    projected to end at (shown, never used for the learning rate)."""
    step: int = 0
    """Optimizer steps done."""
    tokens_seen: int = 0
    """Target tokens trained on, all processes."""
    skipped_steps: int = 0
    """Updates dropped for a non-finite loss or gradient (--on_nonfinite skip)."""
    overflow_steps: int = 0
    """Updates fp16's loss scaler dropped for an overflowing gradient."""
    clock: Optional[object] = None
    """The schedule's progress on a time budget's clock (lib.train.budget.ClockSchedule), or None:
    a schedule over `horizon` steps."""
    elapsed_before_s: float = 0.0
    """Training seconds spent by the earlier parts of a resumed run."""
    last_eval: dict = field(default_factory=lambda: {"step": None, "loss": None, "seconds": None, "figures": None})
    """Step, held-out loss, seconds and all figures of the latest evaluation (the loss alone is saved)."""
    window: LogWindow = field(default_factory=LogWindow)
    started_at: float = field(default_factory=time.perf_counter)
    """When this process started (train.py: the process itself, so that its start-up counts in a
    time budget); not saved."""
    stopped_at: Optional[float] = None
    """When this process's loop ended (stop_timing); not saved."""
    device: object = "cpu"
    """Where the window's loss sum lives (the training device); not saved."""

    def __post_init__(self) -> None:
        import torch

        if self.window.loss is None:
            self.window.loss = torch.zeros((), device=self.device)

    @property
    def done(self) -> bool:
        """Whether the schedule has ended: its last step taken (by the step count or the clock)."""
        return self.clock.progress >= 1.0 if self.clock is not None else self.step >= self.horizon

    def count_step(self, step_tokens: int, batches: list, step_loss=None, weight: Optional[int] = None) -> None:
        """An optimizer step done: its target tokens (all processes) counted, and in the logging
        window its input slots and padding, and its loss (this process's sum; None for a skipped
        update, whose non-finite loss would make the window's mean non-finite) with what that sum
        is a mean over, `weight` (all processes; default: the target tokens; preference pairs: the pairs)."""
        self.step += 1
        self.tokens_seen += step_tokens
        self.window.slots += sum(b.input_ids.size for b in batches)
        self.window.pad += sum(b.n_padding for b in batches)
        if step_loss is not None:
            self.window.loss += step_loss
            self.window.tokens += step_tokens if weight is None else weight

    def elapsed_s(self) -> float:
        """Seconds of the whole run, resumed parts included, from each part's start (start-up,
        evaluations and checkpoints inside the loop count) to the end of its loop (the final
        evaluation and export after it do not: the budget fit reserves time for them)."""
        return self.elapsed_before_s + (self.stopped_at or time.perf_counter()) - self.started_at

    def stop_timing(self) -> None:
        """The loop is over: elapsed_s stops growing (what checkpoints and the report record)."""
        self.stopped_at = time.perf_counter()

    def state_dict(self, gather: Callable[[list], list]) -> dict:
        """What a checkpoint of this step records. `gather(items)` concatenates every process's
        list in process order (accelerate.utils.gather_object); every process must call this
        together."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped_steps,
                "overflow_steps": self.overflow_steps,
                "clock": self.clock.state_dict() if self.clock is not None else None,
                "elapsed_s": self.elapsed_s(),
                "val_loss": self.last_eval["loss"] if self.last_eval["step"] == self.step else None,
                "log_windows": gather([self.window.state_dict()])}

    def load_state_dict(self, d: dict, process_index: int) -> None:
        """Restore from a checkpoint's record; this process takes its own logging window (none,
        that is an empty one, when the checkpoint was written by fewer processes)."""
        self.step, self.tokens_seen = d["step"], d["tokens_seen"]
        self.skipped_steps, self.overflow_steps = d.get("skipped_steps", 0), d.get("overflow_steps", 0)
        self.elapsed_before_s = d.get("elapsed_s", 0.0)
        if d.get("clock") and self.clock is not None:  # the same schedule, from the time it had spent
            self.clock.load_state_dict(d["clock"])
        elif d.get("fitted_horizon"):  # a checkpoint of a schedule fitted to a budget in steps: kept
            self.horizon, self.clock = d["fitted_horizon"], None
        windows = d.get("log_windows", [])
        self.window.load_state_dict(windows[process_index] if process_index < len(windows) else {})
        self.started_at, self.stopped_at = time.perf_counter(), None
