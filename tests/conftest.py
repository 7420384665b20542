"""Shared fixtures: the repo root on sys.path, and a tiny tokenized dataset built once per session
by running scripts/tokenize.py as a real subprocess."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    """A TCP port nothing listens on now (test processes may run side by side: no fixed ports)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FREE_PORT = "{free port}"  # in a launcher: replaced by a port free at the moment of the launch


def accelerate_launch(config: str) -> tuple[str, ...]:
    """`accelerate launch` with configs/accelerate/<config>.yaml, its rendezvous on a port that is
    free when it starts (not the config's fixed one: test processes may run side by side)."""
    return (str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
            str(REPO / "configs" / "accelerate" / f"{config}.yaml"), "--main_process_port", FREE_PORT)


def run_script(script: str | Path, *args: str, cwd: str | Path | None = None, check: bool = True,
               launcher: tuple[str, ...] = (), timeout: float = 600,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `<launcher> <script> args...`) as a subprocess, with
    `env` added to the environment."""
    script = Path(script)
    if not script.is_absolute():
        script = REPO / script
    cmd = [*(str(free_port()) if a == FREE_PORT else a for a in launcher or (sys.executable,)), str(script), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def train_command(data: str | Path, runs: str | Path, name: str, *args: str,
                  launcher: tuple[str, ...] = ()) -> list[str]:
    """The command line of a smoke-preset training run `runs/name` on `data`, `args` after the
    preset's (a later flag wins). For a process the test drives itself (kill tests)."""
    launcher = tuple(str(free_port()) if a == FREE_PORT else a for a in launcher)
    return [*(launcher or (sys.executable,)), str(REPO / "scripts" / "train.py"), "--config",
            str(REPO / "configs" / "train" / "smoke.yaml"), "--data.dir", str(data), "--runs_dir", str(runs),
            "--run_name", name, *args]


def train(data: str | Path, runs: str | Path, name: str, *args: str, launcher: tuple[str, ...] = (),
          check: bool = True, env: dict[str, str] | None = None, cwd: str | Path | None = None,
          timeout: float = 600) -> subprocess.CompletedProcess:
    """Run scripts/train.py with the smoke preset as `runs/name` on `data` (as train_command),
    through `launcher` (e.g. accelerate_launch("cpu_ddp")); every test launches training this way."""
    return run_script("scripts/train.py", "--config", str(REPO / "configs" / "train" / "smoke.yaml"),
                      "--data.dir", str(data), "--runs_dir", str(runs), "--run_name", name, *args,
                      launcher=launcher, check=check, env=env, cwd=cwd, timeout=timeout)


# what every bitwise resume test trains with: dropout on (the restored random state matters), fp32
# and --deterministic (identical processes compute identical bits), a small held-out sample
BITWISE = ("--model.dropout", "0.1", "--eval_tokens", "2000", "--precision", "fp32", "--deterministic")


def tokenized(tmp_path_factory, name: str, files: int) -> Path:
    """The first `files` stdlib files tokenized with a 512-piece vocabulary."""
    out = tmp_path_factory.mktemp("data") / name
    run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--out_dir", str(out),
               "--corpus.max_files", str(files), "--tokenizer.vocab_size", "512")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """80 stdlib files, about 11k blocks of 64."""
    return tokenized(tmp_path_factory, "tiny", 80)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """12 stdlib files, about 800 blocks of 64: epochs that end quickly."""
    return tokenized(tmp_path_factory, "micro", 12)
