"""The fused output layer + cross-entropy (lib/model/fused_loss.py) gives the loss and gradients of
full logits followed by cross-entropy: in float32, under bf16 autocast, across chunk
boundaries, with ignored rows, frozen weights and inside whole models with tied weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lib.model.fused_loss import FusedHead, FusedLossLinear, fused_linear_ce
from lib.model.loss import IGNORE_INDEX, token_loss_sum
from lib.model.build import ModelConfig, build_model

SPECIAL = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def problem(rows=23, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * 0.3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[[0, 5, 6, 22]] = IGNORE_INDEX  # ignored rows, the first and the last among them
    return hidden, weight, targets


def plain_and_fused(hidden, weight, targets, chunk_rows, autocast=False, weight_grad=True, compiled=False):
    out = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(weight_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = fused_linear_ce(h, w, targets, chunk_rows, compiled=compiled)
            else:
                loss = token_loss_sum(F.linear(h, w), targets)[0]
        (loss * 0.5).backward()  # a non-unit upstream gradient, as the step scaling gives
        out.append((loss.detach(), h.grad, w.grad))
    return out


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 64])
def test_float32_matches_full_logits(chunk_rows):
    (l0, h0, w0), (l1, h1, w1) = plain_and_fused(*problem(), chunk_rows)
    assert l1.dtype == torch.float32
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)
    assert h1[[0, 5, 6, 22]].abs().max() == 0  # ignored rows get no gradient
    assert h1[1].abs().max() > 0


def test_compiled_softmax_matches_full_logits():
    # torch.compile'd chunk softmax (used with --compile); rows dynamic: chunks of 7 and the last of 2
    for rows in (23, 30):
        (l0, h0, w0), (l1, h1, w1) = plain_and_fused(*problem(rows=rows), 7, compiled=True)
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w1, w0, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_full_logits_to_bf16_precision():
    (l0, h0, w0), (l1, h1, w1) = plain_and_fused(*problem(rows=64, d=32, vocab=300), 16, autocast=True)
    assert h1.dtype == w1.dtype == torch.float32  # gradients come back in the parameters' dtype
    torch.testing.assert_close(l1, l0, rtol=1e-3, atol=1e-3)
    for a, b in ((h1, h0), (w1, w0)):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    # and it did compute in bf16: not the float32 result
    (_, hf, _), _ = plain_and_fused(*problem(rows=64, d=32, vocab=300), 16)
    assert (h1 - hf).abs().max() > 1e-5 * hf.abs().max()


def test_frozen_weight_and_no_grad():
    hidden, weight, targets = problem()
    (l0, h0, _), (l1, h1, w1) = plain_and_fused(hidden, weight, targets, 5, weight_grad=False)
    assert w1 is None
    torch.testing.assert_close(h1, h0, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss = fused_linear_ce(hidden, weight, targets, 5)
    torch.testing.assert_close(loss, l0, rtol=1e-6, atol=1e-5)


def test_every_row_ignored_gives_zero_loss_and_gradient():
    hidden, weight, targets = problem()
    h = hidden.clone().requires_grad_()
    loss = fused_linear_ce(h, weight, torch.full_like(targets, IGNORE_INDEX), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.abs().max() == 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_whole_model_with_tied_weights_and_padding(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), 120, SPECIAL)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    fused_model = copy.deepcopy(model)
    keys = list(fused_model.state_dict())
    head = FusedHead.attach(fused_model, chunk_rows=5)
    assert isinstance(fused_model.lm_head, FusedLossLinear)
    assert list(fused_model.state_dict()) == keys  # names unchanged: checkpoints are interchangeable
    ids = torch.randint(4, 120, (3, 16))
    labels = torch.randint(4, 120, (3, 16))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels[0, 9:] = IGNORE_INDEX
    inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False)

    loss0, n0 = token_loss_sum(model(**inputs).logits, labels)
    loss0.backward()
    loss1, n1 = head.loss_sum(fused_model, inputs, labels)
    loss1.backward()
    assert int(n0) == int(n1) == 3 * 16 - 7
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-4)
    for (name, p0), p1 in zip(model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without targets the output layer still gives logits (evaluation, generation)
    with torch.no_grad():
        torch.testing.assert_close(fused_model(**inputs).logits, model(**inputs).logits)
    head.detach()
    assert type(fused_model.lm_head) is torch.nn.Linear and list(fused_model.state_dict()) == keys


def test_attach_refuses_a_head_it_cannot_fuse():
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=32, n_layers=1, n_heads=2, max_seq_len=16), 120, SPECIAL)
    model.lm_head = torch.nn.Linear(32, 120, bias=True)
    assert FusedHead.attach(model) is None
    assert type(model.lm_head) is torch.nn.Linear
