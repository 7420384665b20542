"""Token shards on disk -> fixed-length blocks -> a seeded, resumable batch order.

A tokenized dataset folder holds, per split, `.npy` token shards (documents concatenated as
`bos ids eos`) and beside each a `.docs.npy` table of (tokens, text bytes) per document, plus a
manifest with every file's sha256. Blocks are `seq_len + 1` tokens taken with stride `seq_len`,
so every token but the very first is a prediction target exactly once per epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.corpus import read_manifest
from lib.errors import UserError


def _split_entries(data_dir: Path, split: str) -> list[dict]:
    manifest = read_manifest(data_dir, "tokens")
    if split not in manifest["splits"]:
        raise UserError(f"{data_dir}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    return manifest["splits"][split]["shards"]


def load_shards(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """A split's token shards as read-only memory maps in manifest order (nothing is loaded
    into RAM until a block is read)."""
    data_dir = Path(data_dir)
    return [np.load(data_dir / shard["file"], mmap_mode="r") for shard in _split_entries(data_dir, split)]


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of a split as one int64 array, and its (tokens, bytes) per-document table."""
    data_dir = Path(data_dir)
    docs = [np.load(data_dir / shard["docs_file"]) for shard in _split_entries(data_dir, split)]
    return np.concatenate(load_shards(data_dir, split)).astype(np.int64), np.concatenate(docs)


class TokenBlocks:
    """Fixed-length training blocks over one token array or a list of shards.

    Block i of a shard is `shard[i*seq_len : i*seq_len + seq_len + 1]`: inputs are its first
    `seq_len` tokens, targets its last `seq_len`. Blocks never cross a shard boundary, so
    shards can stay memory-mapped on disk; blocks are numbered shard after shard.
    """

    def __init__(self, tokens, seq_len: int, source: str = "data"):
        self.shards = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        self.seq_len = seq_len
        per_shard = [max(0, (len(t) - 1) // seq_len) for t in self.shards]
        self._starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.n_blocks = int(self._starts[-1])
        self.n_tokens = sum(len(t) for t in self.shards)
        if self.n_blocks < 1:
            raise UserError(
                f"{source}: no shard holds one block of seq_len={seq_len}+1 tokens "
                f"({self.n_tokens} tokens in all); use a smaller seq_len or more data"
            )

    def __len__(self) -> int:
        return self.n_blocks

    def batch(self, indices) -> np.ndarray:
        """Blocks `indices` stacked into an int64 array of shape (len(indices), seq_len + 1)."""
        L = self.seq_len
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows = []
        for i, s in zip(indices, shard_of):
            j = int(i - self._starts[s])
            rows.append(self.shards[s][j * L : j * L + L + 1])
        return np.stack(rows).astype(np.int64)


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0
    """Batches already taken in this epoch (by this rank)."""


class BlockSampler:
    """Seeded batches of block indices, split across ranks, resumable at any batch.

    The order of epoch e is a permutation drawn from its own generator seeded with
    (seed, e), so it depends on nothing else: not on earlier draws, workers, or the global
    torch random state. Rank r takes every world_size-th block of that order. Incomplete
    batches at the end of an epoch are dropped, so every rank sees the same number of batches.
    """

    def __init__(self, n_blocks: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = n_blocks // world_size // batch_size
        if self.batches_per_epoch < 1:
            raise UserError(
                f"{n_blocks} blocks cannot fill one batch of micro_batch_size={batch_size} on "
                f"{world_size} process(es); lower micro_batch_size or seq_len"
            )
        self.state = SamplerState()
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """This rank's block order for `epoch`."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._cached = (epoch, rng.permutation(self.n_blocks)[self.rank :: self.world_size])
        return self._cached[1]

    def next_batch(self) -> list[int]:
        """The next batch of block indices, advancing (and wrapping) the epoch as needed."""
        if self.state.position >= self.batches_per_epoch:
            self.state = SamplerState(epoch=self.state.epoch + 1, position=0)
        order = self.epoch_order(self.state.epoch)
        start = self.state.position * self.batch_size
        self.state.position += 1
        return order[start : start + self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position,
                "seed": self.seed, "n_blocks": self.n_blocks, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue from a saved position. The seed, batch size and world size must match, and
        the number of blocks too unless the data was knowingly changed."""
        keys = ("seed", "batch_size", "world_size") + (() if allow_data_change else ("n_blocks",))
        for key in keys:
            if state[key] != getattr(self, key):
                raise UserError(
                    f"cannot resume the data order: checkpoint has {key}={state[key]}, "
                    f"this run has {getattr(self, key)}"
                )
        self.state = SamplerState(epoch=state["epoch"], position=state["position"])


@dataclass
class DataConfig:
    """Which tokenized dataset to train on and how it is cut into blocks."""

    dir: str = "data/stdlib"
    """A folder written by scripts/tokenize.py (holding tokens/ and tokenizer/)."""
    seq_len: int = 256
    """Tokens per training sequence."""


def tokens_dir(data_dir: str | Path) -> Path:
    """The token shard folder of a tokenized dataset folder (or the folder itself)."""
    data_dir = Path(data_dir)
    return data_dir / "tokens" if (data_dir / "tokens").is_dir() else data_dir


def prefix_docs(docs: np.ndarray, min_tokens: int | None) -> tuple[int, int]:
    """(tokens, text bytes) of the fewest whole leading documents holding at least min_tokens
    tokens (all documents when there are fewer, or when min_tokens is None).

    Whole documents keep bits per byte exact: the bytes counted are exactly the text scored.
    """
    if min_tokens is None:
        return int(docs[:, 0].sum()), int(docs[:, 1].sum())
    cum = np.cumsum(docs[:, 0])
    k = min(len(cum), int(np.searchsorted(cum, min_tokens, side="left")) + 1)
    return int(cum[k - 1]), int(docs[:k, 1].sum())
