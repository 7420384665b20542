"""Held-out evaluation reductions: loss, perplexity, bits per byte, next-token accuracy.

Bits per byte = total cross-entropy in bits / UTF-8 bytes of the text it encodes, which does not
depend on the tokenizer and is directly comparable with a compressor's output size.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
from contextlib import nullcontext

import numpy as np

from lib.loss import IGNORE_INDEX


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte that gzip -9, bz2 -9 and lzma -9e reach on `data`, compressed as one file."""
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2": len(bz2.compress(data, compresslevel=9)),
        "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / max(len(data), 1) for name, size in sizes.items()}


def stream_blocks(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Cut a token stream into (n, seq_len + 1) rows with stride seq_len, the last one padded
    with IGNORE_INDEX, so every token after the first is a target exactly once."""
    n = max(1, math.ceil((len(tokens) - 1) / seq_len))
    rows = np.full((n, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    for i in range(n):
        chunk = tokens[i * seq_len : i * seq_len + seq_len + 1]
        rows[i, : len(chunk)] = chunk
    return rows


def evaluate_stream(model, tokens: np.ndarray, seq_len: int, batch_size: int, device,
                    autocast=None) -> dict[str, float]:
    """Sum of target-token cross-entropy (nats), target count and correct argmax count.

    Single process: every rank that calls it evaluates the whole stream. `autocast` is a
    context manager factory (e.g. `accelerator.autocast`) or None.
    """
    import torch

    rows = stream_blocks(np.asarray(tokens), seq_len)
    loss_sum, n_targets, n_correct = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = torch.from_numpy(rows[start : start + batch_size]).to(device)
            inputs = batch[:, :-1].clamp(min=0)  # padding positions are never targets
            targets = batch[:, 1:]
            with (autocast() if autocast else nullcontext()):
                logits = model(input_ids=inputs).logits
            mask = targets != IGNORE_INDEX
            ce = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            loss_sum += ce.item()
            n_targets += int(mask.sum())
            n_correct += int(((logits.argmax(-1) == targets) & mask).sum())
    model.train(was_training)
    return {"loss_sum": loss_sum, "targets": n_targets, "correct": n_correct}


def summarize(sums: dict, text_bytes: int | None = None) -> dict[str, float]:
    """loss (nats/token), perplexity, accuracy, and bits per byte when `text_bytes` is known."""
    n = max(sums["targets"], 1)
    loss = sums["loss_sum"] / n
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "accuracy": sums["correct"] / n,
           "tokens": sums["targets"]}
    if text_bytes:
        out["bits_per_byte"] = sums["loss_sum"] / math.log(2) / text_bytes
        out["bytes"] = text_bytes
    return out
