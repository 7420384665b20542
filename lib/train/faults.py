"""Faults the test suite injects into a training run, read from the environment here and nowhere
else, so that they stay out of the run's options, --help and config.yaml:

    LM_TEST_STALL=RANK:STEP:SECONDS   that process sleeps in optimizer step STEP (1-based)
    LM_TEST_NAN_STEP=STEP             the main process's loss is NaN in optimizer step STEP

Unset (always, outside tests), they cost one comparison per micro-batch.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from lib.errors import UserError


@dataclass
class Faults:
    stall: Optional[tuple[int, int, float]] = None
    nan_step: Optional[int] = None

    @classmethod
    def from_env(cls) -> "Faults":
        stall, nan = os.environ.get("LM_TEST_STALL"), os.environ.get("LM_TEST_NAN_STEP")
        try:
            parts = stall.split(":") if stall else None
            return cls(stall=(int(parts[0]), int(parts[1]), float(parts[2])) if parts else None,
                       nan_step=int(nan) if nan else None)
        except (ValueError, IndexError):
            raise UserError(f"LM_TEST_STALL={stall!r} / LM_TEST_NAN_STEP={nan!r}: expected RANK:STEP:SECONDS and "
                            "STEP (test aids; unset them)") from None

    def on_loss(self, loss, step: int, rank: int):
        """The micro-batch loss of optimizer step `step` (1-based) on process `rank`, after the
        faults asked for: a stall (once), a NaN on the main process."""
        if self.stall is not None and self.stall[:2] == (rank, step):
            time.sleep(self.stall[2])
            self.stall = None
        if self.nan_step == step and rank == 0:
            return loss * float("nan")
        return loss
