#!/usr/bin/env python
"""Corpus -> SentencePiece tokenizer -> token shards, each stage cached on content hashes.

    python scripts/tokenize.py --config configs/tokenize/stdlib.yaml

Writes OUT_DIR/corpus (JSONL shards + manifest), OUT_DIR/tokenizer (sp.model and a Hugging
Face tokenizer with identical ids) and OUT_DIR/tokens (.npy token shards + manifest). A stage
is redone only when what it is built from changed: the corpus bytes, the tokenizer settings,
or the tokenizer model file.
"""
import os
import sys

# Python puts this file's folder first on sys.path, where this very file would shadow the
# standard library's `tokenize` for everything imported after it: use the repo root instead.
_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import dataclasses  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.corpus import (CorpusConfig, build_corpus, canonical_hash, iter_records,  # noqa: E402
                        iter_shard, read_manifest, sha256_file, write_json)
from lib.errors import exit_on_user_error  # noqa: E402
from lib.tokenizer import SP_MODEL, TokenizerConfig  # noqa: E402


@dataclass
class TokenizeConfig:
    """Build the corpus, train the tokenizer and encode the splits."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    out_dir: Path = Path("data/stdlib")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    force: bool = False
    """Redo every stage even when its inputs are unchanged."""


def log(msg: str) -> None:
    print(f"[tokenize] {msg}", flush=True)


def stage_tokenizer(cfg: TokenizeConfig, corpus_dir: Path, corpus_hash: str) -> Path:
    """Train (or reuse) the tokenizer; the cache key is corpus content + tokenizer settings."""
    from lib.tokenizer import build_hf_tokenizer, load_sentencepiece, special_ids, train_sentencepiece

    tok_dir = cfg.out_dir / "tokenizer"
    key = canonical_hash({"corpus": corpus_hash, "settings": dataclasses.asdict(cfg.tokenizer)})
    stamp = tok_dir / "build.json"
    if not cfg.force and stamp.is_file() and read_json(stamp).get("key") == key:
        log(f"tokenizer: unchanged, reusing {tok_dir}")
        return tok_dir
    t0 = time.time()
    tmp = tok_dir.with_name("tokenizer.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    texts = (r["text"] for r in iter_records(corpus_dir, "train"))
    sp_path = train_sentencepiece(texts, tmp, cfg.tokenizer)
    build_hf_tokenizer(sp_path).save_pretrained(str(tmp))
    sp = load_sentencepiece(sp_path)
    write_json(tmp / "build.json", {"key": key, "sp_model_sha256": sha256_file(sp_path),
                                     "vocab_size": sp.get_piece_size(), "special_ids": special_ids(sp),
                                     "settings": dataclasses.asdict(cfg.tokenizer)})
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)
    log(f"tokenizer: trained {cfg.tokenizer.model_type} vocab {sp.get_piece_size()} in {time.time() - t0:.1f}s "
        f"-> {tok_dir}")
    return tok_dir


def read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def stage_tokens(cfg: TokenizeConfig, corpus_dir: Path, corpus_manifest: dict, tok_dir: Path) -> dict:
    """Encode every corpus shard to a .npy token shard; keyed on corpus and sp.model hashes."""
    import numpy as np

    from lib.tokenizer import load_sentencepiece, special_ids

    tokens_dir = cfg.out_dir / "tokens"
    sp_hash = sha256_file(tok_dir / SP_MODEL)
    key = canonical_hash({"corpus": corpus_manifest["content_hash"], "sp_model": sp_hash})
    if not cfg.force and (tokens_dir / "manifest.json").is_file():
        old = read_manifest(tokens_dir, "tokens")
        if old.get("key") == key:
            log(f"tokens: unchanged, reusing {tokens_dir}")
            return old
    t0 = time.time()
    sp = load_sentencepiece(tok_dir / SP_MODEL)
    ids = special_ids(sp)
    dtype = np.uint16 if sp.get_piece_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = tokens_dir.with_name("tokens.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits, total_tokens, total_bytes = {}, 0, 0
    for split, info in corpus_manifest["splits"].items():
        shards = []
        for shard in info["shards"]:
            texts = [r["text"] for r in iter_shard(corpus_dir / shard["file"])]
            encoded = sp.encode(texts, num_threads=os.cpu_count() or 1)
            lengths = [len(e) + 2 for e in encoded]  # + bos and eos
            flat = np.empty(sum(lengths), dtype=dtype)
            pos = 0
            for e in encoded:
                flat[pos] = ids["bos"]
                flat[pos + 1 : pos + 1 + len(e)] = e
                flat[pos + 1 + len(e)] = ids["eos"]
                pos += len(e) + 2
            docs = np.array([[n, len(t.encode("utf-8"))] for n, t in zip(lengths, texts)], dtype=np.int64)
            stem = Path(shard["file"]).stem
            np.save(tmp / f"{stem}.npy", flat)
            np.save(tmp / f"{stem}.docs.npy", docs)
            shards.append({"file": f"{stem}.npy", "docs_file": f"{stem}.docs.npy",
                           "sha256": sha256_file(tmp / f"{stem}.npy"),
                           "docs_sha256": sha256_file(tmp / f"{stem}.docs.npy"),
                           "tokens": int(len(flat)), "docs": len(texts),
                           "text_bytes": int(docs[:, 1].sum())})
        n_tok, n_bytes = sum(s["tokens"] for s in shards), sum(s["text_bytes"] for s in shards)
        splits[split] = {"shards": shards, "tokens": n_tok, "docs": sum(s["docs"] for s in shards),
                         "text_bytes": n_bytes}
        total_tokens, total_bytes = total_tokens + n_tok, total_bytes + n_bytes
    manifest = {
        "kind": "tokens", "key": key, "dtype": np.dtype(dtype).name, "doc_format": "bos ids eos",
        "corpus_dir": "../corpus", "corpus_content_hash": corpus_manifest["content_hash"],
        "tokenizer_dir": "../tokenizer", "sp_model_sha256": sp_hash,
        "vocab_size": sp.get_piece_size(), "special_ids": ids, "splits": splits,
    }
    manifest["content_hash"] = canonical_hash(
        {s: [sh["sha256"] for sh in v["shards"]] for s, v in splits.items()})
    write_json(tmp / "manifest.json", manifest)
    shutil.rmtree(tokens_dir, ignore_errors=True)
    os.replace(tmp, tokens_dir)
    secs = time.time() - t0
    log(f"tokens: encoded {total_bytes / 1e6:.1f} MB into {total_tokens:,} tokens "
        f"({total_bytes / max(total_tokens, 1):.2f} bytes/token) in {secs:.1f}s "
        f"({total_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s) -> {tokens_dir}")
    return manifest


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(TokenizeConfig, description=__doc__)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, cfg.out_dir / "tokenize_config.yaml")
    t0 = time.time()
    corpus_dir = cfg.out_dir / "corpus"
    corpus = build_corpus(cfg.corpus, corpus_dir)
    for split, info in corpus["splits"].items():
        log(f"corpus: {split}: {info['records']} records, {info['text_bytes'] / 1e6:.2f} MB "
            f"in {len(info['shards'])} shard(s)")
    log(f"corpus: skipped {corpus['skipped']}; content hash {corpus['content_hash'][:16]}")
    tok_dir = stage_tokenizer(cfg, corpus_dir, corpus["content_hash"])
    tokens = stage_tokens(cfg, corpus_dir, corpus, tok_dir)
    log(f"special ids: {tokens['special_ids']}; vocab {tokens['vocab_size']}")
    for split, info in tokens["splits"].items():
        log(f"tokens: {split}: {info['tokens']:,} tokens in {info['docs']} documents")
    log(f"done in {time.time() - t0:.1f}s: {cfg.out_dir}")


if __name__ == "__main__":
    main()
