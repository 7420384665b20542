"""Progress bars that suit both a terminal and a log file."""
from __future__ import annotations

import os
import sys


def progress(iterable=None, **kwargs):
    """A tqdm bar. Into a terminal it redraws up to ten times a second; into a file or a pipe
    (a log, CI) at most once a minute, since every redraw there is a new line of log."""
    from tqdm import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    # TQDM_DISABLE=1 turns every bar off, even where the caller passes disable=False
    kwargs["disable"] = kwargs.get("disable") or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if tty else 60)
    if not tty:  # tqdm's monitor thread would otherwise force a redraw every 10 s
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
    return tqdm(iterable, **kwargs)


def write(bar, text: str) -> None:
    """Print a line of log above `bar`: through tqdm into a terminal (the bar is redrawn below
    it), plainly into a file, where a bar drawn after every line would double the log."""
    if bar.disable or sys.stderr.isatty():
        bar.write(text)
    else:
        print(text, flush=True)


def quiet_library_bars() -> None:
    """Into a file or a pipe, transformers' own bars (loading weights, writing shards) are turned
    off: each would add lines of carriage returns to the log for a step that takes a moment.
    Into a terminal they stay."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
