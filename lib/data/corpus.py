"""Raw text -> normalized JSONL records in shards, with a content-hashed manifest.

The built-in corpus is the standard library source of the Python running this code: every
machine has it and nothing is downloaded. Local files and saved `datasets` datasets are read
through lib/data/sources.py. A record is `{"id", "text", "source"}`, plus `"line"` for records that
are one line (jsonl) or row (parquet) of a file. The held-out split is chosen by a hash of each
record id (a file's relative path, or path:line), so it never depends on order, on the number
of files or on a seed. The manifest records the sha256 of every raw input, the normalization,
what was skipped and why, and every shard's sha256. Rebuilding gives byte-identical output.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import sysconfig
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from lib.errors import UserError
from lib.files import atomic_folder, canonical_hash, read_json, sha256_file, write_json
from lib.data.sources import (ANY_SUFFIX, ChatText, InputFile, RecordReader, expand_inputs, hash_inputs,
                              is_saved_dataset)

MANIFEST = "manifest.json"
MANIFEST_KEYS = {  # what every reader of a manifest relies on
    "corpus": ("splits", "content_hash"),
    "tokens": ("splits", "content_hash", "vocab_size", "special_ids", "tokenizer_sha256", "corpus_content_hash",
               "corpus_dir", "tokenizer_dir"),
}
# Test suites ship deliberately odd files (bad encodings, huge generated data); library code is
# what we want the model to learn.
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@dataclass
class NormalizeConfig:
    """How raw text is normalized before anything else sees it (recorded in the manifest)."""

    unicode: Literal["none", "NFC", "NFKC"] = "none"
    newlines: Literal["lf", "keep"] = "lf"
    """lf: CRLF and lone CR become LF."""
    strip: bool = False
    """Strip leading and trailing whitespace of each record."""


@dataclass
class CorpusConfig:
    """Where raw text comes from, how it is normalized, split and sharded."""

    source: str = "stdlib"
    """'stdlib' (this interpreter's standard library sources); or files, directories and globs of
    .py (a document per file), .txt/.md (documents per text_docs), .jsonl (a record per line),
    .json (an array of records, or one per line) and .parquet (a record per row), comma-separated;
    or a folder written by datasets' save_to_disk."""
    format: Literal["auto", "text", "messages", "sharegpt", "prompt_completion", "alpaca", "preference"] = "auto"
    """The layout of records (jsonl, json, parquet, datasets), each read without conversion:
    text {"text": ...} (trained on whole); and, as conversations whose answers alone are trained
    on, messages {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}, sharegpt
    {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}, prompt_completion
    {"prompt", "completion"} and alpaca {"instruction", "input", "output"} (an empty input is
    left out of the prompt); each may carry a top-level "system" string; and preference pairs,
    {"prompt", "chosen", "rejected"} as strings, or "chosen" and "rejected" lists of turns sharing
    all but their last (a "prompt" list of turns before them may be given apart), each pair two
    conversations kept together in one split. auto: each record by its fields, pairs first, then
    the order above."""
    text_field: str = "text"
    """The field holding the text (jsonl, parquet, datasets)."""
    template: Optional[str] = None
    """Build the text from fields instead: '{title}\\n\\n{body}'. \\n and \\t are a newline and a
    tab (as typed in bash's single quotes; a YAML string may hold real ones), \\\\ a backslash;
    square brackets around a part with a field leave it out when that field is empty or missing,
    '{instruction}[\\n\\n{input}]'; brackets around no field, or written \\[ \\], are plain text;
    a literal brace is doubled."""
    completion_field: Optional[str] = None
    """With a template: the field holding the answer. The template's text becomes the user's
    message and this field the assistant's, the only text trained on (an instruction dataset:
    --corpus.template '{instruction}[\\n\\n{input}]' --corpus.completion_field output, which is
    also what --corpus.format alpaca does)."""
    loader: Optional[str] = None
    """Read `source` through datasets.load_dataset(LOADER, data_files=..., streaming=True): a
    builder name (json, csv, parquet, text) or a local dataset folder. Any file suffix."""
    dataset_split: Optional[str] = None
    """The split to read from a saved DatasetDict (or from the loader; default train)."""
    on_bad_record: Literal["error", "skip"] = "error"
    """Malformed JSON, a missing field, a non-string text, an empty file: stop, or skip and count."""
    on_bad_utf8: Literal["error", "skip", "replace"] = "error"
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    text_docs: Literal["auto", "file", "paragraphs", "chunks"] = "auto"
    """How a plain-text file (.txt, .md) becomes documents: 'file', the whole file; 'paragraphs',
    one per paragraph (text up to a blank line); 'chunks', runs of whole paragraphs of about
    chunk_bytes each (a longer paragraph is cut at line ends); 'auto', chunks for a file larger
    than chunk_bytes, else the file. One large file (a book, a log) thus gets a held-out share."""
    chunk_bytes: int = 8000
    """Size of a 'chunks' document, in UTF-8 bytes (about; cuts fall on paragraph or line ends)."""
    val_per_mille: int = 20
    """Held-out share, in 1/1000 of documents, chosen by the sha256 of each document id
    (the file's relative path, or path:line). Should no document fall in it (and the share is not
    0), the one whose hash is lowest is held out, so a small corpus still has a held-out split."""
    split_by: Literal["document", "file"] = "document"
    """What the held-out split is drawn by: each document's id, or the file it came from (all of a
    file's records on one side: held-out data from sources the model never saw, e.g. modules)."""
    val_min_bytes: int = 100_000
    """Floor of the held-out split, in bytes of text: a smaller one gives figures (the model's and
    the compressors' bits per byte) too noisy to compare, so the share is raised a tenth of a
    percent at a time, up to val_max_per_mille, until the split holds this much (and val_min_docs)."""
    val_min_docs: int = 10
    """Floor of the held-out split, in documents (see val_min_bytes)."""
    val_max_per_mille: int = 100
    """The most the floors may raise the held-out share to, in 1/1000 of documents."""
    max_files: Optional[int] = None
    """Keep only the first N files in sorted path order (toy runs)."""
    shard_bytes: int = 4_000_000
    """Start a new JSONL shard once a shard holds this many bytes of text."""


def stdlib_root() -> Path:
    """The folder holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path, suffixes=(".py",), skip_dirs=STDLIB_SKIP_DIRS) -> list[str]:
    """Relative POSIX paths of files under `root` with one of `suffixes`, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(suffixes):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def bucket_of(doc_id: str) -> int:
    """0..999 from the sha256 of a document id alone (its relative path, or path:line)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % 1000


def split_of(doc_id: str, val_per_mille: int) -> str:
    """'val' or 'train' for a document, from the sha256 of its id alone."""
    return "val" if bucket_of(doc_id) < val_per_mille else "train"


TEXT_SUFFIXES = (".txt", ".md")


def _cut_line(line: str, chunk_bytes: int) -> list[str]:
    """`line` in consecutive pieces of at most about `chunk_bytes` UTF-8 bytes, each ending after a
    space where there is one in its second half (else cut mid-word): a file of one long line (a
    dump, a minified text) still becomes documents. Joined, they give `line` back."""
    if len(line.encode("utf-8")) <= 2 * chunk_bytes:
        return [line]
    pieces, start = [], 0
    while start < len(line):
        end = start + chunk_bytes  # characters: at most 4 bytes each, so at most 4 chunk_bytes bytes
        while end < len(line) and len(line[start:end].encode("utf-8")) > chunk_bytes:
            end = start + max(1, (end - start) // 2)
        if end < len(line):
            space = line.rfind(" ", start + (end - start) // 2, end)
            end = space + 1 if space >= 0 else end
        pieces.append(line[start:end])
        start = end
    return pieces


def text_documents(text: str, mode: str, chunk_bytes: int) -> list[tuple[int, str]]:
    """(first line number, text) of each document of a plain-text file (see CorpusConfig.text_docs).
    The pieces are consecutive slices of `text`: joined they give it back exactly."""
    if mode == "file" or (mode == "auto" and len(text.encode("utf-8")) <= chunk_bytes):
        return [(1, text)]
    # paragraphs: each runs to the end of the blank lines that follow it
    pieces, start = [], 0
    for m in re.finditer(r"\n(?:[ \t]*\n)+", text):
        pieces.append(text[start:m.end()])
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    if mode == "chunks" or mode == "auto":
        merged, size = [], 0
        for piece in pieces:
            n = len(piece.encode("utf-8"))
            if n > 2 * chunk_bytes:  # a long paragraph: cut at line ends (a line longer still at spaces)
                lines = [cut for line in piece.splitlines(keepends=True) for cut in _cut_line(line, chunk_bytes)]
                piece_parts, part = [], ""
                for line in lines:
                    if part and len((part + line).encode("utf-8")) > chunk_bytes:
                        piece_parts.append(part)
                        part = ""
                    part += line
                piece_parts.append(part)
            else:
                piece_parts = [piece]
            for part in piece_parts:  # a new document once this one is full enough
                n = len(part.encode("utf-8"))
                if merged and (size + n <= chunk_bytes or size < chunk_bytes // 2):
                    merged[-1] += part
                    size += n
                else:
                    merged.append(part)
                    size = n
        pieces = merged
    out, line = [], 1
    for piece in pieces:
        out.append((line, piece))
        line += piece.count("\n")
    return out


def normalize(text: str, cfg: NormalizeConfig) -> str:
    """Apply the configured normalization; a leading byte-order mark is always dropped."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if cfg.newlines == "lf":
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.unicode != "none":
        text = unicodedata.normalize(cfg.unicode, text)
    if cfg.strip:
        text = text.strip()
    return text


class _ShardWriter:
    def __init__(self, out_dir: Path, split: str, shard_bytes: int):
        self.out_dir, self.split, self.shard_bytes = out_dir, split, shard_bytes
        self.shards: list[dict] = []
        self._f = None

    def _open(self):
        name = f"{self.split}-{len(self.shards):05d}.jsonl"
        self._f = open(self.out_dir / name, "w", encoding="utf-8", newline="\n")
        self.shards.append({"file": name, "records": 0, "text_bytes": 0})

    def write(self, record: dict):
        if self._f is None:
            self._open()
        self._f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        shard = self.shards[-1]
        shard["records"] += 1
        shard["text_bytes"] += len(record["text"].encode("utf-8"))
        if shard["text_bytes"] >= self.shard_bytes:
            self.close()

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def raised_share(cfg: CorpusConfig, val: tuple[int, int], train_by_bucket: list[list[int]]) -> Optional[int]:
    """The held-out share (per mille) that brings the split to its floors (cfg.val_min_bytes and
    val_min_docs), capped at cfg.val_max_per_mille and leaving at least one training document;
    None when the share stays. `val`: (bytes, documents) held out now; `train_by_bucket`: [bytes,
    documents] of the training documents in each of the 1000 hash buckets."""
    share = cfg.val_per_mille
    need = lambda b, d: b < cfg.val_min_bytes or d < cfg.val_min_docs  # noqa: E731
    if not share or not need(*val):
        return None
    train_docs = sum(d for _, d in train_by_bucket)
    (vb, vd), moved = val, 0
    while share < min(cfg.val_max_per_mille, 1000) and need(vb, vd):
        b, d = train_by_bucket[share]
        if moved + d >= train_docs:
            break
        vb, vd, moved, share = vb + b, vd + d, moved + d, share + 1
    return share if moved else None


def split_key(cfg: CorpusConfig, record: dict) -> str:
    """What a record's split is decided by (CorpusConfig.split_by): its id, or its file."""
    return record["source"] if cfg.split_by == "file" else record["id"]


def _records(cfg: CorpusConfig, skipped: Counter, inputs: list, held_out: frozenset = frozenset(),
             share: Optional[int] = None, examples: Optional[dict] = None) -> Iterator[tuple[str, dict]]:
    """(split, record) pairs; fills `inputs` with the hashed raw files, and `skipped` and `examples`
    with what was dropped (counts, and the first of each reason), as side results. Ids in
    `held_out` go to val whatever their hash; `share`: the held-out share (default cfg.val_per_mille)."""
    share = cfg.val_per_mille if share is None else share
    if cfg.source == "stdlib":
        root = stdlib_root()
        files = [InputFile(root / rel, rel) for rel in list_source_files(root)]
        # the built-in corpus tolerates what a library tree holds: empty __init__.py files
        reader = RecordReader(on_bad_record="skip", on_bad_utf8="skip")
    else:
        if is_saved_dataset(cfg.source) and not cfg.loader:
            files = []
        else:
            files = expand_inputs(cfg.source, suffixes=ANY_SUFFIX) if cfg.loader else expand_inputs(cfg.source)
        reader = RecordReader(cfg.text_field, cfg.template, cfg.on_bad_record, cfg.on_bad_utf8, cfg.completion_field,
                              cfg.format)
    if cfg.max_files is not None:
        files = files[: cfg.max_files]
    inputs.extend(hash_inputs(files))
    if cfg.loader:
        stream = reader.read_with_loader(cfg.loader, files, cfg.dataset_split)
    elif not files:
        stream = reader.read_saved_dataset(cfg.source, cfg.dataset_split)
    else:
        stream = (r for f in files for r in reader.read(f))
    def clean(turns: list) -> list:
        return [{"role": m["role"], "content": normalize(m["content"], cfg.normalize)} for m in turns]

    for raw in stream:
        pair = getattr(raw.text, "pair", None)  # a preference pair (lib.data.sources.PairText)
        messages = getattr(raw.text, "messages", None)  # a conversation (lib.data.sources.ChatText)
        if pair is not None or messages is not None:
            if pair is not None:
                chosen, rejected = map(clean, pair)
                record = {"id": raw.id, "text": ChatText.of(chosen), "source": raw.source, "chosen": chosen,
                          "rejected": rejected}
            else:
                messages = clean(messages)
                record = {"id": raw.id, "text": ChatText.of(messages), "source": raw.source, "messages": messages}
            if raw.line is not None:
                record["line"] = raw.line
            key = split_key(cfg, record)
            yield "val" if key in held_out else split_of(key, share), record
            continue
        text = normalize(raw.text, cfg.normalize)
        if raw.line is None and raw.source.endswith(TEXT_SUFFIXES) and cfg.source != "stdlib":
            docs = text_documents(text, cfg.text_docs, cfg.chunk_bytes)
            parts = [(f"{raw.id}:{line}" if len(docs) > 1 else raw.id, line if len(docs) > 1 else None, piece)
                     for line, piece in docs]
        else:
            parts = [(raw.id, raw.line, text)]
        for doc_id, line, piece in parts:
            if not piece.strip():
                skipped["blank_text"] += 1
                continue
            record = {"id": doc_id, "text": piece, "source": raw.source}
            if line is not None:
                record["line"] = line
            key = split_key(cfg, record)
            yield "val" if key in held_out else split_of(key, share), record
    skipped.update(reader.counts)
    if examples is not None:
        examples.update(reader.first)


def build_corpus(cfg: CorpusConfig, out_dir: str | Path) -> dict:
    """Write `out_dir/{train,val}-NNNNN.jsonl` and `out_dir/manifest.json`; return the manifest.

    Built in a temporary sibling folder and renamed into place (lib/files.atomic_folder), so a
    crash never leaves a half-written corpus behind a manifest. When the new manifest equals the
    existing one the existing folder is kept untouched (same content hash: nothing to redo
    downstream).
    """
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as build:
        tmp = build.path
        held_out: frozenset = frozenset()
        share = cfg.val_per_mille
        while True:
            skipped: Counter = Counter()
            examples: dict = {}
            inputs: list[dict] = []
            writers = {s: _ShardWriter(tmp, s, cfg.shard_bytes) for s in ("train", "val")}
            lowest, lowest_bucket = None, 1000  # the train document whose hash is lowest: held out if no other is
            by_bucket = [[0, 0] for _ in range(1000)]  # training [bytes, documents] per hash bucket
            conversations = pairs = 0
            try:
                for split, record in _records(cfg, skipped, inputs, held_out, share, examples):
                    writers[split].write(record)
                    conversations += "messages" in record or "chosen" in record
                    pairs += "chosen" in record
                    if split == "train":
                        bucket = bucket_of(split_key(cfg, record))
                        by_bucket[bucket][0] += len(record["text"].encode("utf-8"))
                        by_bucket[bucket][1] += 1
                        if bucket < lowest_bucket:
                            lowest, lowest_bucket = split_key(cfg, record), bucket
            finally:
                for w in writers.values():
                    w.close()
            val = (sum(s["text_bytes"] for s in writers["val"].shards), sum(s["records"] for s in writers["val"].shards))
            raised = raised_share(cfg, val, by_bucket) if share == cfg.val_per_mille else None
            if raised is None and (writers["val"].shards or held_out or not share
                                   or sum(s["records"] for s in writers["train"].shards) < 2):
                break
            if raised is not None:  # too little held out: write it again with a larger share
                share = raised
            else:
                held_out = frozenset([lowest])  # a small corpus: write it again with that one held out
            for p in tmp.iterdir():
                p.unlink()
        splits = {}
        for split, w in writers.items():
            if not w.shards and sum(skipped.values()) and not any(x.shards for x in writers.values()):
                kinds = ", ".join(f"{n} {kind}" for kind, n in skipped.most_common())
                top = skipped.most_common(1)[0][0]
                raise UserError(f"corpus: every record was skipped ({kinds}); the first: {examples.get(top, top)}")
            if not w.shards:
                dropped = f" ({sum(skipped.values())} record(s) were skipped: {dict(skipped)})" if skipped else ""
                raise UserError(
                    f"corpus: the {split} split is empty{dropped}; raise corpus.val_per_mille or corpus.max_files, "
                    "or give more documents (a text file becomes several with --corpus.text_docs chunks)"
                )
            for shard in w.shards:
                shard["sha256"] = sha256_file(tmp / shard["file"])
            splits[split] = {
                "shards": w.shards,
                "records": sum(s["records"] for s in w.shards),
                "text_bytes": sum(s["text_bytes"] for s in w.shards),
            }
        manifest = {
            "kind": "corpus",
            "source": "stdlib" if cfg.source == "stdlib" else str(cfg.source),
            "python": platform.python_version() if cfg.source == "stdlib" else None,
            "settings": dataclasses.asdict(cfg),
            "normalization": dataclasses.asdict(cfg.normalize),
            "skipped": dict(sorted(skipped.items())),
            "skipped_first": dict(sorted(examples.items())),
            "held_out_by_rule": sorted(held_out),
            "val_per_mille_used": share,
            "conversations": conversations,
            "pairs": pairs,
            "inputs": inputs,
            "splits": splits,
        }
        manifest["content_hash"] = canonical_hash(
            {s: [sh["sha256"] for sh in v["shards"]] for s, v in splits.items()}
        )
        write_json(tmp / MANIFEST, manifest)
        old = out_dir / MANIFEST
        if old.is_file() and old.read_bytes() == (tmp / MANIFEST).read_bytes():
            build.discard()
    return manifest


def read_manifest(data_dir: str | Path, kind: str) -> dict:
    """Load `data_dir/manifest.json` and check it is of `kind`, with a clear error if not."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found: build it first (make tokenize)")
    manifest = read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        found = manifest.get("kind") if isinstance(manifest, dict) else type(manifest).__name__
        raise UserError(f"{path} is a {found!r} manifest, expected {kind!r}")
    if kind == "tokens" and "sp_model_sha256" in manifest:  # written before tokenizers other than SentencePiece
        manifest.setdefault("tokenizer_sha256", manifest["sp_model_sha256"])
    missing = [k for k in MANIFEST_KEYS[kind] if k not in manifest]
    if missing or not isinstance(manifest["splits"], dict) or not all(
            isinstance(v, dict) and isinstance(v.get("shards"), list) for v in manifest["splits"].values()):
        raise UserError(f"{path} is corrupt ({'no ' + ', '.join(missing) if missing else 'malformed splits'}); "
                        "rebuild it (scripts/tokenize.py --force)")
    return manifest


def iter_records(corpus_dir: str | Path, split: str) -> Iterable[dict]:
    """Yield the records of one split in shard order."""
    corpus_dir = Path(corpus_dir)
    manifest = read_manifest(corpus_dir, "corpus")
    for shard in manifest["splits"][split]["shards"]:
        yield from iter_shard(corpus_dir / shard["file"])


def iter_shard(path: str | Path) -> Iterable[dict]:
    """Yield the records of one JSONL shard."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def iter_source(cfg: CorpusConfig) -> Iterator[dict]:
    """Normalized records of a source, both splits, without writing anything."""
    for _, record in _records(cfg, Counter(), []):
        yield record
