"""Preference pairs as training batches: a tokenized folder whose manifest says `pairs` holds each
pair as two documents side by side (chosen, then rejected: lib.data.chat.encode_documents), with a
loss mask that is 1 on the response's tokens. A batch of pairs is their chosen rows, then their
rejected rows, right-padded to the longest, each with its response mask (the layout trl's
DPOTrainer uses, and lib.model.preference.pair_scores reads).

A row longer than seq_len keeps its first seq_len tokens (the prompt and the start of the answer);
a pair whose response would be cut away entirely in either row is left out, and counted.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.errors import UserError


@dataclass
class PairBatch:
    """[chosen rows; rejected rows] of `n_pairs` pairs: ids, attention mask (1 on real tokens),
    response mask (1 on the tokens each response's log-probability sums over)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    response_mask: np.ndarray
    reference: np.ndarray | None = None  # [pairs, 2]: (chosen, rejected) log-probabilities under the reference

    @property
    def n_pairs(self) -> int:
        return len(self.input_ids) // 2

    @property
    def weight(self) -> int:
        """What the step's loss is a mean over: pairs, each counted once however long (train.py)."""
        return self.n_pairs

    @property
    def n_targets(self) -> int:
        """The response tokens scored (both rows of each pair): what tokens_seen counts."""
        return int(self.response_mask[:, 1:].sum())

    @property
    def n_padding(self) -> int:
        return int((self.attention_mask == 0).sum())

    def model_inputs(self, device) -> dict:
        import torch

        return {"input_ids": torch.from_numpy(self.input_ids).to(device),
                "attention_mask": torch.from_numpy(self.attention_mask).to(device), "use_cache": False}


class PairRows:
    """The pairs of one split of a tokenized folder (see the module docstring)."""

    def __init__(self, tok_dir: str | Path, split: str, seq_len: int, pad_id: int):
        from lib.data.batches import load_masks, load_split

        tok_dir = Path(tok_dir)
        tokens, docs = load_split(tok_dir, split)
        masks = load_masks(tok_dir, split)
        if masks is None or len(docs) % 2:
            raise UserError(f"{tok_dir}: the {split} split is not preference pairs (documents in twos with a loss mask); "
                            "rebuild it with scripts/tokenize.py from chosen/rejected records")
        self.tokens, self.mask = tokens, np.concatenate(masks)
        self.seq_len, self.pad_id = seq_len, pad_id
        lengths = docs[:, 0].astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.lengths = np.minimum(lengths, seq_len)
        # a row keeps its first seq_len tokens: a response needs a token there to be scored
        kept = np.array([self.mask[s: s + n].any() for s, n in zip(self.starts, self.lengths)])
        whole = kept[0::2] & kept[1::2]
        self.pairs = np.flatnonzero(whole)  # the pair numbers trained on
        self.cut = int((~whole).sum())
        self.reference: np.ndarray | None = None  # [len(self), 2], set by train.py: attached to each batch
        self._response_tokens: np.ndarray | None = None
        if not len(self.pairs):
            raise UserError(f"{tok_dir}: every pair's response starts past data.seq_len {seq_len}; raise it")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def n_tokens(self) -> int:
        """Tokens in the kept pairs' rows, both sides."""
        return int(self.lengths[2 * self.pairs].sum() + self.lengths[2 * self.pairs + 1].sum())

    @property
    def description(self) -> str:
        return f"{len(self)} held-out pairs" + (f" ({self.cut} left out: responses past seq_len)" if self.cut else "")

    def response_tokens(self) -> np.ndarray:
        """[pairs, 2]: the tokens each (chosen, rejected) response's log-probability sums over (its
        masked targets within the row's first seq_len tokens)."""
        if self._response_tokens is None:  # every evaluation asks: counted once
            self._response_tokens = np.array([[int(self.row(2 * int(p) + side)[1][1:].sum()) for side in (0, 1)]
                                              for p in self.pairs])
        return self._response_tokens

    def row(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        s, n = int(self.starts[doc]), int(self.lengths[doc])
        return self.tokens[s: s + n], self.mask[s: s + n]

    def make_batch(self, indices, boundary=None) -> PairBatch:
        """Pairs `indices` (positions in self.pairs) as a PairBatch; `boundary` changes nothing (one
        conversation per row)."""
        docs = [2 * int(self.pairs[i]) + side for side in (0, 1) for i in indices]
        rows = [self.row(d) for d in docs]
        width = max(len(ids) for ids, _ in rows)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        response = np.zeros((len(rows), width), dtype=np.int64)
        for r, (row_ids, row_mask) in enumerate(rows):
            ids[r, :len(row_ids)] = row_ids
            attention[r, :len(row_ids)] = 1
            response[r, :len(row_ids)] = row_mask
        reference = None if self.reference is None else self.reference[list(indices)]
        return PairBatch(ids, attention, response, reference)
