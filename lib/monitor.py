"""Device monitoring that degrades gracefully: NVML when a driver exists, a plain answer otherwise;
peak memory from torch on a GPU, from the kernel on a CPU."""
from __future__ import annotations


def gpu_status() -> str:
    """A one-line description of NVML availability; never raises."""
    try:
        import pynvml
    except ImportError:
        return "pynvml not installed"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # NVMLError_LibraryNotFound without a driver
        return f"unavailable ({exc.__class__.__name__})"
    try:
        n = pynvml.nvmlDeviceGetCount()
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(n)]
        return f"{n} GPU(s): {', '.join(str(x) for x in names)}"
    finally:
        pynvml.nvmlShutdown()


def peak_memory_gib(device) -> tuple[float, str]:
    """(the peak memory of this process so far in GiB, what was measured): tensors allocated on a
    CUDA `device` (torch's counter, reset only by torch), else the process's peak resident set
    (getrusage), which on a CPU holds the weights, activations and the Python heap alike."""
    import resource
    import sys

    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "GPU tensors"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20), "process RSS"
