"""The device's peak FLOP/s, for model FLOP utilization (MFU) = achieved model FLOP/s / peak.

GPUs: dense (no sparsity) tensor-core peaks from the vendors' data sheets, by device name.
CPUs: no table can know a machine's cores, clocks and vector units, so the peak is measured:
the best of several large matmuls in the training dtype, on the threads training uses. The figure
is cached per CPU model, thread count, dtype and torch version (a probe takes a few seconds).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

# name fragment -> {dtype: dense TFLOP/s}; first match wins, so longer names come first
GPU_PEAK_TFLOPS = [
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.0, "fp16": 165.0, "fp32": 82.6}),
    ("RTX 3090", {"bf16": 71.0, "fp16": 71.0, "fp32": 35.6}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("T4", {"fp16": 65.0, "fp32": 8.1}),
]


def gpu_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a GPU by its name, or None when unknown."""
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            value = peaks.get(dtype)
            return value * 1e12 if value else None
    return None


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "lm-repo" / "peak_flops.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_peak(dtype: str, size: int = 2048, seconds: float = 1.5) -> float:
    """Best FLOP/s of size x size matmuls in `dtype` on the CPU over about `seconds`."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)  # its own generator: training's random state is untouched
    a = torch.randn(size, size, generator=g).to(torch_dtype)
    b = torch.randn(size, size, generator=g).to(torch_dtype)
    a @ b  # warm up kernels and caches
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def _probe_in_subprocess(dtype: str, threads: int) -> float:
    """measure_matmul_peak in a child process. Not in this one: the first large bf16 matmul can
    switch the process to other CPU kernels (AMX), so a run that probed would compute slightly
    different numbers from one that read the cache, and runs would not reproduce bit for bit."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[2])); "
            "from lib.flops import measure_matmul_peak; print(measure_matmul_peak(sys.argv[3]))")
    out = subprocess.run([sys.executable, "-c", code, root, str(threads), dtype], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cpu_peak(dtype: str, refresh: bool = False) -> float:
    """The CPU's measured matmul peak in `dtype` on torch's current thread count (cached).

    The cache key holds the kernel settings a run may restrict (--deterministic keeps oneDNN off
    AMX, where fp16 matmuls ran 300x slower here): a peak measured under them must not stand
    for runs without them, nor the other way round."""
    import torch

    kernels = ",".join(f"{v}={os.environ.get(v, '-')}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR"))
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|{dtype}|torch={torch.__version__}|{kernels}"
    path = _cache_file()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if key in cache and not refresh:
        return float(cache[key])
    peak = _probe_in_subprocess(dtype, torch.get_num_threads())
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: measure again next time
    return peak


def device_peak(device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for a torch device and 'bf16' | 'fp16' | 'fp32'."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, dtype)
        return peak, (f"{name} data sheet, dense {dtype}" if peak else f"{name}: not in the table")
    if device.type == "cpu":
        return cpu_peak(dtype), f"measured {dtype} matmul peak of this CPU ({torch.get_num_threads()} threads)"
    return None, f"no peak known for {device.type}"
