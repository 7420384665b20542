#!/usr/bin/env python
"""The GPU check: train configs/train/gpu_124m.yaml (a 126M Llama, bf16, torch.compile) for a few
hundred steps and report tokens/s and MFU against the GPU's dense bf16 peak (989 TFLOP/s on an
H100/H200); the target is at least 40%.

    python scripts/gpu_check.py                      # make gpu-check
    python scripts/gpu_check.py --steps 100

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
import statistics  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

ROOT = Path(_root)


@dataclass
class GpuCheckConfig:
    """Throughput and MFU of a 126M model on one GPU."""

    preset: Path = Path("configs/train/gpu_124m.yaml")
    steps: int = 300
    skip: int = 50
    """Steps left out of the figures (compilation, warm-up)."""
    runs_dir: Path = Path("runs")
    target_mfu: float = 0.40


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(GpuCheckConfig, description=__doc__)
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU visible: the GPU check needs one")
    py = sys.executable
    if not (ROOT / "data" / "stdlib" / "tokens" / "manifest.json").is_file():
        subprocess.run([py, str(ROOT / "scripts" / "tokenize.py"), "--config", str(ROOT / "configs/tokenize/stdlib.yaml")],
                       check=True, cwd=ROOT)
    cmd = [py, str(ROOT / "scripts" / "train.py"), "--config", str(cfg.preset), "--max_steps", str(cfg.steps),
           "--runs_dir", str(cfg.runs_dir), "--overwrite"]
    print("[gpu-check]", " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise UserError("training failed (output above)")
    run = cfg.runs_dir / config_lib.load_yaml(cfg.preset).get("run_name", "gpu_124m")
    rows = [json.loads(x) for x in (ROOT / run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["type"] == "train" and r["step"] > cfg.skip]
    if not rows:
        raise UserError(f"no logged steps after --skip {cfg.skip}")
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] for r in rows if r.get("mfu") is not None) if any(r.get("mfu") for r in rows) else None
    name = torch.cuda.get_device_name(0)
    print(f"[gpu-check] {name}: {tps:,.0f} tokens/s over steps {rows[0]['step']}-{rows[-1]['step']} "
          f"(median of {len(rows)} windows)")
    if mfu is None:
        print("[gpu-check] MFU unknown: this GPU is not in lib/flops.py's table")
        return
    verdict = "met" if mfu >= cfg.target_mfu else "NOT met"
    print(f"[gpu-check] MFU {mfu:.1%} of the dense bf16 peak (target >= {cfg.target_mfu:.0%}: {verdict})")


if __name__ == "__main__":
    main()
