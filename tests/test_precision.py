"""--precision auto and the device peak are decided by measurement, never by a CPU flag:
bf16 only where it measures clearly faster, MFU against the fastest peak, and figures measured
under load never cached."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env, train
from lib.train import flops, precision


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty figure cache, and a fake probe that records what it was asked to measure."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_CBWR", raising=False)
    calls, speed = [], {"fp32": 300e9, "bf16": 60e9, "fp16": 1e9, "other_cores": 0.0}

    def fake_probe(jobs, threads):
        calls.append([name for name, _, _ in jobs])
        return {"flops": {name: speed[dtype] for name, dtype, _ in jobs}, "other_cores": speed["other_cores"]}

    monkeypatch.setattr(flops, "_probe_in_subprocess", fake_probe)
    return calls, speed, tmp_path / "lm-repo" / "peak_flops.json"


def test_decide_cpu_takes_bf16_only_where_clearly_faster():
    assert precision.decide_cpu(fp32=100e9, bf16=300e9)[0] == "bf16"  # native bf16 (AMX, AVX512-BF16)
    assert precision.decide_cpu(fp32=327e9, bf16=62e9)[0] == "no"  # emulated bf16: 5x slower
    assert precision.decide_cpu(fp32=100e9, bf16=120e9)[0] == "no"  # a little faster is not enough
    mixed, why = precision.decide_cpu(fp32=327e9, bf16=62e9)
    assert "bf16 62 vs fp32 327 GFLOP/s" in why and "0.19x" in why


def test_auto_on_a_cpu_with_slow_bf16_picks_fp32_and_says_why(cache, monkeypatch):
    calls, speed, path = cache
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    shapes = precision.model_matmul_shapes(256, 704, 16384, 4096)
    choice = precision.resolve("auto", shapes)
    assert (choice.mixed_precision, choice.name) == ("no", "fp32")
    assert "bf16 60 vs fp32 300 GFLOP/s" in choice.reason and "measured now" in choice.reason
    assert calls == [["model_fp32", "model_bf16"]] and path.is_file()
    # the same machine again: read from the cache, nothing measured
    assert precision.resolve("auto", shapes).name == "fp32" and len(calls) == 1
    assert "cached" in precision.resolve("auto", shapes).reason
    # a CPU with native bf16 (another cache key: another machine's settings)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    speed["bf16"] = 900e9
    assert precision.resolve("auto", shapes).name == "bf16" and len(calls) == 2
    # what the user asks for is not second-guessed
    assert precision.resolve("fp32", shapes).mixed_precision == "no"
    assert precision.resolve("bf16", shapes).mixed_precision == "bf16" and len(calls) == 2


def test_auto_on_cuda_needs_no_measurement(cache, monkeypatch):
    calls, _, _ = cache
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: True)
    assert precision.resolve("auto", cuda=True).mixed_precision == "bf16"
    monkeypatch.setattr("torch.cuda.is_bf16_supported", lambda: False)
    assert precision.resolve("auto", cuda=True).mixed_precision == "fp16"
    assert calls == []


def test_figures_measured_under_load_are_measured_again_and_never_cached(cache, monkeypatch):
    calls, speed, path = cache
    speed["other_cores"] = 1.0  # another process kept a core busy during both readings
    figures, how = flops.cpu_throughput({"x": ("fp32", [[64, 64, 64]])})
    assert figures == {"x": 300e9} and "measured twice" in how and "not cached" in how and "1.0 core" in how
    assert not path.exists() and len(calls) == 2
    speed["other_cores"] = 0.0
    assert flops.cpu_throughput({"x": ("fp32", [[64, 64, 64]])})[1] == "measured now" and len(calls) == 3
    assert flops.cpu_throughput({"x": ("fp32", [[64, 64, 64]])})[1] == "cached" and len(calls) == 3
    # two loaded readings decide together: the faster of the two for each figure, marked in `how`
    readings = iter([{"fp32": 90e9, "bf16": 250e9}, {"fp32": 160e9, "bf16": 40e9}])

    def loaded_probe(jobs, threads):
        reading = next(readings)
        return {"flops": {name: reading[dtype] for name, dtype, _ in jobs}, "other_cores": 1.5}

    monkeypatch.setattr(flops, "_probe_in_subprocess", loaded_probe)
    both, how = flops.cpu_throughput({"a": ("fp32", [[8, 8, 8]]), "b": ("bf16", [[8, 8, 8]])})
    assert both == {"a": 160e9, "b": 250e9} and "under load" in how and "faster of both readings" in how


def test_device_peak_is_the_fastest_dtype_named(cache):
    import torch

    _, speed, _ = cache
    peak, dtype, source = flops.device_peak(torch.device("cpu"))
    assert (peak, dtype) == (300e9, "fp32") and source.startswith("fp32 matmul peak")  # emulated bf16 is slower
    speed["bf16"] = 900e9
    assert flops.device_peak(torch.device("cpu"), refresh=True)[:2] == (900e9, "bf16")
    assert flops.gpu_peak("NVIDIA H200", "bf16") == 989e12
    assert flops.gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12  # not the SXM figure
    assert flops.gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 units
    assert flops.gpu_peak("Some Future GPU", "bf16") is None


def test_the_probe_sees_another_process_using_the_cpu():
    """probe_worker's load figure is real: a busy loop in another process shows up as about one
    core of other use, which is over the threshold that keeps figures out of the cache."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)  # let it start
        res = flops.probe_worker([["x", "fp32", [[256, 256, 256]]]], rounds=2, seconds=0.4)
    finally:
        hog.kill()
        hog.wait()
    assert res["flops"]["x"] > 1e8
    assert res["other_cores"] > flops.LOADED_CORES, res


