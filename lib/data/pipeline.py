"""The tokenize pipeline's stages after the corpus (lib/corpus.build_corpus): the tokenizer, then
the token shards. Each stage is keyed on the content hashes of its inputs and its settings, reused
when they are unchanged, and written to a temporary folder renamed into place, so a failed or
interrupted stage leaves the previous output as it was.

    data/<name>/corpus/     JSONL shards + manifest              (lib/data/corpus.py)
    data/<name>/tokenizer/  sp.model + Hugging Face files + build.json   stage_tokenizer
                            (or a base model's own tokenizer files, copied)
    data/<name>/tokens/     .npy ids + .docs.npy tables + manifest       stage_tokens
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Iterable

from lib.data.chat import DEFAULT_TEMPLATE
from lib.data.corpus import iter_records, read_manifest
from lib.errors import UserError
from lib.files import atomic_folder, canonical_hash, read_json, sha256_file, write_json
from lib.data.tokenizer import TokenizerConfig, tokenizer_fingerprint


def write_tokenizer(texts: Iterable[str], out_dir: Path, tok_cfg: TokenizerConfig, key: str | None = None) -> dict:
    """Train SentencePiece on `texts` and write sp.model, its Hugging Face twin and build.json
    (returned: the cache key, sp.model's sha256, vocabulary size, special ids, settings) into
    `out_dir`, replacing it only once everything is written."""
    from lib.data.tokenizer import build_hf_tokenizer, load_sentencepiece, special_ids, train_sentencepiece

    with atomic_folder(out_dir) as build:  # the previous tokenizer, if any, stays until this one is complete
        sp_path = train_sentencepiece(texts, build.path, tok_cfg)
        build_hf_tokenizer(sp_path).save_pretrained(str(build.path))
        sp = load_sentencepiece(sp_path)
        info = {"key": key, "tokenizer_sha256": sha256_file(sp_path), "vocab_size": sp.get_piece_size(),
                "special_ids": special_ids(sp), "settings": dataclasses.asdict(tok_cfg)}
        write_json(build.path / "build.json", info)
    return info


def stage_tokenizer(out_dir: Path, corpus_dir: Path, corpus_hash: str, tok_cfg: TokenizerConfig,
                    force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Train (or reuse) `out_dir/tokenizer` on the corpus's train split; the cache key is the
    corpus content hash and the tokenizer settings. With `tok_cfg.pretrained`, copy that model's
    tokenizer files instead (keyed on their fingerprint)."""
    tok_dir = out_dir / "tokenizer"
    if tok_cfg.pretrained:
        from lib.model.registry import resolve_tokenizer

        source = resolve_tokenizer(tok_cfg.pretrained)
        key = canonical_hash({"pretrained": tokenizer_fingerprint(source)})
    else:
        key = canonical_hash({"corpus": corpus_hash, "settings": dataclasses.asdict(tok_cfg)})
    stamp = tok_dir / "build.json"
    try:
        old_key = read_json(stamp, "tokenizer record").get("key") if stamp.is_file() else None
    except (UserError, AttributeError):  # unreadable: made again below
        old_key = None
    if not force and old_key == key:
        log(f"tokenizer: unchanged, reusing {tok_dir}")
        return tok_dir
    t0 = time.time()
    if tok_cfg.pretrained:
        info = copy_pretrained_tokenizer(source, tok_dir, tok_cfg.pretrained, key)
        log(f"tokenizer: {tok_cfg.pretrained}'s own ({source}): vocab {info['vocab_size']}, "
            f"special ids {info['special_ids']} -> {tok_dir}")
        return tok_dir
    info = write_tokenizer((r["text"] for r in iter_records(corpus_dir, "train")), tok_dir, tok_cfg, key)
    log(f"tokenizer: trained {tok_cfg.model_type} vocab {info['vocab_size']} in {time.time() - t0:.1f}s -> {tok_dir}")
    return tok_dir


def copy_pretrained_tokenizer(source: Path, out_dir: Path, name: str, key: str | None = None) -> dict:
    """Copy the tokenizer files of `source` (a model or tokenizer folder) into `out_dir` byte for
    byte, with build.json (returned: key, fingerprint, vocabulary size, special ids, where from)."""
    from lib.data.tokenizer import TextTokenizer, copy_tokenizer_files, tokenizer_source

    with atomic_folder(out_dir) as build:
        files = copy_tokenizer_files(source, build.path)
        tok = TextTokenizer(tokenizer_source(build.path))
        info = {"key": key, "tokenizer_sha256": tokenizer_fingerprint(build.path), "vocab_size": tok.vocab_size,
                "special_ids": tok.ids, "pretrained": name, "source": str(source.resolve()), "files": files}
        write_json(build.path / "build.json", info)
    return info


def chat_template(tok_dir: Path) -> str:
    """The chat template conversations are rendered with: the tokenizer's own (a base model's,
    in its tokenizer_config.json), else this project's default."""
    cfg_path = tok_dir / "tokenizer_config.json"
    own = read_json(cfg_path, "tokenizer config").get("chat_template") if cfg_path.is_file() else None
    if isinstance(own, list):  # several named templates: the default one
        own = next((t.get("template") for t in own if t.get("name") == "default"), None)
    return own or DEFAULT_TEMPLATE


def encode_chat_shards(tok_dir: Path, files: list[Path], template: str, ends: tuple[bool, bool]):
    """Yield (ids, ids per document, trained bytes per document, loss mask) of each corpus shard,
    through the tokenizer's Hugging Face form (offsets place the assistant's text on tokens:
    lib.data.chat.encode_documents)."""
    import numpy as np

    from lib.data.chat import encode_documents
    from lib.data.corpus import iter_shard
    from lib.data.tokenizer import load_hf_tokenizer

    hf = load_hf_tokenizer(tok_dir)
    for path in files:
        ids, masks, sizes = encode_documents(hf, list(iter_shard(path)), template, *ends)
        yield (np.fromiter((i for d in ids for i in d), np.int64), np.array([len(d) for d in ids], np.int64),
               np.array(sizes, np.int64), np.fromiter((m for d in masks for m in d), np.uint8))


def model_positions(tok_dir: Path) -> tuple[int, str] | None:
    """(positions, model folder) of the model whose tokenizer `tok_dir` copied (its build.json names
    the folder; its config.json the positions), or None: a tokenizer of this project's own, or a
    folder without a model config."""
    import json

    from lib.model.build import folder_positions

    try:
        source = Path(json.loads((tok_dir / "build.json").read_text())["source"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    positions = folder_positions(source)
    return (positions, str(source)) if positions else None


def seq_len_advice(longest: int, lengths: list, positions: tuple[int, str] | None) -> str:
    """What tokenize.py says about the conversations' lengths: the --data.seq_len that keeps every
    one whole (a block holds seq_len + 1 tokens), never more than the model's positions; past
    them, how many are cut and what to do instead."""
    import numpy as np

    whole = max(longest - 1, 1)
    if positions is None:
        return (f"tokens: the longest conversation is {longest:,} tokens: --data.seq_len {whole} or more keeps every "
                "one whole in view (a model trained from scratch needs --model.max_seq_len as long)")
    limit, source = positions
    if whole <= limit:
        return (f"tokens: the longest conversation is {longest:,} tokens: --data.seq_len {whole} or more (up to the "
                f"model's {limit} positions) keeps every one whole in view")
    every = np.concatenate(lengths) if lengths else np.zeros(0)
    cut = int((every > limit + 1).sum())
    return (f"tokens: the longest conversation is {longest:,} tokens, more than the {limit} positions of {source}: "
            f"{cut:,} of {len(every):,} conversations are longer than --data.seq_len {limit} (the most that model "
            "takes) and are cut into blocks, their later answer tokens trained without the conversation's start in "
            "view; to keep them whole, fine-tune a model with more positions or shorten those conversations")


def stage_tokens(out_dir: Path, corpus_dir: Path, corpus_manifest: dict, tok_dir: Path, force: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """Encode every corpus shard to `out_dir/tokens`: per shard a .npy of its documents as
    `bos ids eos` end to end and a .docs.npy table of (tokens, text bytes) per document, and a
    manifest (returned) with every file's sha256 and a content hash. Keyed on the corpus content
    hash and the tokenizer's fingerprint. A document is `bos ids eos` where the tokenizer has
    both (TextTokenizer.document_ends: `bos ids` for GPT-2's one <|endoftext|>)."""
    import numpy as np

    from lib.data.encode import encode_shards
    from lib.data.tokenizer import TextTokenizer, tokenizer_source

    tokens_dir = out_dir / "tokens"
    tok_hash = tokenizer_fingerprint(tok_dir)
    template = chat_template(tok_dir) if corpus_manifest.get("conversations") else None
    key = canonical_hash({"corpus": corpus_manifest["content_hash"], "tokenizer": tok_hash,
                          **({"chat_template": template} if template is not None else {})})
    if not force and (tokens_dir / "manifest.json").is_file():
        try:
            old = read_manifest(tokens_dir, "tokens")
        except UserError as exc:  # unreadable: rebuilt below
            log(f"tokens: {exc}")
            old = {}
        if old.get("key") == key:
            log(f"tokens: unchanged, reusing {tokens_dir}")
            return old
    t0 = time.time()
    tok = TextTokenizer(tokenizer_source(tok_dir))
    add_bos, add_eos = tok.document_ends()
    if not (add_bos or add_eos):
        log("warning: the tokenizer has neither a bos nor an eos token, so documents are stored back to back "
            "with nothing between them: a model trained on them cannot tell where one ends, and "
            "--data.doc_mask cannot keep them apart")
    dtype = np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    splits, total_tokens, total_bytes, longest, lengths_seen = {}, 0, 0, 0, []
    files = [corpus_dir / shard["file"] for info in corpus_manifest["splits"].values() for shard in info["shards"]]
    if template is not None:
        log(f"tokens: {corpus_manifest['conversations']} conversations, trained on the assistant's tokens only "
            f"({'the tokenizer' if template != DEFAULT_TEMPLATE else 'this project'}'s chat template)")
    with atomic_folder(tokens_dir) as build:
        tmp = build.path
        encoded = encode_shards(tok, files) if template is None else encode_chat_shards(tok_dir, files, template,
                                                                                        tok.document_ends())
        for split, info in corpus_manifest["splits"].items():
            shards = []
            for shard in info["shards"]:
                flat, lengths, sizes, *loss_mask = next(encoded)
                longest = max(longest, int(lengths.max(initial=0)))
                lengths_seen.append(lengths)
                flat = flat.astype(dtype, copy=False)
                docs = np.stack([lengths, sizes], axis=1).astype(np.int64)
                stem = Path(shard["file"]).stem
                np.save(tmp / f"{stem}.npy", flat)
                np.save(tmp / f"{stem}.docs.npy", docs)
                shards.append({"file": f"{stem}.npy", "docs_file": f"{stem}.docs.npy",
                               "sha256": sha256_file(tmp / f"{stem}.npy"),
                               "docs_sha256": sha256_file(tmp / f"{stem}.docs.npy"),
                               "tokens": int(len(flat)), "docs": len(docs),
                               "text_bytes": int(docs[:, 1].sum())})
                if loss_mask:  # 1 where a token is a target the loss counts
                    np.save(tmp / f"{stem}.mask.npy", loss_mask[0])
                    shards[-1].update(mask_file=f"{stem}.mask.npy", mask_sha256=sha256_file(tmp / f"{stem}.mask.npy"),
                                      trained_tokens=int(loss_mask[0].sum()))
            n_tok, n_bytes = sum(s["tokens"] for s in shards), sum(s["text_bytes"] for s in shards)
            splits[split] = {"shards": shards, "tokens": n_tok, "docs": sum(s["docs"] for s in shards),
                             "text_bytes": n_bytes}
            total_tokens, total_bytes = total_tokens + n_tok, total_bytes + n_bytes
        encoded.close()
        manifest = {
            "kind": "tokens", "key": key, "dtype": np.dtype(dtype).name,
            "doc_format": " ".join(["bos"] * add_bos + ["ids"] + ["eos"] * add_eos),
            "corpus_dir": "../corpus", "corpus_content_hash": corpus_manifest["content_hash"],
            "tokenizer_dir": "../tokenizer", "tokenizer_sha256": tok_hash, "vocab_size": tok.vocab_size,
            "special_ids": tok.ids, "splits": splits,
        }
        if template is not None:
            manifest.update(loss_mask=True, chat_template=template)
        if corpus_manifest.get("pairs"):  # documents 2i and 2i + 1 are pair i's chosen and rejected
            manifest.update(pairs=True)
        manifest["content_hash"] = canonical_hash({s: [sh["sha256"] for sh in v["shards"]] for s, v in splits.items()})
        write_json(tmp / "manifest.json", manifest)
    secs = time.time() - t0
    if template is not None:
        log(seq_len_advice(longest, lengths_seen, model_positions(tok_dir)))
    log(f"tokens: encoded {total_bytes / 1e6:.1f} MB into {total_tokens:,} tokens "
        f"({total_bytes / max(total_tokens, 1):.2f} bytes/token) in {secs:.1f}s "
        f"({total_bytes / 1e6 / max(secs, 1e-9):.1f} MB/s) -> {tokens_dir}")
    return manifest
