"""Retention: keep_last_n counts complete checkpoints only; --keep_best also spares the one with
the lowest held-out loss."""
from __future__ import annotations

import json

import pytest

from lib.records.checkpoint import STATE, best_checkpoint, complete_checkpoints, prune
from lib.errors import UserError
from conftest import train


def fake_run(root, losses):
    for step, loss in losses.items():
        folder = root / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"x")
        (folder / STATE).write_text(json.dumps({"step": step, "val_loss": loss}))
    # an incomplete one (no record): never counted, never chosen
    (root / "checkpoints" / "step_0000099").mkdir()
    return root


def steps(run):
    return [int(p.name.split("_")[1]) for p in complete_checkpoints(run)]


def test_prune_keeps_last_n_and_the_best(tmp_path):
    run = fake_run(tmp_path / "a", {1: 3.0, 2: 2.0, 3: 2.5, 4: None, 5: 2.9})
    assert best_checkpoint(run).name == "step_0000002"
    prune(run, 2, keep_best=True)
    assert steps(run) == [2, 4, 5]
    prune(run, 1)  # without keep_best the best goes too
    assert steps(run) == [5]
    assert (run / "checkpoints" / "step_0000099").is_dir()
    with pytest.raises(UserError):
        prune(run, 0)


def test_best_within_the_last_n_keeps_nothing_extra(tmp_path):
    run = fake_run(tmp_path / "b", {1: 3.0, 2: 2.8, 3: 2.5, 4: float("nan")})
    prune(run, 2, keep_best=True)
    assert steps(run) == [3, 4]


def test_training_records_val_loss_and_keeps_the_best(tiny_data, tmp_path):
    train(tiny_data, tmp_path, "best", "--eval_tokens", "2000", "--max_steps", "8", "--eval_every", "2",
          "--checkpoint_every", "2",
          "--keep_last_n", "1", "--keep_best", "--optim.lr", "0.05")
    run = tmp_path / "best"
    evals = {r["step"]: r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "eval"}
    assert sorted(evals) == [2, 4, 6, 8]
    best_step = min(evals, key=evals.get)
    assert steps(run) == sorted({best_step, 8})
    for path in complete_checkpoints(run):
        assert json.loads((path / STATE).read_text())["val_loss"] == evals[int(path.name.split("_")[1])]
