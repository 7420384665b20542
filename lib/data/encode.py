"""Encoding text with a tokenizer, in order, over worker processes.

    encode_file(cfg, bar)        a .txt/.jsonl file -> JSONL of ids (padded, truncated) or a .npy
                                 token stream with its per-text table (tokenize.py encode)
    encode_shards(tok, files)    corpus shards -> each shard's packed `bos ids eos` documents
                                 (the tokenize pipeline's token stage)

Work is cut into batches that ordered_map (lib/data/parallel.py) hands to one process per core; each
worker keeps its own tokenizer, inherited from the parent when the worker is forked (the
tokenizer is set with `use` before the pool starts) or loaded once when it is spawned.
"""
from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path
from typing import Iterator, Optional

from lib.errors import UserError, json_error

_tokenizer = None  # this process's TextTokenizer: the parent's (inherited by forked workers) or a worker's own


def use(tok) -> None:
    """Make `tok` this process's tokenizer (before starting workers, which inherit it by fork)."""
    global _tokenizer
    _tokenizer = tok


def init_worker(path: Path, pad_token: Optional[str], threads: Optional[int] = None) -> None:
    """Worker start-up: load the tokenizer unless the worker inherited it with the fork."""
    if _tokenizer is None:  # a spawned (not forked) worker
        from lib.data.tokenizer import TextTokenizer

        use(TextTokenizer(path, pad_token))
        _tokenizer.set_threads(threads)


def read_batches(path: Path, batch_size: int, max_bytes: Optional[int] = None, on_bytes=None):
    """(first line number, raw lines) of `path` in batches of batch_size non-blank lines (every
    line for .txt), or fewer once they hold max_bytes; `on_bytes(n)` is told how many bytes were
    read. Lines are decoded and parsed by whoever encodes them, so that reading stays cheap."""
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    jsonl = path.suffix == ".jsonl"
    with open(path, "rb") as f:
        first, lines, taken, size = 1, [], 0, 0
        for lineno, line in enumerate(f, start=1):
            if not lines:
                first = lineno
            lines.append(line)
            taken += not jsonl or bool(line.strip())
            size += len(line)
            if taken >= batch_size or (max_bytes and size >= max_bytes):
                if on_bytes:
                    on_bytes(size)
                yield first, lines
                lines, taken, size = [], 0, 0
        if lines:
            if on_bytes:
                on_bytes(size)
            yield first, lines


def parse_texts(path: Path, first: int, lines: list[bytes], text_field: str) -> list[str]:
    """The texts of raw lines from `path` (starting at line `first`): each .jsonl line's
    text_field, or each .txt line; errors name the file and line."""
    texts = []
    for lineno, raw in enumerate(lines, start=first):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not UTF-8 (byte {exc.start} of the line)") from None
        if path.suffix != ".jsonl":
            texts.append(line[:-1] if line.endswith("\n") else line)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: malformed JSON ({json_error(exc)})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(f"{path}:{lineno}: no string field {text_field!r}")
        texts.append(obj[text_field])
    return texts


def docs_path(output: Path) -> Path:
    """The (tokens, text bytes) per-text table beside a .npy token stream: X.docs.npy."""
    return output.with_suffix(".docs.npy")


def _ones_json(n: int) -> str:
    """json.dumps([1] * n), without the list."""
    return "[" + "1, " * (n - 1) + "1]" if n else "[]"


def _jsonl_batch(task) -> tuple[str, int, int, int, int]:
    """One batch: raw lines -> JSONL text of ids and masks, and (texts, ids, padding ids, bytes)."""
    from lib.data.tokenizer import encode_batch

    cfg, first, lines = task
    texts = parse_texts(cfg.input, first, lines, cfg.text_field)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    if cfg.max_length is None and cfg.padding == "none":  # every id kept, nothing padded
        encode_batch(_tokenizer, [], cfg)  # the same option checks
        rows = _tokenizer.encode_id_text(texts, cfg.add_bos, cfg.add_eos)
        out = "".join(f'{{"ids": [{ids}], "attention_mask": {_ones_json(n)}}}\n' for ids, n in rows)
        return out, len(texts), sum(n for _, n in rows), 0, n_bytes
    ids, masks = encode_batch(_tokenizer, texts, cfg)
    out = "".join(f'{{"ids": {json.dumps(x)}, "attention_mask": {json.dumps(m)}}}\n' for x, m in zip(ids, masks))
    n_tokens = sum(map(len, ids))
    return out, len(texts), n_tokens, n_tokens - sum(map(sum, masks)), n_bytes


def _npy_batch(task) -> tuple[tuple[bytes, bytes], int, int, int, int]:
    """One batch: raw lines -> packed ids of every text end to end and the bytes of its
    (tokens, text bytes) rows, and (texts, ids, 0, bytes)."""
    from array import array

    from lib.data.tokenizer import encode_batch, packed_code

    cfg, first, lines = task
    texts = parse_texts(cfg.input, first, lines, cfg.text_field)
    sizes = [len(t.encode("utf-8")) for t in texts]
    if cfg.max_length is None:
        encode_batch(_tokenizer, [], cfg)  # the same option checks
        tokens, counts = _tokenizer.encode_packed(texts, cfg.add_bos, cfg.add_eos)
    else:
        ids, _ = encode_batch(_tokenizer, texts, cfg)
        counts = list(map(len, ids))
        tokens = array(packed_code(_tokenizer.vocab_size), itertools.chain.from_iterable(ids)).tobytes()
    docs = array("q", itertools.chain.from_iterable(zip(counts, sizes))).tobytes()
    return (tokens, docs), len(texts), sum(counts), 0, sum(sizes)


