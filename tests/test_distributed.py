"""The training step's arithmetic: token-weighted gradients agree however a batch is split
(accumulation, 2-process CPU DDP over gloo), steps and schedules count optimizer steps, and a
non-finite loss is stopped or skipped before it reaches the weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import accelerate_launch, run_script, train

DDP = accelerate_launch("cpu_ddp")
FSDP = accelerate_launch("cpu_fsdp2")


def step_grads(tmp_path, *ways, ddp=False) -> dict:
    """{name: gradient} for each way of splitting the step (see tests/helpers/grad_step.py), all
    in one process or one 2-process launch."""
    run_script("tests/helpers/grad_step.py", str(tmp_path), *ways, launcher=DDP if ddp else ())
    return {w.split("=")[0]: torch.load(tmp_path / f"{w.split('=')[0]}.pt", weights_only=True) for w in ways}


def test_gradient_is_the_same_however_the_step_is_split(tmp_path):
    grads = {**step_grads(tmp_path, "whole=1", "accum2=2", "accum4=4", "naive=2+naive", "plain=2+plain"),
             **step_grads(tmp_path, "ddp=1", "ddp_accum2=2", ddp=True)}
    whole = grads["whole"]
    scale = whole.abs().max()
    for name in ("accum2", "accum4", "ddp", "ddp_accum2"):
        assert (grads[name] - whole).abs().max() <= 1e-5 * scale, name
    # the mean of per-micro-batch means weights a 2-token row like a 64-token one: not the same
    assert (grads["naive"] - whole).abs().max() > 0.05 * scale
    # the fused output layer + loss (train.py's default, used above) against full logits
    assert (grads["plain"] - whole).abs().max() <= 1e-5 * scale


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


PARALLEL_RUN = ["--max_steps", "12", "--log_every", "3", "--eval_every", "0", "--eval_tokens", "2000",
                "--checkpoint_every", "6", "--precision", "fp32"]


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory):
    """A 2-process CPU DDP run of 12 steps (checkpoints at 6 and 12), tracked in MLflow: (its folder,
    its output)."""
    root = tmp_path_factory.mktemp("ddp")
    return root / "two", train(tiny_data, root, "two", *PARALLEL_RUN, "--tracking.mlflow", launcher=DDP)


def test_two_process_ddp_trains_as_one_job(tiny_data, tmp_path, ddp_run):
    two_dir, two = ddp_run
    one = train(tiny_data, tmp_path, "one", *PARALLEL_RUN)
    assert "1 process(es)" in one.stdout and "2 process(es)" in two.stdout
    assert "weights identical on all 2 processes: True" in two.stdout
    final = records(two_dir, "final")[0]
    assert final["world_size"] == 2 and final["replicas_identical"] is True
    a, b = records(tmp_path / "one", "train"), records(two_dir, "train")
    # steps, the schedule and logging count optimizer steps whatever the world size...
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9, 12]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    # ...and each step of the 2-process job saw both ranks' (different) blocks
    assert [2 * r["tokens_seen"] for r in a] == [r["tokens_seen"] for r in b]
    assert a[-1]["loss"] != b[-1]["loss"]
    assert [p.name for p in sorted((two_dir / "checkpoints").iterdir())] == ["step_0000006", "step_0000012"]
    # one MLflow run for the job, written by the main process
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{two_dir.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lm").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.metrics["world_size"] == 2
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [3, 6, 9, 12]


def test_fsdp2_on_cpu_shards_trains_like_ddp_and_resumes(tiny_data, tmp_path, ddp_run):
    import shutil

    from safetensors.torch import load_file

    ddp_dir, _ = ddp_run
    proc = train(tiny_data, tmp_path, "fsdp", *PARALLEL_RUN, launcher=FSDP)
    assert "FSDP2 on CPU over gloo (2 process(es))" in proc.stdout and "weights identical" not in proc.stdout
    run = tmp_path / "fsdp"
    # really sharded: each rank wrote its own shard of the weights and of the optimizer state
    for step in ("step_0000006", "step_0000012"):
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (run / "checkpoints" / step / part).glob("*.distcp")) == [
                "__0_0.distcp", "__1_0.distcp"], (step, part)
    # the same job as DDP: same steps, schedule, tokens and (up to reduction order) losses and weights
    a, b = records(run, "train"), records(ddp_dir, "train")
    assert [(r["step"], r["lr"], r["tokens_seen"]) for r in a] == [(r["step"], r["lr"], r["tokens_seen"]) for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    fsdp_w, ddp_w = (load_file(d / "final" / "model.safetensors") for d in (run, ddp_dir))
    assert sorted(fsdp_w) == sorted(ddp_w)  # the tied output layer saved once, as DDP saves it
    scale = max(t.abs().max() for t in ddp_w.values())
    assert max((fsdp_w[k] - ddp_w[k]).abs().max() for k in ddp_w) <= 1e-4 * scale
    assert records(run, "final")[0]["world_size"] == 2

    # a crash after the step-6 checkpoint: resuming from the shards ends where the whole run did
    crashed = tmp_path / "crashed"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_0000012")
    shutil.rmtree(crashed / "final")
    proc = train(tiny_data, tmp_path, "crashed", *PARALLEL_RUN, "--resume", "auto", launcher=FSDP)
    assert "resumed from" in proc.stdout and "step_0000006 at step 6" in proc.stdout
    assert [r["loss"] for r in records(crashed, "train")] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    resumed_w = load_file(crashed / "final" / "model.safetensors")
    assert max((resumed_w[k] - fsdp_w[k]).abs().max() for k in fsdp_w) <= 1e-6 * scale

    # shards cannot be resumed by a DDP job: a clear error, and the run is left as it was
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = train(tiny_data, tmp_path, "fsdp", *PARALLEL_RUN, "--max_steps", "14", "--resume", "auto",
                 launcher=DDP, check=False)
    # (the launcher adds its own report of a failed child; the script itself raises no traceback)
    assert proc.returncode != 0 and "[rank0]: Traceback" not in proc.stderr and 'train.py", line' not in proc.stderr
    assert "was written by an FSDP job and this one does not use FSDP" in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before

    # an optimizer that needs whole matrices (registered so) is refused under FSDP, before the run folder
    proc = train(tiny_data, tmp_path, "muon", *PARALLEL_RUN, "--optim.name", "muon", launcher=FSDP, check=False)
    assert proc.returncode != 0 and "--optim.name muon does not combine with FSDP here" in proc.stderr
    assert not (tmp_path / "muon").exists()


def test_fsdp_asked_for_but_not_applied_says_so(tiny_data, tmp_path):
    # what the launcher sets for an FSDP config, on a job it did not launch as a distributed one
    proc = train(tiny_data, tmp_path, "fsdp1", "--max_steps", "1", "--eval_every", "0", "--eval_tokens", "500",
                 "--checkpoint_every", "0", env={"ACCELERATE_USE_FSDP": "true"})
    assert "asks for FSDP, but this job runs without it (one process): nothing is sharded" in proc.stdout


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_is_stopped_or_skipped(tiny_data, tmp_path, policy):
    from safetensors.torch import load_file

    proc = train(tiny_data, tmp_path, policy, "--max_steps", "10", "--log_every", "2", "--eval_every", "0",
                 "--eval_tokens", "2000", "--checkpoint_every", "4",
                 "--on_nonfinite", policy, env={"LM_TEST_NAN_STEP": "6"}, check=False)
    run = tmp_path / policy
    if policy == "stop":
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "step 6: non-finite loss" in proc.stderr and "Samples (block indices)" in proc.stderr
        assert "step_0000004" in proc.stderr  # names the newest checkpoint, which is intact
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000004"]
        assert not (run / "final").exists()
    else:
        assert proc.returncode == 0 and "step 6: non-finite loss and gradient norm; update skipped" in proc.stdout
        assert records(run, "final")[0]["skipped_steps"] == 1
        assert all(r["loss"] == r["loss"] for r in records(run, "train"))  # no NaN reached the logs
        weights = load_file(run / "final" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values())


def test_activation_checkpointing_changes_memory_not_results(tiny_data, tmp_path):
    common = ["--max_steps", "6", "--log_every", "2", "--eval_every", "0", "--eval_tokens", "2000",
              "--checkpoint_every", "0", "--precision", "fp32"]
    train(tiny_data, tmp_path, "plain", *common)
    proc = train(tiny_data, tmp_path, "ckpt", *common, "--activation_checkpointing")
    assert "activation checkpointing: on" in proc.stdout
    a, b = records(tmp_path / "plain", "train"), records(tmp_path / "ckpt", "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)


def test_fused_output_layer_trains_like_full_logits(tiny_data, tmp_path):
    common = ["--max_steps", "6", "--log_every", "2", "--eval_every", "0", "--eval_tokens", "2000",
              "--checkpoint_every", "0", "--precision", "fp32"]
    train(tiny_data, tmp_path, "fused", *common)  # the default
    train(tiny_data, tmp_path, "full", *common, "--no_fused_loss")
    a, b = records(tmp_path / "fused", "train"), records(tmp_path / "full", "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    assert records(tmp_path / "fused", "eval")[-1]["val_loss"] == pytest.approx(
        records(tmp_path / "full", "eval")[-1]["val_loss"], rel=1e-5)


def test_compiled_training_matches_eager(tiny_data, tmp_path):
    # the default preset compiles: torch.compile, eager attention for it (attention auto) and the
    # compiled softmax of the fused loss must train as the uncompiled step does
    common = ["--max_steps", "4", "--log_every", "1", "--eval_every", "0", "--eval_tokens", "2000",
              "--checkpoint_every", "0", "--precision", "fp32"]
    proc = train(tiny_data, tmp_path, "compiled", *common, "--compile")
    assert "forward: torch.compile, attention eager, loss fused with the output layer" in proc.stdout
    train(tiny_data, tmp_path, "eager", *common)
    a, b = records(tmp_path / "compiled", "train"), records(tmp_path / "eager", "train")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-3)
    # the saved model is the plain one (no torch.compile "_orig_mod." names) and scores the same
    from safetensors.torch import load_file

    saved = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("compiled", "eager")]
    assert sorted(saved[0]) == sorted(saved[1]) and not any("_orig_mod" in k for k in saved[0])
    assert records(tmp_path / "compiled", "eval")[-1]["val_loss"] == pytest.approx(
        records(tmp_path / "eager", "eval")[-1]["val_loss"], rel=1e-4)
