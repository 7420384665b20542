"""Held-out evaluation split between processes (train.py under DDP/FSDP): each process scores its
own share of the windows and the sums are added over processes; the result is the one-process
figure to the last printed digit (fp32), with each process doing about half the work."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import REPO, free_port

sys.path.insert(0, str(REPO))


def sample_and_model():
    import torch

    from lib.model.evaluate import HeldOutSample, stream_blocks
    from lib.model.build import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=64), 97, {"bos": 1, "eos": 2, "pad": 0})
    tokens = np.random.default_rng(0).integers(3, 97, size=2_345)
    inputs, targets = stream_blocks(tokens, 32, 16)  # 145 windows: an odd number, unequal shares
    return HeldOutSample(inputs, targets, 5_000, "test"), model


def shard_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sample, model = sample_and_model()
    local = {}

    def add_up(values):
        local["sums"] = list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    res = sample.evaluate(model, 8, torch.device("cpu"), shard=(rank, world, add_up))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"result": res, "local": local["sums"]}, f)
    # both tear the group down together: a rank that destroyed its gloo group while the other was
    # still using it was seen to abort (as train.py's end notes)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_score_half_each_and_agree_with_one(tmp_path):
    import torch
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    sample, model = sample_and_model()
    one = sample.evaluate(model, 8, torch.device("cpu"))
    mp.spawn(shard_worker, args=(2, free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    parts = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(2)]
    for part in parts:  # the same figures on both processes, equal to one process's when printed
        two = part["result"]
        assert f"{two['loss']:.4f} {two['bits_per_byte']:.4f} {two['accuracy']:.3f}" == \
            f"{one['loss']:.4f} {one['bits_per_byte']:.4f} {one['accuracy']:.3f}"
        assert two["tokens"] == one["tokens"] and two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    # each scored its own share: about half the targets, together all of them once
    shares = [part["local"][1] for part in parts]
    assert sum(shares) == one["tokens"] and all(abs(s - one["tokens"] / 2) <= 32 for s in shares)
