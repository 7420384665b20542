"""A micro-batch that fits in memory, chosen before training starts.

The optimizer step stays what the config says: each halving of the micro-batch doubles the
accumulation steps, so sequences per optimizer step (and with token weighting, the gradient) do
not change. On CUDA a trial forward+backward at the configured size is run and halved on
out-of-memory. On CPU nothing can be tried safely (the kernel kills the process), so the memory
of trial steps at 1 and 2 sequences is measured and the configured size extrapolated from them.
"""
from __future__ import annotations

import resource
from typing import Callable


def _reset_peak() -> None:
    """Reset this process's peak resident memory (Linux: "5" to /proc/self/clear_refs), so that
    a trial's peak is not hidden by an earlier, higher one (importing torch, say). Elsewhere
    nothing happens, and only a rise above the earlier peak shows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """This process's peak resident memory in bytes since the last `_reset_peak` (VmHWM;
    getrusage's lifetime peak where /proc is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _trial_growth(trial: Callable[[int], None], n: int) -> int:
    """How far above the memory held before it the peak rose during `trial(n)`, in bytes."""
    _reset_peak()
    before = _peak_rss()  # right after a reset, the current resident size
    trial(n)
    return max(_peak_rss() - before, 0)


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def fit_micro_batch(trial: Callable[[int], None], micro_batch: int, accum: int, device,
                    headroom: float = 0.8, say=print) -> tuple[int, int]:
    """(micro_batch, accum) with micro_batch * accum unchanged and one step of `trial(n)` (a
    forward and backward on n sequences, gradients discarded) fitting in memory."""
    import torch

    total = micro_batch * accum
    if device.type == "cuda":
        while True:
            try:
                trial(micro_batch)
                torch.cuda.synchronize(device)
                return micro_batch, total // micro_batch
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if micro_batch == 1 or micro_batch % 2:
                    raise
                say(f"micro_batch_size {micro_batch} runs out of GPU memory; trying {micro_batch // 2}")
                micro_batch //= 2
    # CPU: extrapolate the peak from trial steps at 1 and 2 sequences
    one = _trial_growth(trial, 1)
    two = _trial_growth(trial, 2)
    per_sequence = max(two - one, two / 2, one / 2, 1)
    budget = headroom * available_memory()
    while micro_batch > 1 and micro_batch % 2 == 0 and (micro_batch - 2) * per_sequence > budget:
        say(f"micro_batch_size {micro_batch} would need about {micro_batch * per_sequence / 2**30:.1f} GiB more "
            f"(free: {available_memory() / 2**30:.1f} GiB); using {micro_batch // 2}")
        micro_batch //= 2
    return micro_batch, total // micro_batch
