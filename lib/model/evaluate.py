"""Held-out evaluation reductions: loss, perplexity, bits per byte, next-token accuracy.

Bits per byte = total cross-entropy in bits / UTF-8 bytes of the text it encodes, which does not
depend on the tokenizer and is directly comparable with a compressor's output size.
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.model.loss import IGNORE_INDEX, token_loss_sum


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte that gzip -9, bz2 -9 and lzma -9e reach on `data`, compressed as one file."""
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bz2": len(bz2.compress(data, compresslevel=9)),
        "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / max(len(data), 1) for name, size in sizes.items()}


def stream_blocks(tokens: np.ndarray, seq_len: int, stride: int | None = None,
                  mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut a token stream into windows of seq_len inputs starting every `stride` tokens, such
    that every token after the first is a target exactly once. Returns (inputs, targets), both
    (n, seq_len) int64; targets scored by an earlier window, and padding after the end, are
    IGNORE_INDEX (padded inputs are 0).

    stride = seq_len (default) gives disjoint blocks: the first tokens of each block see little
    context. A smaller stride gives every scored token at least seq_len - stride tokens of
    context, at seq_len / stride times the compute. `mask` (one per token, 1 where a target
    counts: the assistant's tokens of conversations) leaves the others unscored too.
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
        scored = chunk[skip + 1 :]
        if mask is not None:
            scored = np.where(np.asarray(mask[start + skip + 1 : start + len(chunk)]) == 1, scored, IGNORE_INDEX)
        targets[r, skip : len(chunk) - 1] = scored
        scored_upto = max(scored_upto, start + len(chunk) - 1)
    return inputs, targets


def token_byte_lengths(tokenizer: str | Path) -> np.ndarray:
    """UTF-8 bytes each token id stands for in decoded text; 0 for special tokens. `tokenizer`:
    a SentencePiece model (the file, or a folder holding sp.model) or a Hugging Face tokenizer
    folder. SentencePiece and SentencePiece-style pieces: 1 for a byte piece (<0x0A>), else the
    piece's bytes with U+2581 as a space. Byte-level BPE (GPT-2): one byte per character of
    the token. Exact for this project's tokenizers and byte-level ones; a tokenizer that adds a
    space in front of each text (Llama's) makes them a byte short per document, which is why
    callers check the sum against the split's recorded bytes."""
    from lib.data.tokenizer import tokenizer_source

    path = tokenizer_source(tokenizer)
    if path.is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(path))
        out = np.zeros(sp.get_piece_size(), dtype=np.int64)
        for i in range(len(out)):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    byte_level = "ByteLevel" in repr(hf.backend_tokenizer.decoder) if hasattr(hf, "backend_tokenizer") else False
    special = set(hf.all_special_ids)
    out = np.zeros(len(hf), dtype=np.int64)
    for i, piece in enumerate(hf.convert_ids_to_tokens(list(range(len(hf))))):
        if i in special or piece is None:
            continue
        if byte_level:
            out[i] = len(piece)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out[i] = 1
        else:
            out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out


@dataclass
class HeldOutSample:
    """Windows to evaluate (inputs, targets as stream_blocks makes them), the UTF-8 bytes of
    the text their targets encode, and a description for the log."""

    inputs: np.ndarray
    targets: np.ndarray
    text_bytes: int
    description: str

    def evaluate(self, model, batch_size: int, device, autocast=None, boundary=None, shard=None) -> dict:
        """lib/evaluate.summarize of `model` on every window. `shard`: (this process's index, the
        number of processes, a function summing a list of floats over them) to split the windows
        between processes, each scoring its own contiguous share (the same number of batches on
        each, padded with unscored rows: a sharded model's forward is collective), the sums added
        up before the summary; without it this process scores them all."""
        inputs, targets = self.inputs, self.targets
        if shard is not None and shard[1] > 1:
            rank, world, add_up = shard
            n, per = len(inputs), -(-len(inputs) // world)
            lo, hi = min(rank * per, n), min((rank + 1) * per, n)
            pad = per - (hi - lo)  # rows this process adds so that every process runs as many batches
            inputs = np.concatenate([inputs[lo:hi], np.repeat(self.inputs[:1], pad, axis=0)])
            targets = np.concatenate([targets[lo:hi], np.full((pad, targets.shape[1]), IGNORE_INDEX, targets.dtype)])
        sums = evaluate_blocks(model, inputs, targets, batch_size, device, autocast, boundary=boundary)
        if shard is not None and shard[1] > 1:
            sums = dict(zip(sums, shard[2]([float(v) for v in sums.values()])))
            sums["targets"], sums["correct"] = int(round(sums["targets"])), int(round(sums["correct"]))
        return summarize(sums, self.text_bytes)

    def estimate_seconds(self, model, batch_size: int, device, autocast=None, boundary=None, world: int = 1) -> float:
        """Seconds one `evaluate` takes, from its first batches: the faster of the second and third
        batch (the first ones pay one-off kernel set-up), times the number of batches (of one
        process's share, when `world` processes share the windows)."""
        import time

        batches = -(-(-(-len(self.inputs) // world)) // batch_size)
        times = []
        for k in range(min(3, batches)):
            rows = slice(k * batch_size, (k + 1) * batch_size)
            t = time.perf_counter()
            evaluate_blocks(model, self.inputs[rows], self.targets[rows], batch_size, device, autocast,
                            boundary=boundary)
            times.append(time.perf_counter() - t)
        return min(times[1:] or times) * batches


def spaced(n: int, k: int, seed: int) -> np.ndarray:
    """k of n indices, evenly spaced from a seeded offset: every part of the split (every
    document, in proportion to its size) is in the sample, which a simple random sample of a few
    hundred windows is not."""
    return np.floor((np.arange(k) + np.random.default_rng(seed).random()) * n / k).astype(np.int64)


def held_out_sample(tokens: np.ndarray, docs: np.ndarray, seq_len: int, n_targets: int | None,
                    byte_lengths: np.ndarray | None, seed: int = 0, mask: np.ndarray | None = None) -> HeldOutSample:
    """The windows eval.py scores over the whole split (seq_len tokens every seq_len // 2, each
    scoring the targets no earlier window scored), or a sample of them holding about `n_targets`
    targets, evenly spaced from a seeded offset: an estimate of eval.py's whole-split figure.

    Bits per byte of a sample needs the bytes of the sampled targets: `byte_lengths` per token
    id (token_byte_lengths). If they are missing or do not add up to the split's recorded bytes,
    whole documents are sampled instead (sample_docs), whose bytes are recorded.

    With `mask` (conversations: only the assistant's tokens count), the windows score those
    tokens alone, and the bytes are theirs (from `byte_lengths`; without it, no bits per byte)."""
    from lib.data.batches import gather_docs, sample_docs

    stride = max(1, seq_len // 2)
    if mask is not None:
        inputs, targets = stream_blocks(tokens, seq_len, stride, mask)
        what = "the whole held-out split"
        per_window = max(1.0, float((targets != IGNORE_INDEX).sum(axis=1).mean()))
        if n_targets is not None and (targets != IGNORE_INDEX).sum() > n_targets:
            n = len(inputs)
            k = min(n, int(np.ceil(n_targets / per_window)))
            pick = spaced(n, k, seed)
            inputs, targets, what = inputs[pick], targets[pick], f"{k} of {n} windows of the held-out split"
        n_bytes = int(byte_lengths[targets[targets != IGNORE_INDEX]].sum()) if byte_lengths is not None else None
        return HeldOutSample(inputs, targets, n_bytes, what + ", the assistant's tokens only")
    total_bytes = int(docs[:, 1].sum())
    exact = byte_lengths is not None and int(byte_lengths[tokens].sum()) == total_bytes
    if n_targets is None or len(tokens) - 1 <= n_targets:
        inputs, targets = stream_blocks(tokens, seq_len, stride)
        return HeldOutSample(inputs, targets, total_bytes, "the whole held-out split")
    if not exact:
        index = sample_docs(docs, n_targets, seed)
        stream, n_bytes = gather_docs(tokens, docs, index)
        inputs, targets = stream_blocks(stream, seq_len, stride)
        return HeldOutSample(inputs, targets, n_bytes, f"{len(index)} of {len(docs)} held-out documents")
    inputs, targets = stream_blocks(tokens, seq_len, stride)
    n = len(inputs)
    k = min(n, int(np.ceil(n_targets / (targets != IGNORE_INDEX).sum(axis=1).mean())))
    pick = spaced(n, k, seed)
    inputs, targets = inputs[pick], targets[pick]
    n_bytes = int(byte_lengths[targets[targets != IGNORE_INDEX]].sum())
    return HeldOutSample(inputs, targets, n_bytes, f"{k} of {n} windows, evenly spaced across the held-out split")


def evaluate_stream(model, tokens: np.ndarray, seq_len: int, batch_size: int, device,
                    autocast=None, stride: int | None = None, progress: bool = False,
                    boundary=None, mask: np.ndarray | None = None) -> dict[str, float]:
    """evaluate_blocks over the windows stream_blocks cuts from one token stream (scoring only
    the targets `mask` marks, when given)."""
    inputs, targets = stream_blocks(np.asarray(tokens), seq_len, stride, mask)
    return evaluate_blocks(model, inputs, targets, batch_size, device, autocast, progress, boundary)


def evaluate_blocks(model, all_inputs: np.ndarray, all_targets: np.ndarray, batch_size: int, device,
                    autocast=None, progress: bool = False, boundary=None) -> dict[str, float]:
    """Sum of target-token cross-entropy (nats), target count and correct argmax count over
    rows of inputs and targets (IGNORE_INDEX where nothing is scored).

    Single process: every rank that calls it evaluates every row. `autocast` is a context
    manager factory (e.g. `accelerator.autocast`) or None. `progress` shows a bar. With
    `boundary` (a lib.data.batches.DocBoundary), position ids restart at each document (attention stays
    within it), as in training with data.doc_mask.
    """
    import torch

    from lib.data.batches import doc_position_ids

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
            if boundary is not None:
                kwargs["position_ids"] = torch.from_numpy(doc_position_ids(all_inputs[start : start + batch_size],
                                                                           boundary)).to(device)
            with (autocast() if autocast else nullcontext()):
                logits = model(input_ids=inputs, use_cache=False, **kwargs).logits
            mask = targets != IGNORE_INDEX
            ce, n = token_loss_sum(logits, targets)
            loss_sum += ce.item()
            n_targets += int(n)
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
