"""Shared fixtures: the repo root on sys.path, and a tiny tokenized dataset built once per session
by running scripts/tokenize.py as a real subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run_script(script: str | Path, *args: str, cwd: str | Path | None = None, check: bool = True,
               launcher: tuple[str, ...] = (), timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `<launcher> <script> args...`) as a subprocess, with
    `env` added to the environment."""
    script = Path(script)
    if not script.is_absolute():
        script = REPO / script
    cmd = [*(launcher or (sys.executable,)), str(script), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tokenized dataset of 80 stdlib files with a 512-piece vocabulary."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(out),
               "--corpus.max_files", "80", "--tokenizer.vocab_size", "512")
    return out


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """A tokenized dataset of 12 stdlib files (about 800 blocks of 64): epochs that end quickly."""
    out = tmp_path_factory.mktemp("data") / "micro"
    run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(out),
               "--corpus.max_files", "12", "--tokenizer.vocab_size", "512")
    return out
