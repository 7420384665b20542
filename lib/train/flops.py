"""The device's matmul throughput: the peak for model FLOP utilization (MFU), and the figures
`lib.train.precision` chooses a CPU's training precision from.

GPUs: dense (no sparsity) tensor-core peaks from the vendors' data sheets, by device name.
CPUs: no table can know a machine's cores, clocks and vector units (nor whether its bf16 is
native or emulated), so throughput is measured in a child process, on the threads training uses,
and cached per CPU model, thread count, kernel settings and torch version. A measurement taken
while other processes kept the CPU busy is used for the run that made it but never cached: a
peak measured under load is too low, and cached it made later runs report MFU above 100%.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from lib.files import write_json

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

PEAK_SHAPE = (2048, 2048, 2048)  # large enough for any CPU's best kernel
# Other processes' CPU use during a probe, in cores (averaged over the probe), above which the
# figures are measured again and never cached: background daemons stay far below it, one busy
# process is ~1.
LOADED_CORES = 0.25
# Readings no CPU gives, taken for a disturbed probe (seen under load: fp32 0 and 1 GFLOP/s, bf16
# 87x fp32): fp32 below this rate (one core of any x86-64 or Arm server CPU does tens of GFLOP/s on
# these shapes), and bf16 beyond this multiple of fp32 (AMX's bf16 peak per cycle is 16x AVX-512's
# fp32 one; emulated bf16 is slower than fp32, down to hundreds of times, so no lower bound)
MIN_FP32_FLOPS = 5e9
MAX_BF16_OVER_FP32 = 16.0


class ProbeFailed(RuntimeError):
    """The throughput probe gave no figure to trust: its process failed (the message carries the
    child's own error), or it read implausible figures twice."""


def gpu_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of a GPU by its name, or None when unknown."""
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment.lower() in name.lower():
            value = peaks.get(dtype)
            return value * 1e12 if value else None
    return None


def cache_dir() -> Path:
    """This project's cache folder for what it measures about the machine (XDG_CACHE_HOME honoured)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lm-repo"


def _cache_file() -> Path:
    return cache_dir() / "peak_flops.json"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmuls(dtype: str, shapes=(PEAK_SHAPE,), seconds: float = 1.5) -> float:
    """Best FLOP/s of one pass over `shapes` ((m, k, n) products) in `dtype` on the CPU, over
    about `seconds` in all. Uses its own random generator (training's random state is untouched)."""
    import torch

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)

    def operands(dims):
        return [(torch.randn(m, k, generator=g).to(torch_dtype), torch.randn(k, n, generator=g).to(torch_dtype))
                for m, k, n in dims]

    def one_pass(pairs) -> float:  # seconds
        t = time.perf_counter()
        for a, b in pairs:
            a @ b
        return time.perf_counter() - t

    # a kernel so slow that one pass would outlast the budget many times over cannot be the
    # fastest (bf16 on a CPU without native bf16, under the MKL_CBWR=AUTO,STRICT that
    # --deterministic sets, is hundreds of times slower than fp32): one warm pass at a quarter of
    # each dimension then stands for it
    small = [(max(1, m // 4), max(1, k // 4), max(1, n // 4)) for m, k, n in shapes]
    if small != [tuple(x) for x in shapes]:
        pairs = operands(small)
        one_pass(pairs)  # warm up
        took = one_pass(pairs)
        if took * 64 > 10 * seconds:
            return sum(2 * m * k * n for m, k, n in small) / max(took, 1e-9)
    pairs = operands(shapes)
    flops = sum(2 * m * k * n for m, k, n in shapes)
    one_pass(pairs)  # warm up kernels and caches
    best, end = 0.0, time.perf_counter() + seconds
    while True:
        best = max(best, flops / one_pass(pairs))
        if time.perf_counter() >= end:
            return best


def measure_matmul_peak(dtype: str, size: int = PEAK_SHAPE[0], seconds: float = 1.5) -> float:
    """Best FLOP/s of size x size matmuls in `dtype` on the CPU over about `seconds`."""
    return measure_matmuls(dtype, ((size, size, size),), seconds)


def _busy_cpu_seconds() -> float:
    """CPU seconds spent by everything on this machine so far (steal included: a busy host)."""
    import psutil

    t = psutil.cpu_times()
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


def probe_worker(jobs: list[list], rounds: int = 3, seconds: float = 0.5) -> dict:
    """In the probe's own process: measure every (name, dtype, shapes) job, interleaved over
    `rounds` (a machine whose speed drifts affects every dtype alike), best of each. Also returns
    `other_cores`: the CPU the rest of the machine used meanwhile, in cores."""
    import psutil

    me = psutil.Process()
    busy0, own0, t0 = _busy_cpu_seconds(), sum(me.cpu_times()[:2]), time.perf_counter()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, dtype, shapes in jobs:
            flops = measure_matmuls(dtype, [tuple(s) for s in shapes], seconds)
            best[name] = max(best.get(name, 0.0), flops)
    wall = time.perf_counter() - t0
    others = (_busy_cpu_seconds() - busy0) - (sum(me.cpu_times()[:2]) - own0)
    return {"flops": best, "other_cores": max(others, 0.0) / max(wall, 1e-9)}


def _probe_in_subprocess(jobs: list[list], threads: int) -> dict:
    """probe_worker in a child process. Not in this one: the first large bf16 matmul can switch
    the process to other CPU kernels (AMX), so a run that probed would compute slightly different
    numbers from one that read the cache, and runs would not reproduce bit for bit. A child that
    fails raises ProbeFailed with the last line of its own error output."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    code = ("import sys, json, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(int(sys.argv[2])); "
            "from lib.train.flops import probe_worker; print(json.dumps(probe_worker(json.loads(sys.argv[3]))))")
    try:
        out = subprocess.run([sys.executable, "-c", code, root, str(threads), json.dumps(jobs)], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.CalledProcessError as exc:
        said = [x for x in (exc.stderr or "").strip().splitlines() if x.strip()]
        raise ProbeFailed(f"the probe's process exited {exc.returncode}: {said[-1] if said else 'no message'}") from None
    except (OSError, ValueError, IndexError) as exc:  # could not start, or printed no figures
        raise ProbeFailed(f"the probe's process gave no figures ({type(exc).__name__}: {exc})") from None


def implausible(figures: dict[str, float], dtypes: dict[str, str]) -> str | None:
    """Why a set of readings {name: FLOP/s} of `dtypes` {name: dtype} cannot be a quiet CPU's (a
    zero, fp32 below MIN_FP32_FLOPS, bf16 beyond MAX_BF16_OVER_FP32 times fp32), or None."""
    for name, value in figures.items():
        if not value > 0 or (dtypes[name] == "fp32" and value < MIN_FP32_FLOPS):
            return f"{name} {value / 1e9:,.1f} GFLOP/s"
    fp32 = [v for n, v in figures.items() if dtypes[n] == "fp32"]
    bf16 = [v for n, v in figures.items() if dtypes[n] == "bf16"]
    if fp32 and bf16 and max(bf16) > MAX_BF16_OVER_FP32 * min(fp32):
        return f"bf16 {max(bf16) / min(fp32):,.0f}x fp32"
    return None


def _key(name: str, threads: int) -> str:
    import torch

    kernels = ",".join(f"{v}={os.environ.get(v, '-')}" for v in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR"))
    return f"{cpu_model()}|threads={threads}|{name}|torch={torch.__version__}|{kernels}"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(updates: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_read_cache(), **updates}
        write_json(path, cache)
    except OSError:
        pass  # a read-only home: measure again next time


def cpu_throughput(jobs: dict[str, tuple[str, list]], refresh: bool = False) -> tuple[dict[str, float], str]:
    """Measured FLOP/s of each job {name: (dtype, [(m, k, n), ...])} on torch's current thread
    count, and where the figures came from ('cached', 'measured now', or what was wrong first).

    The cache key holds the kernel settings a run may restrict (--deterministic keeps oneDNN off
    AMX, where fp16 matmuls can run hundreds of times slower): a figure measured under them must not stand
    for runs without them, nor the other way round. A reading taken while other processes kept
    the CPU busy, or one no CPU gives (`implausible`), is measured once more; figures are cached
    only when quiet and plausible. Raises ProbeFailed when the probe's process fails or both
    readings are implausible."""
    import torch

    threads = torch.get_num_threads()
    keys = {name: _key(f"{name}:{dtype}:{shapes}", threads) for name, (dtype, shapes) in jobs.items()}
    dtypes = {name: dtype for name, (dtype, _) in jobs.items()}
    cache = {} if refresh else _read_cache()
    found = {name: float(cache[k]) for name, k in keys.items() if k in cache}
    missing = [[name, dtype, shapes] for name, (dtype, shapes) in jobs.items() if name not in found]
    if not missing:
        return found, "cached"
    notes = []  # what was wrong with each reading that was not taken
    first = None  # the first reading, where it was plausible but taken under load
    for attempt in (1, 2):
        res = _probe_in_subprocess(missing, threads)
        figures = {**found, **res["flops"]}
        wrong = implausible(figures, dtypes)
        loaded = res["other_cores"] > LOADED_CORES
        if not wrong and not loaded:
            _write_cache({keys[name]: res["flops"][name] for name, _, _ in missing})
            return figures, "measured now" + (f", again: the first reading was {notes[0]}" if notes else "")
        if attempt == 2 and not wrong:  # under load, yet figures a CPU can give: never one reading alone
            if first is not None:  # load only slows a reading down: the faster of the two, per figure
                figures = {name: max(value, first.get(name, 0.0)) for name, value in figures.items()}
            return figures, (f"measured twice under load (the first reading {notes[0]}, the second taken while "
                             f"other processes used {res['other_cores']:.1f} core(s)), "
                             + ("the faster of both readings of each figure" if first is not None else
                                "the second reading") + ": used for this run, not cached")
        if not wrong:
            first = figures
        notes.append(f"implausible ({wrong})" if wrong else
                     f"taken while other processes used {res['other_cores']:.1f} core(s)")
    raise ProbeFailed(f"both readings were unusable: {notes[0]}, then {notes[1]}")


def cpu_peak(dtype: str, refresh: bool = False) -> float:
    """The CPU's measured matmul peak in `dtype` on torch's current thread count (cached)."""
    return cpu_throughput({f"peak_{dtype}": (dtype, [list(PEAK_SHAPE)])}, refresh)[0][f"peak_{dtype}"]


def device_peak(device, dtypes: tuple[str, ...] = ("fp32", "bf16"), refresh: bool = False
                ) -> tuple[float | None, str, str]:
    """(peak FLOP/s, its dtype, where it came from): the device's fastest dense matmul peak over
    `dtypes`, so that MFU is measured against what the hardware can do at best, whichever
    precision the run chose (an emulated bf16 cannot make a slow run look efficient). fp16 is
    left out of a CPU's probe: where it is not emulated it is no faster than bf16, and where it is,
    one probe of it took minutes."""
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peaks = {d: gpu_peak(name, d) for d in dtypes}
        peaks = {d: p for d, p in peaks.items() if p}
        if not peaks:
            return None, "", f"{name}: not in the table"
        dtype = max(peaks, key=peaks.get)
        return peaks[dtype], dtype, f"{name} data sheet, dense {dtype}"
    if device.type == "cpu":
        try:
            figures, how = cpu_throughput({d: (d, [list(PEAK_SHAPE)]) for d in dtypes}, refresh)
        except ProbeFailed as exc:
            return None, "", f"no MFU: the CPU's matmul peak is unknown ({exc})"
        dtype = max(figures, key=figures.get)
        return figures[dtype], dtype, (f"{dtype} matmul peak of this CPU ({torch.get_num_threads()} threads), "
                                       f"{how}")
    return None, "", f"no peak known for {device.type}"


class MfuMeter:
    """Model FLOP utilization of a training job, against the device's fastest dense peak.

    Probed on the main process only (one probe per machine, not one per rank; other processes'
    meters return None). A figure above 100% means the peak was measured wrong (under load, or a
    stale cache): it is then probed once more, and the new figure used."""

    def __init__(self, device, flops_per_token: float, world_size: int, enabled: bool, say=print):
        self.device, self.flops_per_token, self.world, self.say = device, flops_per_token, world_size, say
        self.peak, self.reprobed = None, False
        if enabled:
            self.peak, _, source = device_peak(device)
            say(f"MFU against {self.peak / 1e12:.2f} TFLOP/s, the {source}" if self.peak else f"MFU: {source}")

    def __call__(self, tokens_per_s: float) -> float | None:
        """MFU of a job running at `tokens_per_s` in all (each process has a device like this one)."""
        if not self.peak:
            return None
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        if mfu > 1 and not self.reprobed:
            self.reprobed, old = True, self.peak
            self.peak, _, source = device_peak(self.device, refresh=True)
            self.say(f"MFU {mfu:.0%} against {old / 1e12:.3f} TFLOP/s cannot be: measured the peak again: "
                     f"{self.peak / 1e12:.2f} TFLOP/s, the {source}")
            mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        return mfu
