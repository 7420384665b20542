"""Token shards on disk -> training batches in a seeded, resumable order.

A tokenized dataset folder holds, per split, `.npy` token shards (documents concatenated as
`bos ids eos`) and beside each a `.docs.npy` table of (tokens, text bytes) per document, plus a
manifest with every file's sha256.

Three ways to make batches (`DataConfig.packing`):
- pack: documents stay concatenated and are cut into blocks of `seq_len + 1` tokens taken with
  stride `seq_len`, so every token but a shard's first is a prediction target exactly once per
  epoch and no compute goes to padding. With `doc_mask`, position ids restart at every bos (for
  a tokenizer without one, after every eos), which makes transformers' Llama and GPT-2 attend
  only within a document (it derives a block-diagonal causal mask from the position ids).
- pad_longest: one document per row (longer ones cut into `seq_len + 1`-token pieces), the batch
  padded to its longest row; padding is masked out of attention and loss.
- pad_multiple: the same, the width rounded up to a multiple of `pad_multiple` (friendlier to
  GPU kernels, at the price of more padding).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lib.data.corpus import read_manifest
from lib.errors import UserError
from lib.model.loss import IGNORE_INDEX


def _split_entries(data_dir: Path, split: str) -> list[dict]:
    manifest = read_manifest(data_dir, "tokens")
    if split not in manifest["splits"]:
        raise UserError(f"{data_dir}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    return manifest["splits"][split]["shards"]


def _inside(folder: Path, name: str, within: Path | None = None) -> Path | None:
    """`folder / name` when it stays inside `within` (default: `folder`; no absolute path, no `..`
    out of it), else None."""
    path = (folder / name).resolve()
    return path if path.is_relative_to((within or folder).resolve()) else None


def shard_problems(tok_dir: str | Path, manifest: dict, splits=None, first_only: bool = False) -> list[tuple[str, str]]:
    """(file as the manifest names it, what is wrong with it: "is missing", "holds token id ...") for each token shard, document table and loss
    mask of `splits` (default: all) that is named outside `tok_dir`, missing, of another sha256
    than the manifest records, unreadable as an array, or (token shards) holding an id outside
    the vocabulary; the corpus and tokenizer folders must lie within the dataset folder. Empty
    when every file is what tokenize.py wrote. Reads every byte once (about as fast as the disk)."""
    from lib.files import sha256_file

    tok_dir = Path(tok_dir)
    found = []
    for key in ("corpus_dir", "tokenizer_dir"):
        if isinstance(manifest.get(key), str) and _inside(tok_dir, manifest[key], tok_dir.parent) is None:
            found.append((manifest[key], f"is named by {key} outside the dataset folder {tok_dir.parent}"))
    for split in splits or list(manifest["splits"]):
        for entry in manifest["splits"].get(split, {}).get("shards", []):
            for name_key, sha_key in (("file", "sha256"), ("docs_file", "docs_sha256"), ("mask_file", "mask_sha256")):
                name = entry.get(name_key)
                if name is None and name_key == "mask_file":
                    continue
                path = _inside(tok_dir, name) if isinstance(name, str) else None
                why = (f"is named outside {tok_dir}" if path is None else "is missing" if not path.is_file() else
                       "is corrupt (sha256 mismatch)" if sha256_file(path) != entry.get(sha_key) else None)
                if why is None:
                    try:
                        arr = np.load(path, mmap_mode="r")
                    except (ValueError, OSError) as exc:
                        why = f"is unreadable as an array ({exc})"
                    else:
                        top = int(arr.max()) if name_key == "file" and arr.size else -1
                        if top >= manifest["vocab_size"]:
                            why = f"holds token id {top}, outside the vocabulary of {manifest['vocab_size']}"
                if why:
                    found.append((str(name), why))
                    if first_only:
                        return found
    return found


def verify_shards(tok_dir: str | Path, manifest: dict, splits, say=print) -> None:
    """Check the files of `splits` as shard_problems does, before they are used: a UserError
    naming the first bad file and the audit that lists them all; the cost said in one line."""
    import time

    tok_dir = Path(tok_dir)
    t = time.perf_counter()
    bad = shard_problems(tok_dir, manifest, splits, first_only=True)
    if bad:
        name, why = bad[0]
        if why.startswith("is named"):
            raise UserError(f"{tok_dir / 'manifest.json'}: {name} {why}: a manifest may only name files in its "
                            "own folder; rebuild the dataset with scripts/tokenize.py --force")
        raise UserError(f"{tok_dir.name}/{name} in {tok_dir.parent} {why}: the token shards are damaged; "
                        f"`python scripts/audit.py --checks data --data {tok_dir.parent}` lists every damaged file, "
                        "and scripts/tokenize.py --force rebuilds them")
    entries = [e for s in splits for e in manifest["splits"].get(s, {}).get("shards", [])]
    size = sum((tok_dir / e[k]).stat().st_size for e in entries for k in ("file", "docs_file", "mask_file") if k in e)
    say(f"token shards verified against the manifest ({', '.join(splits)}): {len(entries)} shard(s), "
        f"{size / 1e6:,.1f} MB in {time.perf_counter() - t:.1f} s")


def load_shards(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """A split's token shards as read-only memory maps in manifest order (nothing is loaded
    into RAM until a block is read)."""
    data_dir = Path(data_dir)
    return [np.load(data_dir / shard["file"], mmap_mode="r") for shard in _split_entries(data_dir, split)]


def load_doc_tables(data_dir: str | Path, split: str) -> list[np.ndarray]:
    """Each shard's (tokens, text bytes) per-document table, in manifest order."""
    data_dir = Path(data_dir)
    return [np.load(data_dir / shard["docs_file"]) for shard in _split_entries(data_dir, split)]


