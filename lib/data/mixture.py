"""Several tokenized datasets trained on as one weighted mixture (train.py --data.mix).

A mixture names dataset folders with weights, `data/stdlib:0.7,data/book:0.3`. A weight is a share
of the training tokens, not of records or documents: the weights are scaled to add up to 1, and
every row of every micro-batch is a packed block of seq_len tokens, so a source given 0.3 supplies
30% of the rows and of the tokens however long its documents are.

Which source fills each row is decided by a schedule with no randomness in it: at every row, the
source furthest behind its share takes it (the lowest-numbered one on a tie). Each source's count
of rows so far is then always within one row of its share, over any stretch of training and not
only on average. Within a source, blocks come in a seeded permutation per pass over it (seeded with
the run's seed, the source's number and the pass), so a source that is repeated is reshuffled each
time, and the whole draw is a function of the seed and the rows taken: a resumed run continues it
exactly.

All sources must be encoded with one tokenizer (their manifests' tokenizer_sha256 agree); plain
text and conversations (answer-only loss masks) mix freely.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from lib.data.batches import Batch, DocBoundary, TokenBlocks
from lib.errors import UserError

OPTION = "--data.mix"
# repeating a source beyond this many passes adds little over fewer passes (data-constrained
# scaling studies find repeated tokens lose most of their value past about 16 epochs)
MANY_PASSES = 16


@dataclass(frozen=True)
class Source:
    dir: Path  # the dataset folder (tokenize.py's --out_dir)
    weight: float  # share of the training tokens; the weights of a mixture add up to 1
    name: str  # its label in metrics: val_bits_per_byte_<name>


def parse_mix(spec: Sequence[str]) -> list[Source]:
    """The sources of `--data.mix` as given: items `DIR:WEIGHT`, comma-separated or as separate
    values (a YAML list); weights normalized. A UserError names the item at fault."""
    items = [part.strip() for entry in spec for part in str(entry).split(",") if part.strip()]
    dirs, weights = [], []
    for item in items:
        where, colon, weight = item.rpartition(":")
        if not colon or not where:
            raise UserError(f"{OPTION} {item!r}: give each source as DIR:WEIGHT, e.g. {OPTION} data/stdlib:0.7,data/book:0.3")
        try:
            w = float(weight)
        except ValueError:
            raise UserError(f"{OPTION} {item!r}: the weight {weight!r} is not a number (DIR:WEIGHT, e.g. data/book:0.3)") from None
        if not math.isfinite(w) or w <= 0:
            raise UserError(f"{OPTION} {item!r}: a weight must be above 0 (leave a source out rather than weigh it 0)")
        if Path(where) in dirs:
            raise UserError(f"{OPTION}: {where} is named twice; give each source once, with its whole weight")
        dirs.append(Path(where))
        weights.append(w)
    total = sum(weights)
    return [Source(d, w / total, name) for d, w, name in zip(dirs, weights, _names(dirs))]


def _names(dirs: list[Path]) -> list[str]:
    """Each folder's name as a metrics label (letters, digits, - and _), numbered where two clash."""
    names = [re.sub(r"[^A-Za-z0-9_-]+", "_", d.name or d.resolve().name) or "data" for d in dirs]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_sources(sources: list[Source]) -> list[dict]:
    """Each source's token manifest, after checking that every folder holds a tokenized dataset and
    that all were encoded with one tokenizer (else a UserError naming the odd one and the command
    that re-encodes it)."""
    from lib.data.batches import tokens_dir
    from lib.data.corpus import read_manifest

    manifests = []
    for source in sources:
        if not (tokens_dir(source.dir) / "manifest.json").is_file():
            raise UserError(f"{OPTION}: {source.dir} holds no tokenized dataset (no tokens/manifest.json); build it "
                            f"with python scripts/tokenize.py --corpus.source YOUR_TEXT --out_dir {source.dir} "
                            f"--tokenizer {sources[0].dir / 'tokenizer'}")
        manifests.append(read_manifest(tokens_dir(source.dir), "tokens"))
    first = manifests[0]
    for source, manifest in zip(sources[1:], manifests[1:]):
        if manifest["tokenizer_sha256"] != first["tokenizer_sha256"]:
            raise UserError(
                f"{OPTION}: {source.dir} was encoded with another tokenizer than {sources[0].dir} (sha256 "
                f"{manifest['tokenizer_sha256'][:12]} against {first['tokenizer_sha256'][:12]}); re-encode it with the "
                f"first source's: python scripts/tokenize.py --corpus.source {_recorded_source(source.dir)} "
                f"--tokenizer {sources[0].dir / 'tokenizer'} --out_dir {source.dir} --force")
    return manifests


def _recorded_source(data_dir: Path) -> str:
    """The --corpus.source a dataset folder was built from (its tokenize_config.yaml), else a placeholder."""
    try:
        import yaml

        source = (yaml.safe_load((data_dir / "tokenize_config.yaml").read_text()) or {}).get("corpus", {}).get("source")
    except (OSError, ValueError, AttributeError):
        source = None
    return str(source) if source else "YOUR_TEXT"


