"""GPU monitoring that degrades gracefully: NVML when a driver exists, a plain answer otherwise."""
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