def load_masks(data_dir: str | Path, split: str) -> list[np.ndarray] | None:
    """Each shard's loss mask (1 where a token is a target the loss counts: the assistant's tokens
    of a conversation), memory-mapped, in manifest order; None for data without masks (every
    token counts)."""
    data_dir = Path(data_dir)
    entries = _split_entries(data_dir, split)
    if not all("mask_file" in e for e in entries):
        return None
    return [np.load(data_dir / e["mask_file"], mmap_mode="r") for e in entries]


def masked_targets(targets: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`targets` with IGNORE_INDEX where `mask` (of the same shape) is 0."""
    targets = np.asarray(targets, dtype=np.int64)  # (token shards are uint16: -100 would wrap)
    return targets if mask is None else np.where(np.asarray(mask) == 1, targets, IGNORE_INDEX)


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of a split as one int64 array, and its (tokens, bytes) per-document table."""
    return (np.concatenate(load_shards(data_dir, split)).astype(np.int64),
            np.concatenate(load_doc_tables(data_dir, split)))


@dataclass(frozen=True)
class DocBoundary:
    """Where documents meet in a token stream: each `token` begins one (`begins`: a bos), or each
    ends one and the next begins right after it (a tokenizer without bos: the documents are
    stored `ids eos`)."""

    token: int
    begins: bool = True

    @classmethod
    def of(cls, special_ids: dict) -> "DocBoundary | None":
        """The boundary of data stored by lib/pipeline with these special ids: its bos, else its
        eos, else None (nothing marks where a document ends)."""
        if special_ids.get("bos") is not None:
            return cls(int(special_ids["bos"]))
        if special_ids.get("eos") is not None:
            return cls(int(special_ids["eos"]), begins=False)
        return None


def doc_position_ids(inputs: np.ndarray, boundary: DocBoundary) -> np.ndarray:
    """Each token's position inside its document: counting restarts where a document begins
    (at `boundary`). Tokens before a row's first boundary (the tail of a document begun in an
    earlier block) count from 0."""
    n, width = inputs.shape
    col = np.broadcast_to(np.arange(width), (n, width))
    begins = inputs == boundary.token
    if not boundary.begins:  # the token after each eos begins a document
        begins = np.concatenate([np.zeros((n, 1), bool), begins[:, :-1]], axis=1)
    last_begin = np.maximum.accumulate(np.where(begins, col, 0), axis=1)
    return col - last_begin


@dataclass
class Batch:
    """One micro-batch as numpy arrays: inputs, the targets to score (IGNORE_INDEX where none),
    and, where used, position ids (document restarts) or an attention mask (padding)."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray | None = None
    attention_mask: np.ndarray | None = None

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    @property
    def weight(self) -> int:
        """What the step's loss is a mean over: its target tokens, each counted once (train.py)."""
        return self.n_targets

    @property
    def n_padding(self) -> int:
        return 0 if self.attention_mask is None else int((self.attention_mask == 0).sum())

    def model_inputs(self, device) -> dict:
        """Keyword arguments for a transformers causal LM (no cache: training)."""
        import torch

        out = {"input_ids": torch.from_numpy(self.input_ids).to(device), "use_cache": False}
        for name in ("position_ids", "attention_mask"):
            value = getattr(self, name)
            if value is not None:
                out[name] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
        return out


class TokenBlocks:
    """Fixed-length training blocks over one token array or a list of shards.

    Block i of a shard is `shard[i*seq_len : i*seq_len + seq_len + 1]`: inputs are its first
    `seq_len` tokens, targets its last `seq_len`. Blocks never cross a shard boundary, so
    shards can stay memory-mapped on disk; blocks are numbered shard after shard.
    """

    def __init__(self, tokens, seq_len: int, source: str = "data", masks=None):
        self.shards = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        self.masks = masks  # per shard, 1 where a target counts (lib.data.batches.load_masks); None: all do
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

    def batch(self, indices, arrays=None) -> np.ndarray:
        """Blocks `indices` stacked into an int64 array of shape (len(indices), seq_len + 1) (of
        `arrays`, parallel to the shards, when given: the masks)."""
        L = self.seq_len
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        rows = []
        for i, s in zip(indices, shard_of):
            j = int(i - self._starts[s])
            rows.append((arrays or self.shards)[s][j * L : j * L + L + 1])
        return np.stack(rows).astype(np.int64)

    def make_batch(self, indices, boundary: DocBoundary | None = None) -> Batch:
        """Blocks `indices` as a Batch; with `boundary`, position ids restart at each document."""
        rows = self.batch(indices)
        inputs = rows[:, :-1]
        pos = None if boundary is None else doc_position_ids(inputs, boundary)
        mask = None if self.masks is None else self.batch(indices, self.masks)[:, 1:]
        return Batch(inputs, masked_targets(rows[:, 1:], mask), position_ids=pos)

    def padding_fraction(self, order, batch_size: int) -> float:
        return 0.0


class PaddedDocs:
    """One document per row, padded: the pad_longest and pad_multiple modes.

    A document of n tokens longer than seq_len + 1 is cut into pieces of seq_len + 1 tokens
    overlapping by one (as packed blocks are), so each of its targets is scored exactly once;
    every piece is an item. Rows are right-padded with pad_id; padded positions have attention
    mask 0 and no target.
    """

    def __init__(self, shards, doc_tables, seq_len: int, pad_id: int, multiple: int = 1, source: str = "data",
                 masks=None):
        self.masks = masks  # per shard, 1 where a target counts (load_masks); None: all do
        if pad_id is None:
            raise UserError(f"{source}: the tokenizer has no pad id, which padding needs; use data.packing=pack")
        self.shards, self.seq_len, self.pad_id, self.multiple = list(shards), seq_len, pad_id, max(1, multiple)
        shard_idx, starts, lengths = [], [], []
        for s, table in enumerate(doc_tables):
            doc_len = np.asarray(table[:, 0], dtype=np.int64)
            doc_start = np.concatenate([[0], np.cumsum(doc_len)[:-1]])
            n_pieces = np.maximum(1, -(-(doc_len - 1) // seq_len))  # ceil((n - 1) / seq_len)
            first = np.repeat(doc_start, n_pieces)
            k = np.arange(n_pieces.sum()) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
            end = np.repeat(doc_start + doc_len, n_pieces)
            piece_start = first + k * seq_len
            piece_len = np.minimum(seq_len + 1, end - piece_start)
            keep = piece_len >= 2  # a piece needs an input and a target
            shard_idx.append(np.full(keep.sum(), s))
            starts.append(piece_start[keep])
            lengths.append(piece_len[keep])
        self.shard_idx = np.concatenate(shard_idx) if shard_idx else np.zeros(0, np.int64)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.n_tokens = int(sum(len(t) for t in self.shards))
        if len(self.lengths) < 1:
            raise UserError(f"{source}: no document of at least 2 tokens to train on")

    def __len__(self) -> int:
        return len(self.lengths)

    def width(self, longest_row: int) -> int:
        """Input width of a batch whose longest item has `longest_row` tokens."""
        w = longest_row - 1
        return min(-(-w // self.multiple) * self.multiple, self.seq_len)

    def piece(self, i: int, arrays=None) -> np.ndarray:
        """The tokens of item i (a document or a piece of one), or of `arrays` (the masks) there."""
        start = int(self.starts[i])
        return (arrays or self.shards)[int(self.shard_idx[i])][start : start + int(self.lengths[i])]

    def make_batch(self, indices, boundary: DocBoundary | None = None) -> Batch:
        """Items `indices` as a padded Batch (one document per row: `boundary` changes nothing)."""
        indices = np.asarray(indices)
        width = self.width(int(self.lengths[indices].max()))
        inputs = np.full((len(indices), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        for r, i in enumerate(indices):
            piece = self.piece(i)
            n = len(piece)
            inputs[r, : n - 1] = piece[:-1]
            labels[r, : n - 1] = masked_targets(piece[1:], None if self.masks is None else self.piece(i, self.masks)[1:])
            mask[r, : n - 1] = 1
        return Batch(inputs, labels, attention_mask=mask)

    def padding_fraction(self, order, batch_size: int) -> float:
        """Share of the input positions of the batches `order` makes that are padding."""
        n = len(order) // batch_size * batch_size
        if n == 0:
            return 0.0
        lens = self.lengths[np.asarray(order[:n])].reshape(-1, batch_size) - 1
        widths = np.array([self.width(int(m) + 1) for m in lens.max(axis=1)])
        return float(1 - lens.sum() / (widths.sum() * batch_size))


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
        if "counts" in state:
            raise UserError("cannot resume the data order: the checkpoint was trained on a mixture (--data.mix); "
                            "resume with the same --data.mix, or start a new run")
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
    mix: tuple[str, ...] = ()
    """Train on several such folders at once, DIR:WEIGHT each, comma-separated
    (data/stdlib:0.7,data/book:0.3; in YAML, a list): a weight is a share of the training tokens
    (scaled to add up to 1), every source needs the same tokenizer, and every evaluation scores each
    source's held-out split (eval_tokens each) and the mixture. data.dir becomes the first source.
    Packed blocks only (data.packing pack); lib/data/mixture.py has the sampling rule."""
    seq_len: int = 256
    """Tokens per training sequence."""
    packing: Literal["pack", "pad_longest", "pad_multiple"] = "pack"
    """pack: documents concatenated into full blocks (no padding); pad_longest / pad_multiple:
    one document per row, padded to the batch's longest row / to a multiple of pad_multiple."""
    doc_mask: bool = True
    """With packing=pack: restart position ids at each document (at its bos; after the previous
    eos where the tokenizer has no bos), so that attention stays within it (Llama and GPT-2 in
    transformers build the block-diagonal mask from them)."""
    pad_multiple: int = 64
    """Width multiple for packing=pad_multiple (capped at seq_len)."""


def build_train_data(tok_dir: Path, cfg: DataConfig, special_ids: dict):
    """The training split as TokenBlocks (pack) or PaddedDocs (pad_*), per `cfg`."""
    source = f"{tok_dir} (train)"
    if cfg.pad_multiple < 1:
        raise UserError(f"data.pad_multiple must be at least 1, got {cfg.pad_multiple}")
    masks = load_masks(tok_dir, "train")
    if cfg.packing == "pack":
        return TokenBlocks(load_shards(tok_dir, "train"), cfg.seq_len, source=source, masks=masks)
    multiple = cfg.pad_multiple if cfg.packing == "pad_multiple" else 1
    return PaddedDocs(load_shards(tok_dir, "train"), load_doc_tables(tok_dir, "train"), cfg.seq_len,
                      special_ids.get("pad"), multiple, source=source, masks=masks)


def tokens_dir(data_dir: str | Path) -> Path:
    """The token shard folder of a tokenized dataset folder (or the folder itself)."""
    data_dir = Path(data_dir)
    return data_dir / "tokens" if (data_dir / "tokens").is_dir() else data_dir


def sample_docs(docs: np.ndarray, min_tokens: int | None, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of whole documents drawn at random, with a fixed seed, from across the
    split until they hold at least `min_tokens` tokens; every document when min_tokens is None or
    the split holds no more than that.

    A sample from across the split, not its leading documents: held-out documents come in
    corpus order (files of one package together), and the first ones alone scored 1.65 bits per
    byte where the whole split scored 1.96. Whole documents keep bits per byte exact: the bytes
    counted are exactly the text scored.
    """
    n = len(docs)
    if min_tokens is None or int(docs[:, 0].sum()) <= min_tokens:
        return np.arange(n)
    order = np.random.default_rng(seed).permutation(n)
    k = int(np.searchsorted(np.cumsum(docs[order, 0]), min_tokens, side="left")) + 1
    return np.sort(order[: min(k, n)])


def gather_docs(tokens: np.ndarray, docs: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, int]:
    """(the tokens of the documents at `index`, in that order, as one stream; their text bytes)."""
    ends = np.cumsum(docs[:, 0])
    starts = ends - docs[:, 0]
    parts = [tokens[starts[i]: ends[i]] for i in index]
    stream = np.concatenate(parts) if parts else tokens[:0]
    return stream, int(docs[index, 1].sum())
