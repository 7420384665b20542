"""Optimizers by name: Muon takes the blocks' matrices and AdamW the rest, the two act as one
optimizer (learning rate, state dict), and an unknown name is refused with the known ones."""
from __future__ import annotations

import copy

import pytest
import torch

from lib.errors import UserError
from lib.model.build import ModelConfig, build_model
from lib.train.optim import OPTIMIZERS, OptimConfig, build_optimizer, set_lr

SPECIAL = {"bos": 1, "eos": 2, "pad": 3}


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16), 64, SPECIAL)


def fake_step(model, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon"))
    muon = {id(p) for g in opt.parts["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.parts["adamw"].param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon and not muon & adamw and muon | adamw == set(names)
    assert all(p.ndim == 2 and "embed" not in names[id(p)] for p in model.parameters() if id(p) in muon)
    assert {names[i] for i in adamw} >= {"model.embed_tokens.weight", "model.norm.weight"}
    assert isinstance(opt.parts["muon"], torch.optim.Muon) and isinstance(opt.parts["adamw"], torch.optim.AdamW)
    # the schedule's learning rate reaches every group of both parts
    set_lr(opt, 0.25)
    assert [g["lr"] for o in opt.parts.values() for g in o.param_groups] == [0.25] * 3


def test_muon_state_round_trips_and_the_learning_rate_still_reaches_both_parts():
    a, b = tiny(), tiny()
    opt_a = build_optimizer(a, OptimConfig(name="muon", lr=1e-2))
    for s in range(3):
        fake_step(a, opt_a, s)
    assert opt_a.state and all("momentum_buffer" in opt_a.parts["muon"].state[p]
                               for g in opt_a.parts["muon"].param_groups for p in g["params"])
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, OptimConfig(name="muon", lr=1e-2))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from a checkpoint: no tensor shared
    for opt in (opt_a, opt_b):
        set_lr(opt, 5e-3)  # after loading: the parts' new group dicts are the ones set
    for model, opt in ((a, opt_a), (b, opt_b)):
        fake_step(model, opt, 7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert [g["lr"] for g in opt_b.parts["muon"].param_groups] == [5e-3]
    # a state dict of another optimizer is refused, naming both
    with pytest.raises(ValueError, match="adamw"):
        opt_b.load_state_dict({"parts": {"adamw": opt_a.parts["adamw"].state_dict()}})


def test_muon_lowers_a_loss_faster_than_nothing_and_an_unknown_name_is_refused():
    model = tiny()
    ids = torch.randint(4, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-2))
    first = None
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        assert float(model(input_ids=ids, labels=ids).loss) < first - 1.0
    with pytest.raises(UserError, match=r"--optim.name lion: no such optimizer; known: adamw, muon"):
        OPTIMIZERS.get("lion", "--optim.name")


SGD_PLUGIN = '''
import torch
from lib.train.optim import OPTIMIZERS


@OPTIMIZERS.register("plain_sgd", state_numel=lambda model: 0)
def plain_sgd(model, cfg):  # the update is -lr x the gradient: what clipping does to it shows directly
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
'''


def test_clipping_scales_the_step_to_the_clip_norm_with_accumulation(tiny_data, tmp_path):
    """A step whose gradient norm exceeds --optim.grad_clip applies the gradient scaled to that
    norm: with a plain SGD plugin (update = -lr x gradient) and two accumulated micro-batches, the
    clipped step is the unclipped one times clip / norm, weight for weight."""
    import json

    from safetensors.torch import load_file

    from conftest import train

    plugin = tmp_path / "sgd.py"
    plugin.write_text(SGD_PLUGIN)
    common = ["--plugins", str(plugin), "--optim.name", "plain_sgd", "--optim.schedule", "constant",
              "--optim.warmup_steps", "0", "--max_steps", "1", "--micro_batch_size", "4", "--grad_accum_steps", "2",
              "--eval_every", "0", "--eval_tokens", "2000", "--checkpoint_every", "0", "--log_every", "1",
              "--precision", "fp32", "--deterministic"]

    def weights(name, *args):
        train(tiny_data, tmp_path, name, *common, *args)
        row = next(json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                   if json.loads(x)["type"] == "train")
        return load_file(str(tmp_path / name / "final" / "model.safetensors")), row

    start, _ = weights("start", "--optim.lr", "0", "--optim.grad_clip", "0")
    free, row = weights("free", "--optim.lr", "0.1", "--optim.grad_clip", "0")
    norm = row["grad_norm"]
    clip = norm / 10
    clipped, row2 = weights("clipped", "--optim.lr", "0.1", "--optim.grad_clip", str(clip))
    assert row2["grad_norm"] == pytest.approx(norm, rel=1e-6)  # the norm logged is the one before clipping
    moved = 0
    for name, w0 in start.items():
        full, part = free[name] - w0, clipped[name] - w0
        torch.testing.assert_close(part, full * (clip / norm), rtol=1e-4, atol=1e-7)
        moved += int(full.abs().max() > 0)
    assert moved > len(start) // 2  # most tensors took a step
