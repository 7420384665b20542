"""The default preset sizes its model to the compute its budget buys (lib/train/sizing.py): a slower
measured rate gets a smaller shape, the choice is recorded in config.yaml and kept on resume, and
what the command line sets is never overridden."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, _script_module, train
from lib import config as config_lib
from lib.train import sizing

SMALL, LARGE = sizing.SHAPES[0], sizing.SHAPES[-1]
# a short sized run: stopped after one step, which writes a checkpoint
BUDGET = ("--size_to_budget", "--max_minutes", str(LARGE.minutes), "--max_steps", "3", "--precision", "fp32",
          "--eval_every", "0", "--eval_tokens", "2000", "--no_mfu")
SIZED = (*BUDGET, "--stop_at_step", "1")


def saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def fake_rate(monkeypatch, gflops: float) -> None:
    monkeypatch.setattr(sizing, "measured_gflops", lambda precision: (gflops, "faked"))


def test_the_rule_takes_the_shape_of_the_nearest_compute():
    assert LARGE.tflop > SMALL.tflop and LARGE.settings["model.d_model"] > SMALL.settings["model.d_model"]
    assert sizing.choose(LARGE.gflops, LARGE.minutes) is LARGE
    assert sizing.choose(SMALL.gflops, SMALL.minutes) is SMALL
    assert sizing.choose(LARGE.gflops * 100, LARGE.minutes) is LARGE  # beyond the sweep: its largest
    assert sizing.choose(LARGE.gflops, SMALL.tflop / LARGE.gflops * 1e3 / 60) is SMALL  # a shorter budget
    assert sizing.given_options(["--model.d_model", "64", "--optim.lr=1e-3", "--model.no_tie_embeddings",
                                 "5"]) == {"model.d_model", "optim.lr", "model.no_tie_embeddings",
                                           "model.tie_embeddings"}


def test_a_slower_rate_gets_the_smaller_shape_recorded_in_config_yaml(tiny_data, tmp_path, monkeypatch):
    shapes = {}
    for name, shape in (("fast", LARGE), ("slow", SMALL)):
        fake_rate(monkeypatch, shape.gflops)
        proc = train(tiny_data, tmp_path, name, *SIZED)
        assert f"-> {shape.name} (best in the budget sweep" in proc.stdout and "faked" in proc.stdout
        cfg = saved(tmp_path / name)
        assert cfg["size_to_budget"] is False  # --config on it reproduces the run, unsized
        shapes[name] = cfg["model"]["d_model"]
        for key, value in shape.settings.items():
            node = cfg
            for part in key.split("."):
                node = node[part]
            assert node == value, key
    assert shapes["slow"] < shapes["fast"]


def test_a_resumed_run_keeps_its_shape_whatever_the_rate_now(tiny_data, tmp_path, monkeypatch):
    fake_rate(monkeypatch, LARGE.gflops)
    train(tiny_data, tmp_path, "run", *SIZED)
    fake_rate(monkeypatch, SMALL.gflops)
    proc = train(tiny_data, tmp_path, "run", *BUDGET, "--resume", "auto")
    assert "a resumed run keeps its shape" in proc.stdout and "resumed from" in proc.stdout
    assert saved(tmp_path / "run")["model"]["d_model"] == LARGE.settings["model.d_model"]


@pytest.mark.parametrize("flag, value", [("--model.d_model", "64"), ("--model.size", "llama-20m")])
def test_what_the_command_line_sets_is_never_overridden(tiny_data, tmp_path, monkeypatch, flag, value):
    fake_rate(monkeypatch, LARGE.gflops)
    proc = train(tiny_data, tmp_path, "mine", *SIZED, flag, value)
    assert f"size_to_budget: not applied, the command line sets the model ({flag})" in proc.stdout
    cfg = saved(tmp_path / "mine")
    assert cfg["optim"]["name"] == "adamw" and cfg["model"]["d_model"] != LARGE.settings["model.d_model"]
    # an option other than the model's keeps the value given; the rest is sized
    proc = train(tiny_data, tmp_path, "lr", *SIZED, "--optim.lr", "0.007")
    cfg = saved(tmp_path / "lr")
    assert cfg["optim"]["lr"] == 0.007 and cfg["model"]["d_model"] == LARGE.settings["model.d_model"]
    assert "kept from the command line: --optim.lr" in proc.stdout
    # an architecture option is not a size: the sized shape, with the option
    train(tiny_data, tmp_path, "qk", *SIZED, "--model.arch", "gpt", "--model.qk_norm")
    cfg = saved(tmp_path / "qk")
    assert cfg["model"]["qk_norm"] is True and cfg["model"]["d_model"] == LARGE.settings["model.d_model"]


def test_each_sweep_point_parses_to_the_architecture_its_name_says():
    # the preset has changed under the early points (Llama then, the own model with QK-norm now):
    # a point rerun with --again must still train what its row in results.md describes
    train_py = _script_module(REPO / "scripts" / "train.py")
    points = yaml.safe_load((REPO / "experiments" / "budget-sweep" / "points.yaml").read_text())["points"]
    for name, point in points.items():
        argv = ["--config", str(REPO / "configs" / "train" / "default.yaml"), *map(str, point["flags"])]
        model = config_lib.parse(train_py.TrainConfig, argv=argv).model
        assert model.arch == ("gpt" if name.startswith("g") else "llama"), name
        assert model.qk_norm == ("-qk" in name), name
        assert (model.mlp == "relu2") == ("-relu2" in name), name
        assert model.tie_embeddings == ("-untied" not in name), name
        assert model.logit_softcap == (30.0 if "-cap30" in name else None), name