def test_auto_without_native_bf16_picks_fp32_for_real(tmp_path):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE keeps oneDNN off bf16 and AMX instructions, as on a CPU
    that only emulates bf16: the real measurement must then choose fp32."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); torch.set_num_threads(1); "
            "from lib.train.precision import resolve, model_matmul_shapes; "
            "c = resolve('auto', model_matmul_shapes(256, 704, 4096, 1024), cuda=False); print(c.name); print(c.reason)")
    env = subprocess_env({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "XDG_CACHE_HOME": str(tmp_path)})
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, check=True,
                         env=env).stdout.splitlines()
    assert out[0] == "fp32", out
    assert "not clearly faster" in out[1]
    if "not cached" not in out[1]:  # (measured while the machine was busy: rightly not cached)
        cached = json.loads((tmp_path / "lm-repo" / "peak_flops.json").read_text())
        assert all("ONEDNN_MAX_CPU_ISA=AVX512_CORE" in k for k in cached) and len(cached) == 2


def test_mfu_above_100_percent_makes_the_run_measure_the_peak_again(tiny_data, tmp_path):
    """A peak cached under load (far too low) gives MFU above 100% at the first log line: the run
    measures again and logs against the new figure."""
    # keyed as the run (in this process, with its environment) will look them up
    stale = {flops._key(f"{d}:{d}:{[list(flops.PEAK_SHAPE)]}", 1): 1e6 for d in ("fp32", "bf16")}
    (tmp_path / "lm-repo").mkdir()
    (tmp_path / "lm-repo" / "peak_flops.json").write_text(json.dumps(stale))
    proc = train(tiny_data, tmp_path, "smoke", "--max_steps", "30", "--log_every", "10", "--threads", "1",
                 "--precision", "fp32", "--eval_every", "0", "--checkpoint_every", "0",
                 env={"XDG_CACHE_HOME": str(tmp_path)})
    assert "MFU against 0.00 TFLOP/s" in proc.stdout  # the stale figure, read from the cache
    assert "cannot be: measured the peak again" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "smoke" / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in rows if r["type"] == "train"]
    assert len(mfu) == 3 and all(0 < m < 1 for m in mfu), mfu
    cache = json.loads((tmp_path / "lm-repo" / "peak_flops.json").read_text())
    assert max(cache.values()) > 1e9 or "not cached" in proc.stdout