def mixture_hash(sources: list[Source], manifests: list[dict]) -> str:
    """One content hash for the mixture: its sources' token hashes with their weights (a checkpoint
    names it; a resume on other data or weights is then refused unless --allow_data_change)."""
    parts = [[m["content_hash"], round(s.weight, 12)] for s, m in zip(sources, manifests)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


class MixedBlocks:
    """The training blocks of several sources; an item is (source number, block number in it)."""

    def __init__(self, parts: list[TokenBlocks]):
        self.parts = parts
        self.n_tokens = sum(p.n_tokens for p in parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def make_batch(self, items, boundary: DocBoundary | None = None) -> Batch:
        """The rows `items` as one Batch, each row built by its own source (its loss mask, if any)."""
        rows = [self.parts[s].make_batch([i], boundary) for s, i in items]
        position_ids = None if rows[0].position_ids is None else np.concatenate([r.position_ids for r in rows])
        return Batch(np.concatenate([r.input_ids for r in rows]), np.concatenate([r.labels for r in rows]),
                     position_ids=position_ids)

    def padding_fraction(self, order, batch_size: int) -> float:
        return 0.0


class MixtureSampler:
    """Seeded batches of (source, block) items in the mixture's shares, split across ranks and
    resumable at any batch (the module docstring has the rule). Every rank follows the schedule
    over all ranks' rows and keeps its own micro-batch of each step's."""

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        self.sizes, self.weights, self.batch_size, self.seed = list(sizes), list(weights), batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.counts = [0] * len(sizes)  # rows taken from each source, over all ranks
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def _order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, source, epoch]))
            cached = self._orders[source] = (epoch, rng.permutation(self.sizes[source]))
        return cached[1]

    def _take(self) -> tuple[int, int]:
        k = sum(self.counts)
        s = max(range(len(self.sizes)), key=lambda i: ((k + 1) * self.weights[i] - self.counts[i], -i))
        j, self.counts[s] = self.counts[s], self.counts[s] + 1
        return s, int(self._order(s, j // self.sizes[s])[j % self.sizes[s]])

    def next_batch(self) -> list[tuple[int, int]]:
        rows = [self._take() for _ in range(self.world_size * self.batch_size)]
        return rows[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]

    def shares(self) -> list[float]:
        """Each source's share of the rows (so of the tokens) taken so far."""
        total = max(sum(self.counts), 1)
        return [c / total for c in self.counts]

    def passes(self) -> list[float]:
        """How many times over each source's blocks the rows taken so far went."""
        return [c / n for c, n in zip(self.counts, self.sizes)]

    def state_dict(self) -> dict:
        return {"counts": list(self.counts), "seed": self.seed, "n_blocks": list(self.sizes),
                "weights": list(self.weights), "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, state: dict, allow_data_change: bool = False) -> None:
        """Continue from a saved position. The seed, batch size, world size and number of sources
        must match, and the weights and sizes too unless the data was knowingly changed."""
        if "counts" not in state:
            raise UserError("cannot resume the data order: the checkpoint was trained on one dataset, not a mixture; "
                            f"resume without {OPTION}, or start a new run")
        keys = ("seed", "batch_size", "world_size") + (() if allow_data_change else ("n_blocks", "weights"))
        for key in keys:
            if state[key] != getattr(self, "sizes" if key == "n_blocks" else key):
                raise UserError(f"cannot resume the data order: checkpoint has {key}={state[key]}, this run has "
                                f"{getattr(self, 'sizes' if key == 'n_blocks' else key)}")
        if len(state["counts"]) != len(self.sizes):
            raise UserError(f"cannot resume the data order: the checkpoint's mixture has {len(state['counts'])} "
                            f"sources, this run's {len(self.sizes)}")
        self.counts = list(state["counts"])


def mixture_figures(by_source: dict[str, dict], weights: dict[str, float]) -> dict:
    """The held-out figures of the mixture as a whole from each source's (lib.model.evaluate.summarize):
    what a stream of text drawn in the mixture's token shares would score. Loss and accuracy are
    the weighted means per token; bits per byte is the weighted loss over the weighted bytes per token."""
    loss = sum(weights[n] * r["loss"] for n, r in by_source.items())
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700)),
           "accuracy": sum(weights[n] * r["accuracy"] for n, r in by_source.items()),
           "tokens": sum(r["tokens"] for r in by_source.values())}
    if all("bits_per_byte" in r for r in by_source.values()):
        bytes_per_token = sum(weights[n] * r["bytes"] / max(r["tokens"], 1) for n, r in by_source.items())
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
        out["bytes"] = sum(r["bytes"] for r in by_source.values())
    return out


def per_source_fields(by_source: dict[str, dict]) -> dict:
    """The metrics fields of each source's figures: val_loss_<name>, val_bits_per_byte_<name>, ..."""
    return {f"val_{k}_{name}": r[k] for name, r in by_source.items()
            for k in ("loss", "bits_per_byte", "accuracy") if k in r}


def describe(sources: list[Source], sizes_tokens: list[int], sizes_blocks: list[int], rows: int,
             at_most: bool = False) -> list[str]:
    """Lines for the log and config.yaml: each source's weight, size, and the passes over it that
    `rows` rows (the planned steps' rows; `at_most`: an upper bound, where a time budget may end the
    run sooner) take; a warning line where a source would be repeated often."""
    lines = []
    for s, tokens, blocks in zip(sources, sizes_tokens, sizes_blocks):
        passes = rows * s.weight / blocks
        lines.append(f"{s.name}: {s.dir}, weight {s.weight:.3f}, {tokens:,} tokens, {'up to' if at_most else 'about'} "
                     f"{passes:.1f} passes")
        if passes > MANY_PASSES:
            lines.append(f"warning: {s.dir} would be repeated {'up to' if at_most else 'about'} {passes:.0f} times "
                         f"(the end of the log counts them): past about {MANY_PASSES} passes repeated tokens teach "
                         "little; add text to it or lower its weight")
    return lines
