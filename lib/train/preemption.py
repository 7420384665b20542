"""SIGTERM and Ctrl-C as requests to stop cleanly: finish the optimizer step, checkpoint, exit.

A scheduler sends SIGTERM before it preempts a job; a person presses Ctrl-C (SIGINT). Python's
defaults end the process at once (SIGTERM) or raise KeyboardInterrupt wherever the code is (a
traceback, and everything since the last checkpoint lost). While a StopRequests is installed,
the first such signal is only noted; the training loop asks `agreed()` after each optimizer step,
and every process of the job (any one of them may have been signalled, or all: `accelerate
launch` forwards a signal to every worker) stops after the same step, writes a checkpoint and
exits with EXIT_STOPPED. A second signal stops the process at once, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import sys

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, checkpoint written; `--resume auto` continues

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Installs handlers for SIGTERM and SIGINT on construction (restore() puts the previous ones
    back). `requested` / `name`: whether (and which) signal arrived in this process."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the second one: stop now
            print(f"{name} again: stopping now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"{name}: stopping after this optimizer step, with a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def agreed(self, accelerator) -> str | None:
        """The signal's name when any process of the job got one, on every process (None when none
        did). Every process must call this at the same point: it is one all-reduce."""
        if accelerator.num_processes == 1:
            return self.name
        import torch

        got = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        first = int(accelerator.reduce(got, reduction="max").item())  # any process's signal
        return signal.Signals(first).name if first else None

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
