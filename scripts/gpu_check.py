#!/usr/bin/env python
"""The GPU check: train configs/train/gpu_124m.yaml (a 116M Llama, bf16, torch.compile) for a few
hundred steps and report tokens/s and MFU against the GPU's dense bf16 peak (989 TFLOP/s on an
H100/H200); the target is at least 40%.

    python scripts/gpu_check.py                      # make gpu-check
    python scripts/gpu_check.py --steps 100
    python scripts/gpu_check.py --steps 60 --skip 20 --train_args="--model.size llama-1b --lora.r 16"

Builds data/stdlib first when it is missing. MFU is taken over the steps after --skip (compile and
warm-up), as the median of the logged windows.
"""
import os
import sys

_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

ROOT = Path(_root)


@dataclass
class GpuCheckConfig:
    """Throughput and MFU of a 116M model on one GPU."""

    preset: Path = Path("configs/train/gpu_124m.yaml")
    steps: int = 300
    skip: int = 50
    """Steps left out of the figures (compilation, warm-up)."""
    data_dir: Optional[Path] = None
    """Tokenized dataset; default: the preset's (data/stdlib is built when missing)."""
    runs_dir: Path = Path("runs")
    target_mfu: float = 0.40
    train_args: str = ""
    """More train.py flags, given with '=': --train_args="--model.size llama-1b --lora.r 16" (LoRA on
    a model of TinyLlama's shape); they come after the preset's and this script's own."""
    require_gpu: bool = True
    """Off: run on whatever device there is (to try the script itself on CPU with a small preset)."""


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(GpuCheckConfig, description=__doc__)
    import torch

    if cfg.require_gpu and not torch.cuda.is_available():
        raise UserError("no CUDA GPU visible: the GPU check needs one (--no_require_gpu runs it anyway)")
    if cfg.skip >= cfg.steps:
        raise UserError(f"--skip {cfg.skip} leaves none of --steps {cfg.steps} to measure")
    preset = config_lib.load_yaml(ROOT / cfg.preset)
    data_dir = cfg.data_dir or Path((preset.get("data") or {}).get("dir", "data/stdlib"))
    py = sys.executable
    if not ((data_dir if data_dir.is_absolute() else ROOT / data_dir) / "tokens" / "manifest.json").is_file():
        if data_dir != Path("data/stdlib"):
            raise UserError(f"{data_dir} holds no tokenized dataset: run scripts/tokenize.py for it first")
        print("[gpu-check] building data/stdlib (scripts/tokenize.py)", flush=True)
        if subprocess.run([py, str(ROOT / "scripts" / "tokenize.py"), "--config",
                           str(ROOT / "configs/tokenize/stdlib.yaml")], cwd=ROOT).returncode != 0:
            raise UserError("tokenizing the built-in corpus failed (output above)")
    name = preset.get("run_name", cfg.preset.stem)
    cmd = [py, str(ROOT / "scripts" / "train.py"), "--config", str(cfg.preset), "--max_steps", str(cfg.steps),
           "--data.dir", str(data_dir), "--runs_dir", str(cfg.runs_dir), "--run_name", name, "--overwrite",
           *shlex.split(cfg.train_args)]
    print("[gpu-check]", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise UserError("training failed (output above)")
    run = cfg.runs_dir if cfg.runs_dir.is_absolute() else ROOT / cfg.runs_dir
    rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "train" and r["step"] > cfg.skip]
    if not rows:
        raise UserError(f"no step after --skip {cfg.skip} was logged: raise --steps or lower --skip")
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"[gpu-check] {device}: {tps:,.0f} tokens/s over steps {rows[0]['step']}-{rows[-1]['step']} "
          f"(median of {len(rows)} logged windows); peak memory {rows[-1].get('peak_memory_gib', float('nan')):.2f} "
          f"GiB ({'GPU tensors' if torch.cuda.is_available() else 'process RSS'})")
    if not mfus:
        print("[gpu-check] MFU unknown: this device has no peak in lib/train/flops.py's table")
        return
    mfu = statistics.median(mfus)
    verdict = "met" if mfu >= cfg.target_mfu else "NOT met"
    print(f"[gpu-check] MFU {mfu:.1%} of the device's peak for the run's precision (the train log names it; "
          f"target >= {cfg.target_mfu:.0%}: {verdict})")


if __name__ == "__main__":
    main()
