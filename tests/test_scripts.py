"""Every script runs as a real subprocess: from another folder, through accelerate launch, as a
copy under experiments/, without scripts/tokenize.py shadowing the standard library. And a run
inside the test process (how most tests run train.py) leaves that process as it found it."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_script, train

SCRIPTS = ["tokenize", "train", "eval", "audit"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_from_another_directory(name, tmp_path):
    proc = run_script(f"scripts/{name}.py", "--help", cwd=tmp_path, fresh_process=True)
    assert "usage" in proc.stdout.lower()
    assert "--config" in proc.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_does_not_import_heavy_packages(name, tmp_path):
    # runs the script the way `python scripts/X.py --help` does and lists what got imported
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(REPO / 'scripts' / (name + '.py'))!r}, '--help']\n"
        f"sys.path[0] = {str(REPO / 'scripts')!r}\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'mlflow', 'accelerate', 'datasets') "
        "if m in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout[-300:]


def test_stdlib_tokenize_is_not_shadowed(tmp_path):
    # torch's import chain reaches inspect -> linecache -> tokenize; with the shadowing bug,
    # `import torch` inside any script in scripts/ would load scripts/tokenize.py instead.
    probe = REPO / "scripts" / "_probe_shadow.py"
    body = (REPO / "scripts" / "train.py").read_text().split("import math")[0]
    probe.write_text(body + "import tokenize, torch\nprint('TOKENIZE=' + tokenize.__file__)\n")
    try:
        proc = run_script(probe, cwd=tmp_path)
    finally:
        probe.unlink()
    assert "TOKENIZE=" in proc.stdout
    assert "scripts" not in proc.stdout.split("TOKENIZE=")[1]


@pytest.mark.parametrize("name", ["train", "tokenize"])
def test_accelerate_launch_help(name, tmp_path):
    launcher = (str(Path(sys.executable).with_name("accelerate")), "launch",
                "--config_file", str(REPO / "configs/accelerate/cpu.yaml"))
    proc = run_script(f"scripts/{name}.py", "--help", cwd=tmp_path, launcher=launcher)
    assert "--config" in proc.stdout


def test_copy_under_experiments_runs(tmp_path):
    exp = REPO / "experiments" / "_pytest_copy"
    exp.mkdir(parents=True, exist_ok=True)
    try:
        for name in SCRIPTS:
            shutil.copy(REPO / "scripts" / f"{name}.py", exp / f"{name}.py")
        for name in SCRIPTS:
            proc = run_script(exp / f"{name}.py", "--help", cwd=tmp_path)
            assert "--config" in proc.stdout
    finally:
        shutil.rmtree(exp)


def test_bad_config_key_is_a_short_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_stepz: 3\n")
    proc = run_script("scripts/train.py", "--config", str(bad), check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'max_stepz'" in proc.stderr and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_choice_flag_names_the_option(tmp_path):
    proc = run_script("scripts/train.py", "--precision", "fp8", check=False, cwd=tmp_path)
    assert proc.returncode != 0
    assert "precision" in proc.stderr and "Traceback" not in proc.stderr


PRESETS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*/*.yaml")
                 if "accelerate" not in p.parts)


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_with_its_script(preset, tmp_path):
    import yaml

    script = Path(preset).parent.name
    text = (REPO / preset).read_text()
    header = text.split("\n\n")[0]
    assert text.startswith("#") and f"scripts/{script}.py" in header, "a preset starts with a header giving its command"
    proc = run_script(f"scripts/{script}.py", "--config", str(REPO / preset), "--print_config", cwd=tmp_path)
    resolved = dict(_flatten(yaml.safe_load(proc.stdout)))
    for key, value in _flatten(yaml.safe_load(text)):
        assert resolved[key] == pytest.approx(float(value)) if isinstance(value, str) and value[:1].isdigit() \
            else resolved[key] == value, key


def test_accelerate_configs_load():
    """Every committed launcher config is one Accelerate reads, of the kind its name says."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"cpu": DistributedType.NO, "cpu_ddp": DistributedType.MULTI_GPU, "gpu": DistributedType.NO,
                "multi_gpu": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP,
                "cpu_fsdp2": DistributedType.FSDP, "multi_node": DistributedType.MULTI_GPU}
    found = {p.stem: p for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert set(found) == set(expected)
    for name, path in found.items():
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == expected[name], name
        assert path.read_text().startswith("#") and "accelerate launch" in path.read_text()
    assert load_config_from_file(str(found["fsdp2"])).fsdp_config["fsdp_version"] == 2
    # the CPU config tries out the GPU one: the same FSDP settings
    assert load_config_from_file(str(found["cpu_fsdp2"])).fsdp_config == load_config_from_file(
        str(found["fsdp2"])).fsdp_config
    assert load_config_from_file(str(found["multi_node"])).num_machines == 2


def test_gpu_check_plumbing_runs_on_cpu(tiny_data, tmp_path):
    # the real check needs a GPU; everything around the training run (data, the run, reading its
    # metrics, the verdict) is tried here with the smoke preset
    proc = run_script("scripts/gpu_check.py", "--preset", "configs/train/smoke.yaml", "--data_dir", str(tiny_data),
                      "--steps", "12", "--skip", "4", "--runs_dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("scripts/gpu_check.py", "--preset", "configs/train/smoke.yaml", "--data_dir", str(tiny_data),
                      "--steps", "12", "--skip", "4", "--runs_dir", str(tmp_path), "--no_require_gpu",
                      "--train_args=--lora.r 4 --model.n_layers 1")
    assert "[gpu-check] CPU: " in proc.stdout and "tokens/s over steps 12-12 (median of 1 logged windows)" in proc.stdout
    assert "LoRA r=4 alpha=16 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj: " in proc.stdout
    assert re.search(r"peak memory \d+\.\d\d GiB \(process RSS\)", proc.stdout), proc.stdout
    verdict = [line for line in proc.stdout.splitlines() if line.startswith("[gpu-check] MFU ")]
    assert len(verdict) == 1 and verdict[0].endswith("target >= 40%: NOT met)"), proc.stdout
    assert (tmp_path / "smoke" / "final" / "model.safetensors").is_file()
    proc = run_script("scripts/gpu_check.py", "--data_dir", str(tmp_path / "nowhere"), "--no_require_gpu",
                      check=False)
    assert proc.returncode == 2 and "holds no tokenized dataset" in proc.stderr


def test_zloss_plugin_adds_z_times_the_mean_squared_log_partition_on_both_paths(tiny_data, tmp_path):
    """experiments/zloss/zloss.py registers a loss (lib.model.loss.LOSSES) with its own option: named with
    --plugins, `--loss.name zloss --loss.z Z` trains on cross-entropy + Z * log(Z)^2 per token,
    on the fused output layer and on full logits alike, and logs the mean log(Z)^2."""
    plugin = str(REPO / "experiments" / "zloss" / "zloss.py")
    assert "--loss.z" in run_script("scripts/train.py", "--plugins", plugin, "--help", cwd=tmp_path).stdout
    assert "--loss.z" not in run_script("scripts/train.py", "--help", cwd=tmp_path).stdout

    def first_step(name, *args):
        proc = train(tiny_data, tmp_path, name, "--max_steps", "2", "--log_every", "1", "--eval_every", "0",
                     "--eval_tokens", "2000", "--checkpoint_every", "0", "--precision", "fp32", *args)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if r["type"] == "train"), proc.stdout

    for fused in ("True", "False"):
        flag = "--fused_loss" if fused == "True" else "--no_fused_loss"
        plain, _ = first_step(f"plain-{fused}", flag)
        zloss = ("--plugins", plugin, "--loss.name", "zloss", flag)
        z0, _ = first_step(f"z0-{fused}", *zloss, "--loss.z", "0")
        z, out = first_step(f"z-{fused}", *zloss, "--loss.z", "0.1")
        assert ("loss fused with the output layer (zloss)" in out) == (fused == "True"), out
        # step 1 starts from the same weights on the same batch: the z term is all that differs
        assert z0["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert z["loss"] - plain["loss"] == pytest.approx(0.1 * z["loss_log_z_sq"], rel=1e-4)
        # initial logits are near zero, so log(Z) is about log(vocabulary size) for every token
        vocab = json.loads((tiny_data / "tokens" / "manifest.json").read_text())["vocab_size"]
        assert z["loss_log_z_sq"] == pytest.approx(math.log(vocab) ** 2, rel=0.02)
    saved = (tmp_path / "z-True" / "config.yaml").read_text()
    assert "name: zloss" in saved and "z: 0.1" in saved  # config.yaml reproduces it (its plugins listed)


def test_make_fork_stamps_the_copy_and_fork_diff_shows_its_changes():
    name = "_pytest_fork"
    exp = REPO / "experiments" / name
    shutil.rmtree(exp, ignore_errors=True)
    try:
        subprocess.run(["make", "-s", "fork", f"NAME={name}"], cwd=REPO, check=True, capture_output=True, text=True)
        assert (exp / "train.py").read_bytes() == (REPO / "scripts" / "train.py").read_bytes()
        stamp = (exp / "FORKED_FROM").read_text().splitlines()
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        assert stamp[0] == f"{head} scripts/train.py"
        again = subprocess.run(["make", "-s", "fork", f"NAME={name}"], cwd=REPO, capture_output=True, text=True)
        assert again.returncode != 0 and "exists" in again.stderr  # a fork is never overwritten
        src = (exp / "train.py").read_text()
        (exp / "train.py").write_text(src.replace("    seed: int = 0\n", "    seed: int = 7\n"))
        diff = subprocess.run(["make", "-s", "-o", ".venv/.installed", "fork-diff", f"NAME={name}", f"PY={sys.executable}"],
                              cwd=REPO, capture_output=True, text=True, check=True).stdout
        assert "-    seed: int = 0" in diff and "+    seed: int = 7" in diff
    finally:
        shutil.rmtree(exp, ignore_errors=True)


def test_a_run_inside_pytest_leaves_the_process_as_it_was(tiny_data, tmp_path):
    """Most tests run train.py inside this process (conftest.run_in_process): what a run changes
    there (threads and deterministic algorithms under --deterministic, environment variables,
    the working folder, Accelerate's state) must be put back, or later tests would run otherwise."""
    import os

    import torch
    from accelerate.state import PartialState

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), dict(os.environ), os.getcwd())
    proc = train(tiny_data, tmp_path, "inside", "--max_steps", "2", "--deterministic", "--eval_every", "0",
                 "--checkpoint_every", "0", cwd=tmp_path, env={"LM_SOME_SETTING": "1"})
    assert "deterministic: 1 CPU thread(s)" in proc.stdout and proc.returncode == 0
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), dict(os.environ), os.getcwd())
    assert after == before
    assert not PartialState._shared_state  # the next run starts Accelerate afresh


def test_a_run_inside_pytest_that_hangs_fails_its_test(tiny_data, tmp_path):
    """A run inside this process that outlives its timeout raises TimeoutExpired, as a subprocess
    would, instead of holding the suite (and CI) until its own limit; the process is put back."""
    import os
    import signal
    import time

    import torch

    before = (torch.get_num_threads(), dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGALRM))
    t = time.perf_counter()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        train(tiny_data, tmp_path, "hangs", "--max_steps", "100000", "--max_minutes", "None", "--eval_every", "0",
              "--checkpoint_every", "0", cwd=tmp_path, timeout=5)
    assert time.perf_counter() - t < 60
    assert "ran past its timeout of 5s" in caught.value.stderr
    assert (torch.get_num_threads(), dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGALRM)) == before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    proc = train(tiny_data, tmp_path, "after", "--max_steps", "2", "--eval_every", "0", "--checkpoint_every", "0")
    assert proc.returncode == 0
