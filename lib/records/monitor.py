"""Device monitoring that degrades gracefully: NVML when a driver exists, a plain answer otherwise;
peak memory from torch on a GPU, from the kernel on a CPU."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass
class MonitorConfig:
    """System metrics (CPU, memory; GPU utilization, memory, power, temperature through NVML) in the
    training records."""

    every: int = 1
    """Sample them on every this-many log lines (log_every steps apart); 0: never. A source this
    machine lacks (no psutil, no NVIDIA driver) is left out, with the reason in the start-up log."""


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


class SystemMonitor:
    """System figures for each logged step, from whatever this machine offers: CPU and memory
    through psutil; on a CUDA device, its utilization, memory, power and temperature through NVML.
    A source that is missing (no psutil, no NVIDIA driver) or fails once is dropped for the rest
    of the run, with the reason in describe(); sample() never raises. Per process: the main
    process samples its own machine and GPU."""

    def __init__(self, device):
        self.notes: list[str] = []
        self._process = None
        self._gpu_fields: dict = {}
        try:
            import psutil

            self._psutil = psutil
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call starts the interval the next one measures
            psutil.cpu_percent(None)
        except Exception as exc:  # noqa: BLE001 -- monitoring is optional
            self.notes.append(f"CPU and memory: unavailable ({type(exc).__name__})")
        if getattr(device, "type", str(device)) == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else 0
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # NVML counts every GPU, torch the visible ones
                if visible and visible.split(",")[index].strip().isdigit():
                    index = int(visible.split(",")[index])
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._gpu_fields = {
                    "gpu_utilization_percent": lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "gpu_memory_gib": lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**30,
                    "gpu_power_w": lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                    "gpu_temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)}
            except Exception as exc:  # noqa: BLE001 -- NVMLError_LibraryNotFound without a driver, ImportError
                self.notes.append(f"GPU: unavailable ({type(exc).__name__})")

    def describe(self) -> str:
        """What is sampled, and what is not and why: for the start-up log."""
        have = [what for what, ok in (("CPU and memory (psutil)", self._process is not None),
                                      ("GPU utilization, memory, power, temperature (NVML)", bool(self._gpu_fields)))
                if ok]
        return "; ".join([", ".join(have) or "none"] + self.notes)

    def sample(self) -> dict:
        """{name: value} for the sources still working: sys_cpu_percent (the machine, all cores
        averaged), sys_process_cpu_percent (this process, 100 per busy core), sys_memory_percent
        (the machine's RAM in use), sys_rss_gib (this process); gpu_utilization_percent,
        gpu_memory_gib (every process's, as nvidia-smi shows), gpu_power_w, gpu_temperature_c.
        CPU figures cover the time since the last sample; a field that fails is dropped alone."""
        out = {}
        if self._process is not None:
            try:
                out.update(sys_cpu_percent=self._psutil.cpu_percent(None),
                           sys_process_cpu_percent=self._process.cpu_percent(None),
                           sys_memory_percent=self._psutil.virtual_memory().percent,
                           sys_rss_gib=self._process.memory_info().rss / 2**30)
            except Exception as exc:  # noqa: BLE001
                self._process = None
                self.notes.append(f"CPU and memory: stopped ({type(exc).__name__})")
        for name, read in list(self._gpu_fields.items()):
            try:
                out[name] = float(read())
            except Exception as exc:  # noqa: BLE001 -- e.g. NVMLError_NotSupported for power on some boards
                del self._gpu_fields[name]
                self.notes.append(f"{name}: stopped ({type(exc).__name__})")
        return out
