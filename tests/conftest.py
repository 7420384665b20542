"""Shared fixtures: the repo root on sys.path, a tiny tokenized dataset built once per session by
running scripts/tokenize.py as a real subprocess, and the helpers every test runs scripts with.

train.py, eval.py and audit.py run inside the test process unless a test needs a process of
their own (a launcher, a signal, an environment read when torch starts; every script still runs
as a real subprocess in some test, since only that shows import-path bugs): a fresh interpreter
costs about six seconds of imports (torch, transformers, matplotlib), more than most runs."""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lib.train import runtime  # noqa: E402 -- only os: torch is not imported yet

# what every run in this process sees, set before anything imports huggingface_hub (which reads
# HF_HUB_OFFLINE once, when imported)
RUN_ENV = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
os.environ.update(RUN_ENV)
# and what `--deterministic` sets before torch starts, here before this process imports torch, so
# that a bitwise run in this process computes the same bits as one in a subprocess; subprocesses
# get the environment as it was
_before = set(os.environ)
runtime.prepare_environment(deterministic=True)
_SET_HERE = set(os.environ) - _before


def subprocess_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a subprocess a test starts: this one's as it was before the tests
    changed it, with RUN_ENV and `env`."""
    return {**{k: v for k, v in os.environ.items() if k not in _SET_HERE}, **RUN_ENV, **(env or {})}


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


# scripts whose main() may run inside the test process, and environment variables that only a
# fresh process reads right (torch, oneDNN, MKL and OpenMP read theirs once, when they start)
IN_PROCESS = {REPO / "scripts" / name for name in ("train.py", "eval.py", "audit.py")}
STARTUP_ENV = ("ONEDNN_", "MKL_", "OMP_", "KMP_", "CUDA", "ACCELERATE_", "PYTHON", "LD_", "MALLOC_")
_modules: dict[Path, object] = {}


def _script_module(script: Path):
    """The script loaded once as a module (its main() is called for every run)."""
    if script not in _modules:
        spec = importlib.util.spec_from_file_location(f"_script_{script.stem}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # where inspect (and so tyro, for --help texts) looks a class up
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


class RunTimedOut(BaseException):
    """Raised inside a run in this process that outlives its timeout: a BaseException, so that a
    script's own `except Exception` cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Interrupt the main thread with RunTimedOut after `seconds` (a hung run fails its test, as
    subprocess.run's timeout does, instead of holding CI until its own limit). Should the run be
    stuck where no Python code runs, every thread's stack is written to stderr and the process
    exits a minute later."""
    def expire(signum, frame):
        raise RunTimedOut(f"ran past its timeout of {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


def run_in_process(script: Path, args, cwd, env, timeout: float) -> subprocess.CompletedProcess:
    """`python script args...` as main() in this process: stdout and stderr captured, the exit code
    that `sys.exit` gave (1 and the traceback for an exception, as Python does), and what a run
    changes in the process (environment, working folder, threads, deterministic algorithms,
    Accelerate's state, warning filters, compiled graphs, plugins' registrations) put back afterwards. A run that outlives
    `timeout` seconds raises subprocess.TimeoutExpired, as a subprocess would."""
    import torch
    from accelerate.state import AcceleratorState

    from lib import plugins

    module = _script_module(script)
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    out, err = io.StringIO(), io.StringIO()
    code, timed_out = 0, False
    try:
        os.environ.update(env)
        os.chdir(cwd)
        sys.argv = [str(script), *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(), \
                plugins.forgetting():  # what the run's plugins register is gone afterwards
            try:
                with deadline(timeout):
                    module.main()
            except SystemExit as exc:
                if isinstance(exc.code, str):
                    print(exc.code, file=sys.stderr)
                code = 1 if isinstance(exc.code, str) else exc.code or 0
            except RunTimedOut:
                traceback.print_exc()
                timed_out = True
            except Exception:  # noqa: BLE001 -- an uncaught exception: what Python would print, exit 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        AcceleratorState._reset_state(reset_partial_state=True)
        torch._dynamo.reset()
        gc.collect()
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, str(script), *args], timeout, out.getvalue(), err.getvalue())
    return subprocess.CompletedProcess([sys.executable, str(script), *args], code, out.getvalue(), err.getvalue())


def run_script(script: str | Path, *args: str, cwd: str | Path | None = None, check: bool = True,
               launcher: tuple[str, ...] = (), timeout: float = 600, env: dict[str, str] | None = None,
               fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run `python <script> args...` (or `<launcher> <script> args...`), with `env` added to the
    environment: train.py, eval.py and audit.py without a launcher in this process (see run_in_process),
    unless `fresh_process` or `env` holds a variable read at start-up; everything else as a
    subprocess. `check`: fail the test, showing both outputs, unless it exits 0. A run that
    outlives `timeout` seconds raises subprocess.TimeoutExpired, in this process or not."""
    script = Path(script)
    if not script.is_absolute():
        script = REPO / script
    cmd = [*(str(free_port()) if a == FREE_PORT else a for a in launcher or (sys.executable,)), str(script), *args]
    if (script in IN_PROCESS and not launcher and not fresh_process
            and not any(k.startswith(STARTUP_ENV) for k in env or {})):
        proc = run_in_process(script, args, cwd or REPO, {**RUN_ENV, **(env or {})}, timeout)
    else:
        proc = subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
                              env=subprocess_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


# MLflow tracking is off in test runs unless a test turns it on (`--tracking.mlflow` among its args):
# each fresh runs folder would create a tracking database (about 2 s), and tests/test_tracking.py
# covers it
NO_TRACKING = ("--tracking.no_mlflow",)


def train_command(data: str | Path, runs: str | Path, name: str, *args: str,
                  launcher: tuple[str, ...] = ()) -> list[str]:
    """The command line of a smoke-preset training run `runs/name` on `data`, `args` after the
    preset's (a later flag wins). For a process the test drives itself (kill tests)."""
    launcher = tuple(str(free_port()) if a == FREE_PORT else a for a in launcher)
    return [*(launcher or (sys.executable,)), str(REPO / "scripts" / "train.py"), "--config",
            str(REPO / "configs" / "train" / "smoke.yaml"), "--data.dir", str(data), "--runs_dir", str(runs),
            "--run_name", name, *NO_TRACKING, *args]


def train(data: str | Path, runs: str | Path, name: str, *args: str, launcher: tuple[str, ...] = (),
          check: bool = True, env: dict[str, str] | None = None, cwd: str | Path | None = None,
          timeout: float = 600, fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run scripts/train.py with the smoke preset as `runs/name` on `data` (as train_command), MLflow
    tracking off unless `args` turn it on, through `launcher` (e.g. accelerate_launch("cpu_ddp"));
    every test launches training this way."""
    return run_script("scripts/train.py", "--config", str(REPO / "configs" / "train" / "smoke.yaml"),
                      "--data.dir", str(data), "--runs_dir", str(runs), "--run_name", name, *NO_TRACKING, *args,
                      launcher=launcher, check=check, env=env, cwd=cwd, timeout=timeout,
                      fresh_process=fresh_process)


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