def encode_file(cfg, tok, workers: int, on_bytes=None) -> tuple[int, int, int, int]:
    """Encode cfg.input (.txt: a text per line; .jsonl: cfg.text_field of each line) with `tok` into
    cfg.output: .jsonl rows {"ids", "attention_mask"} (lib/tokenizer.EncodeOptions: special
    tokens, truncation, padding), or a .npy stream of every text's ids with its docs_path table.
    `cfg` holds those options and input, output, text_field, batch_size, pad_token. Written
    atomically (on an error neither output file is left). Returns (texts, ids, padding ids, bytes)."""
    import contextlib

    from lib.files import atomic_npy, atomic_text
    from lib.data.parallel import ordered_map
    from lib.data.tokenizer import encode_batch, packed_code

    encode_batch(tok, [], cfg)  # option errors now, before any work
    npy = cfg.output.suffix == ".npy"
    if npy and cfg.padding != "none":
        raise UserError(f"--output {cfg.output}: a .npy output is one flat stream of every text's ids (indexed by "
                        f"{docs_path(cfg.output).name}), so it takes no --padding; write a .jsonl output to pad")
    if not cfg.input.is_file():
        raise UserError(f"--input {cfg.input}: no such file")
    use(tok)
    if workers > 1:
        tok.set_threads(1)  # (inherited by the forked workers, which keep every core busy already)
    # Batches of batch_size texts; unless they are padded to their longest, also cut at 1 MB so
    # that every worker has work even when a few texts are large.
    max_bytes = None if cfg.padding == "longest" else 1 << 20
    tasks = ((cfg, first, lines) for first, lines in read_batches(cfg.input, cfg.batch_size, max_bytes, on_bytes))
    totals = [0, 0, 0, 0]
    with contextlib.ExitStack() as files:  # on error, neither file is left; the ids file is renamed first
        if npy:
            docs = files.enter_context(atomic_npy(docs_path(cfg.output), "<i8", (2,)))
            out = files.enter_context(atomic_npy(cfg.output, packed_code(tok.vocab_size)))
        else:
            out = files.enter_context(atomic_text(cfg.output))
        for result, *counts in ordered_map(_npy_batch if npy else _jsonl_batch, tasks, workers, init_worker,
                                           (tok.path, cfg.pad_token, tok.threads)):
            if npy:
                out.write(result[0])
                docs.write(result[1])
            else:
                out.write(result)
            totals = [a + b for a, b in zip(totals, counts)]
    return tuple(totals)


def read_npy_docs(path: Path):
    """(ids, docs) of a .npy token stream written by encode_file, checked against each other."""
    import numpy as np

    table = docs_path(path)
    if not table.is_file():
        raise UserError(f"--input {path}: {table} not found beside it (encode writes both)")
    try:
        ids, docs = np.load(path, mmap_mode="r"), np.load(table)
    except (OSError, ValueError) as exc:
        raise UserError(f"--input {path}: not a readable .npy token stream ({exc})") from None
    if ids.ndim != 1 or docs.ndim != 2 or docs.shape[1] != 2 or int(docs[:, 0].sum()) != len(ids):
        raise UserError(f"--input {path}: {table.name} does not index it ({len(ids):,} ids, the table counts "
                        f"{int(docs[:, 0].sum()) if docs.ndim == 2 else '?'}); encode it again")
    return ids, docs


def _pack_documents(texts: list[str]) -> tuple[bytes, list[int], list[int]]:
    """One batch of documents -> their `bos ids eos` packed end to end, the ids and the UTF-8
    bytes of each."""
    tokens, counts = _tokenizer.encode_packed(texts, *_tokenizer.document_ends())
    return tokens, counts, [len(t.encode("utf-8")) for t in texts]


def encode_shards(tok, files: list[Path]) -> Iterator[tuple]:
    """Yield (ids, ids per document, bytes per document) of each corpus shard in turn, documents
    as `bos ids eos` (or as the tokenizer's specials allow: TextTokenizer.document_ends): through
    the word cache in every core's worker (batches of about 1 MB, in order), or the tokenizer's
    own threads for models the cache cannot take."""
    import numpy as np

    from lib.data.corpus import iter_shard
    from lib.data.parallel import default_workers, ordered_map
    from lib.data.tokenizer import packed_code

    dtype = np.dtype(packed_code(tok.vocab_size))
    if not tok.word_cached:
        for path in files:
            texts = [r["text"] for r in iter_shard(path)]
            packed, counts = tok.encode_packed(texts, *tok.document_ends())
            yield (np.frombuffer(packed, dtype), np.array(counts, np.int64),
                   np.array([len(t.encode("utf-8")) for t in texts], np.int64))
        return
    use(tok)
    workers = default_workers()
    if workers > 1:
        tok.set_threads(1)  # (inherited by the forked workers)
    ends = collections.deque()  # for each batch in flight: whether it ends its shard

    def batches():
        for path in files:
            texts = [r["text"] for r in iter_shard(path)]
            start, size = 0, 0
            for i, t in enumerate(texts):
                size += len(t)
                if size >= 1 << 20 or i == len(texts) - 1:
                    ends.append(i == len(texts) - 1)
                    yield texts[start : i + 1]
                    start, size = i + 1, 0
            if not texts:
                ends.append(True)
                yield []

    parts, lengths, sizes = [], [], []
    for packed, n_ids, n_bytes in ordered_map(_pack_documents, batches(), workers, init_worker,
                                              (tok.path, None, tok.threads)):
        parts.append(packed)
        lengths += n_ids
        sizes += n_bytes
        if ends.popleft():
            yield np.frombuffer(b"".join(parts), dtype), np.array(lengths, np.int64), np.array(sizes, np.int64)
            parts, lengths, sizes = [], [], []
