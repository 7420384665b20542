"""Packing modes: document-restarting positions really isolate documents in the model, and padded
batches score every target exactly once with the padding they report."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.data.batches import DataConfig, DocBoundary, PaddedDocs, TokenBlocks, build_train_data, doc_position_ids
from lib.errors import UserError
from lib.model.loss import IGNORE_INDEX
from lib.model.build import ModelConfig, build_model

SPECIAL = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}


def test_positions_restart_at_each_bos():
    rows = np.array([[1, 7, 8, 2, 1, 9, 2, 1],
                     [8, 8, 2, 1, 5, 5, 5, 5]])
    assert doc_position_ids(rows, DocBoundary(1)).tolist() == [[0, 1, 2, 3, 0, 1, 2, 0],
                                                  [0, 1, 2, 0, 1, 2, 3, 4]]


def test_positions_restart_after_each_eos_where_there_is_no_bos():
    rows = np.array([[7, 8, 2, 9, 2, 5, 5, 2],
                     [8, 2, 5, 5, 5, 5, 2, 6]])
    assert doc_position_ids(rows, DocBoundary(2, begins=False)).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2],
                                                                            [0, 1, 0, 1, 2, 3, 4, 0]]


def test_the_boundary_is_the_bos_else_the_eos():
    assert DocBoundary.of(SPECIAL) == DocBoundary(1, begins=True)
    assert DocBoundary.of({"unk": 0, "bos": 0, "eos": 0, "pad": None}) == DocBoundary(0)  # GPT-2's one token
    assert DocBoundary.of({"unk": None, "bos": None, "eos": 5, "pad": 5}) == DocBoundary(5, begins=False)
    assert DocBoundary.of({"unk": 0, "bos": None, "eos": None, "pad": None}) is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("stored", ["bos ids eos", "ids eos"])
def test_doc_mask_keeps_documents_apart(arch, stored):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, d_model=32, n_layers=2, n_heads=2, max_seq_len=64), 50, SPECIAL).eval()
    bos = [1] if stored.startswith("bos") else []
    boundary = DocBoundary(1) if bos else DocBoundary(2, begins=False)
    doc_a = bos + [10, 11, 12, 13, 2]
    doc_b = bos + [20, 21, 22, 2]
    packed = np.array([doc_a + doc_b])
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([doc_b])).logits[0]
        masked = model(input_ids=torch.from_numpy(packed), use_cache=False,
                       position_ids=torch.from_numpy(doc_position_ids(packed, boundary))).logits[0, len(doc_a):]
        plain = model(input_ids=torch.from_numpy(packed), use_cache=False).logits[0, len(doc_a):]
    torch.testing.assert_close(masked, alone, atol=1e-5, rtol=1e-5)  # as if doc_a were not there
    assert (plain - alone).abs().max() > 1e-3  # without restarts doc_b sees doc_a


def _docs(lengths, first_token=10):
    """One shard of documents `bos ... eos` with distinct body tokens, and its docs table."""
    tokens, table, t = [], [], first_token
    for n in lengths:
        body = list(range(t, t + n - 2))
        t += n - 2
        tokens += [1, *body, 2]
        table.append([n, 3 * n])
    return np.array(tokens, dtype=np.uint16), np.array(table, dtype=np.int64)


def test_padded_docs_score_each_target_once_and_mask_padding():
    shard_a, table_a = _docs([5, 12, 3, 9])
    shard_b, table_b = _docs([26, 4], first_token=500)
    data = PaddedDocs([shard_a, shard_b], [table_a, table_b], seq_len=8, pad_id=3)
    # pieces overlap by one token: 26 tokens (25 targets) -> 9, 9, 9, 2; 12 -> 9, 4
    assert sorted(data.lengths.tolist()) == sorted([5, 9, 4, 3, 9, 9, 9, 9, 2, 4])
    batch = data.make_batch(np.arange(len(data)))
    assert batch.input_ids.shape == (len(data), 8) and batch.position_ids is None
    scored = batch.labels[batch.labels != IGNORE_INDEX]
    expected = np.concatenate([shard_a, shard_b]).astype(np.int64)
    expected = expected[expected != 1]  # every token but each document's bos is a target once
    assert sorted(scored.tolist()) == sorted(expected.tolist())
    assert ((batch.attention_mask == 1) == (batch.labels != IGNORE_INDEX)).all()
    assert (batch.input_ids[batch.attention_mask == 0] == 3).all()
    assert batch.n_padding == batch.input_ids.size - batch.n_targets


def test_pad_longest_and_multiple_widths_and_reported_padding():
    shard, table = _docs([5, 7, 20, 4, 6, 3])
    longest = PaddedDocs([shard], [table], seq_len=32, pad_id=3)
    multiple = PaddedDocs([shard], [table], seq_len=32, pad_id=3, multiple=8)
    assert longest.make_batch([0, 1]).input_ids.shape == (2, 6)  # longest row 7 tokens -> 6 inputs
    assert multiple.make_batch([0, 1]).input_ids.shape == (2, 8)
    assert multiple.make_batch([2, 3]).input_ids.shape == (2, 24)
    capped = PaddedDocs([shard], [table], seq_len=20, pad_id=3, multiple=16)
    assert capped.make_batch([2]).input_ids.shape == (1, 20)  # rounded up to 32, capped at seq_len
    order = np.array([2, 0, 5, 1, 3, 4])
    for data in (longest, multiple):
        batches = [data.make_batch(order[i : i + 2]) for i in range(0, 6, 2)]
        measured = sum(b.n_padding for b in batches) / sum(b.input_ids.size for b in batches)
        assert data.padding_fraction(order, 2) == pytest.approx(measured)
    assert multiple.padding_fraction(order, 2) > longest.padding_fraction(order, 2) > 0


def test_packed_blocks_are_unpadded(tiny_data):
    cfg = DataConfig(dir=str(tiny_data), seq_len=32)
    data = build_train_data(tiny_data / "tokens", cfg, SPECIAL)
    assert isinstance(data, TokenBlocks)
    batch = data.make_batch([0, 1, 2], DocBoundary(1))
    assert batch.n_padding == 0 and batch.n_targets == 3 * 32
    assert (batch.position_ids[batch.input_ids == 1] == 0).all()
    assert data.make_batch([0], None).position_ids is None
    padded = build_train_data(tiny_data / "tokens", DataConfig(dir=str(tiny_data), seq_len=32, packing="pad_longest"),
                              SPECIAL)
    assert isinstance(padded, PaddedDocs) and len(padded) > len(data) / 2
    with pytest.raises(UserError, match="no pad id"):
        build_train_data(tiny_data / "tokens", DataConfig(packing="pad_multiple"), {**SPECIAL, "pad": None})
