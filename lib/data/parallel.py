"""An ordered, memory-bounded map over worker processes, for streaming work such as encoding."""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from typing import Callable, Iterable, Iterator


def default_workers() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable, items: Iterable, workers: int, initializer: Callable | None = None,
                initargs: tuple = (), max_pending: int | None = None) -> Iterator:
    """Yield fn(item) for each item, in order, computed by `workers` processes.

    Unlike Pool.imap, which reads its whole input ahead, at most `max_pending` items (default
    2 per worker) are in flight, so a stream larger than memory flows through in constant memory.
    `fn` and `initializer` must be importable functions. With workers <= 1 everything runs here.
    An exception raised by `fn` is raised here, at its item.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    max_pending = max_pending or 2 * workers
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= max_pending:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
