"""System metrics that degrade gracefully: CPU/RAM via psutil, GPUs via NVML when a driver exists."""
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


def system_sample() -> dict:
    """Host CPU and memory use now: {'cpu_percent', 'ram_used_gb', 'rss_gb'}."""
    import psutil

    vm = psutil.virtual_memory()
    return {"cpu_percent": psutil.cpu_percent(interval=None), "ram_used_gb": (vm.total - vm.available) / 2**30,
            "rss_gb": psutil.Process().memory_info().rss / 2**30}
