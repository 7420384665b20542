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


def stream_blocks(tokens: np.ndarray, seq_len: int, stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into windows of seq_len inputs starting every `stride` tokens, such
    that every token after the first is a target exactly once. Returns (inputs, targets), both
    (n, seq_len) int64; targets scored by an earlier window, and padding after the end, are
    IGNORE_INDEX (padded inputs are 0).

    stride = seq_len (default) gives disjoint blocks: the first tokens of each block see little
    context. A smaller stride gives every scored token at least seq_len - stride tokens of
    context, at seq_len / stride times the compute.
    """
    stride = stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len, got {stride}")
    n_targets = len(tokens) - 1
    starts = range(0, max(n_targets - seq_len, 0) + stride, stride) if n_targets > 0 else [0]
    inputs = np.zeros((len(starts), seq_len), dtype=np.int64)
    targets = np.full((len(starts), seq_len), IGNORE_INDEX, dtype=np.int64)
    scored_upto = 0  # absolute index of the last target already scored (index 0 never is one)
    for r, start in enumerate(starts):
        chunk = np.asarray(tokens[start : start + seq_len + 1], dtype=np.int64)
        inputs[r, : len(chunk) - 1] = chunk[:-1]
        skip = max(scored_upto - start, 0)  # leading targets an earlier window already scored
        targets[r, skip : len(chunk) - 1] = chunk[skip + 1 :]
        scored_upto = max(scored_upto, start + len(chunk) - 1)
    return inputs, targets


def evaluate_stream(model, tokens: np.ndarray, seq_len: int, batch_size: int, device,
                    autocast=None, stride: int | None = None, progress: bool = False,
                    bos_id: int | None = None) -> dict[str, float]:
    """Sum of target-token cross-entropy (nats), target count and correct argmax count.

    Single process: every rank that calls it evaluates the whole stream. `autocast` is a
    context manager factory (e.g. `accelerator.autocast`) or None. `progress` shows a bar.
    With `bos_id`, position ids restart at each document (attention stays within it), as in
    training with data.doc_mask.
    """
    import torch

    from lib.data import doc_position_ids

    all_inputs, all_targets = stream_blocks(np.asarray(tokens), seq_len, stride)
    loss_sum, n_targets, n_correct = 0.0, 0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        starts = range(0, len(all_inputs), batch_size)
        if progress:
            from lib.progress import progress as bar

            starts = bar(starts, desc="eval", unit="batch")
        for start in starts:
            inputs = torch.from_numpy(all_inputs[start : start + batch_size]).to(device)
            targets = torch.from_numpy(all_targets[start : start + batch_size]).to(device)
            kwargs = {}
            if bos_id is not None:
                kwargs["position_ids"] = torch.from_numpy(doc_position_ids(all_inputs[start : start + batch_size],
                                                                           bos_id)).to(device)
            with (autocast() if autocast else nullcontext()):
                logits = model(input_ids=inputs, use_cache=False, **kwargs).logits
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
