#!/usr/bin/env python
"""Corpus -> SentencePiece tokenizer -> token shards; and train/encode/decode/inspect tools.

    python scripts/tokenize.py --config configs/tokenize/stdlib.yaml     # the pipeline (prepare)
    python scripts/tokenize.py train   --corpus.source my_texts/ --out_dir tok/
    python scripts/tokenize.py encode  --tokenizer tok/sp.model --input in.jsonl --max_length 128
    python scripts/tokenize.py decode  --tokenizer tok/sp.model --input ids.jsonl --output text.jsonl
    python scripts/tokenize.py inspect --tokenizer runs/default/final

The pipeline writes OUT_DIR/corpus (JSONL shards + manifest), OUT_DIR/tokenizer (sp.model and a
Hugging Face tokenizer with identical ids) and OUT_DIR/tokens (.npy token shards + manifest).
A stage is redone only when what it is built from changed: the corpus bytes, the tokenizer
settings, or the tokenizer model file. `X --help` shows each subcommand's options.
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
from lib.corpus import (CorpusConfig, atomic_text, build_corpus, canonical_hash, iter_records,  # noqa: E402
                        iter_shard, read_manifest, sha256_file, write_json)
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.tokenizer import SP_MODEL, EncodeOptions, TokenizerConfig  # noqa: E402


@dataclass
class _Preset:
    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""


@dataclass
class TokenizeConfig(_Preset):
    """Build the corpus, train the tokenizer and encode the splits."""

    out_dir: Path = Path("data/stdlib")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    force: bool = False
    """Redo every stage even when its inputs are unchanged."""


def log(msg: str) -> None:
    print(f"[tokenize] {msg}", flush=True)


def write_tokenizer(texts, out_dir: Path, tok_cfg: TokenizerConfig, key: str | None = None) -> dict:
    """Train SentencePiece on `texts` and write sp.model, its Hugging Face twin and build.json
    into `out_dir`, replacing it only once everything is written."""
    from lib.tokenizer import build_hf_tokenizer, load_sentencepiece, special_ids, train_sentencepiece

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sp_path = train_sentencepiece(texts, tmp, tok_cfg)
    build_hf_tokenizer(sp_path).save_pretrained(str(tmp))
    sp = load_sentencepiece(sp_path)
    info = {"key": key, "sp_model_sha256": sha256_file(sp_path), "vocab_size": sp.get_piece_size(),
            "special_ids": special_ids(sp), "settings": dataclasses.asdict(tok_cfg)}
    write_json(tmp / "build.json", info)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return info


def stage_tokenizer(cfg: TokenizeConfig, corpus_dir: Path, corpus_hash: str) -> Path:
    """Train (or reuse) the tokenizer; the cache key is corpus content + tokenizer settings."""
    tok_dir = cfg.out_dir / "tokenizer"
    key = canonical_hash({"corpus": corpus_hash, "settings": dataclasses.asdict(cfg.tokenizer)})
    stamp = tok_dir / "build.json"
    if not cfg.force and stamp.is_file() and read_json(stamp).get("key") == key:
        log(f"tokenizer: unchanged, reusing {tok_dir}")
        return tok_dir
    t0 = time.time()
    info = write_tokenizer((r["text"] for r in iter_records(corpus_dir, "train")), tok_dir, cfg.tokenizer, key)
    log(f"tokenizer: trained {cfg.tokenizer.model_type} vocab {info['vocab_size']} in {time.time() - t0:.1f}s "
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


@dataclass
class TrainTokenizerConfig(_Preset):
    """Train a SentencePiece tokenizer (and its Hugging Face twin) on any corpus source."""

    out_dir: Path = Path("tokenizer")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class _TokenizerArgs:
    tokenizer: Path = Path("data/stdlib/tokenizer/sp.model")
    """A SentencePiece .model file or a Hugging Face tokenizer folder."""
    pad_token: Optional[str] = None
    """For tokenizers without one (GPT-2): 'eos' pads with eos, or name a token of the vocabulary."""


@dataclass
class EncodeConfig(EncodeOptions, _TokenizerArgs, _Preset):
    """Encode texts to ids with optional truncation and padding (exactly as lib.tokenizer.encode_batch)."""

    input: Path = Path("input.jsonl")
    """.jsonl (the text_field of each line) or .txt (each line a text)."""
    text_field: str = "text"
    output: Path = Path("ids.jsonl")
    """JSONL with {"ids": [...], "attention_mask": [...]} per input text."""
    batch_size: int = 1024


@dataclass
class DecodeConfig(_TokenizerArgs, _Preset):
    """Decode JSONL lines of {"ids": [...]} back to {"text": ...}."""

    input: Path = Path("ids.jsonl")
    output: Path = Path("decoded.jsonl")
    keep_special: bool = False
    """Keep special tokens (bos, eos, pad) in the text."""


@dataclass
class InspectConfig(_TokenizerArgs, _Preset):
    """Show a tokenizer's vocabulary size, special ids and a sample tokenization."""

    text: str = "def greet(name):\n    return f'hello {name}'\n"


def read_texts(path: Path, text_field: str):
    """Texts of a .txt (one per line) or .jsonl file, with errors naming file and line."""
    import json

    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if path.suffix != ".jsonl":
                yield line.rstrip("\n")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise UserError(f"{path}:{lineno}: no string field {text_field!r}")
            yield obj[text_field]


def cmd_train(cfg: TrainTokenizerConfig) -> None:
    from lib.corpus import iter_source

    t0 = time.time()
    info = write_tokenizer((r["text"] for r in iter_source(cfg.corpus)), cfg.out_dir, cfg.tokenizer)
    log(f"trained {cfg.tokenizer.model_type} vocab {info['vocab_size']} in {time.time() - t0:.1f}s -> "
        f"{cfg.out_dir} (sp.model + Hugging Face files); special ids {info['special_ids']}")


def cmd_encode(cfg: EncodeConfig) -> None:
    import itertools
    import json

    from lib.tokenizer import TextTokenizer, encode_batch

    tok = TextTokenizer(cfg.tokenizer, cfg.pad_token)
    texts = read_texts(cfg.input, cfg.text_field)
    n_texts = n_tokens = n_pad = n_bytes = 0
    t0 = time.time()
    with atomic_text(cfg.output) as out:
        while batch := list(itertools.islice(texts, cfg.batch_size)):
            ids, masks = encode_batch(tok, batch, cfg)
            for x, m in zip(ids, masks):
                out.write(json.dumps({"ids": x, "attention_mask": m}) + "\n")
                n_tokens += len(x)
                n_pad += len(m) - sum(m)
            n_texts += len(batch)
            n_bytes += sum(len(t.encode("utf-8")) for t in batch)
    secs = max(time.time() - t0, 1e-9)
    log(f"encoded {n_texts:,} texts ({n_bytes / 1e6:.2f} MB) into {n_tokens:,} ids, padding "
        f"{n_pad / max(n_tokens, 1):.1%}, in {secs:.1f}s ({n_bytes / 1e6 / secs:.1f} MB/s) -> {cfg.output}")


def cmd_decode(cfg: DecodeConfig) -> None:
    import json

    from lib.tokenizer import TextTokenizer

    tok = TextTokenizer(cfg.tokenizer, cfg.pad_token)
    if not cfg.input.is_file():
        raise UserError(f"--input {cfg.input}: no such file")
    n = 0
    with open(cfg.input, encoding="utf-8") as f, atomic_text(cfg.output) as out:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ids = json.loads(line)["ids"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{cfg.input}:{lineno}: expected a JSON object with an 'ids' list") from None
            out.write(json.dumps({"text": tok.decode(ids, skip_special=not cfg.keep_special)}, ensure_ascii=False) + "\n")
            n += 1
    log(f"decoded {n:,} sequences -> {cfg.output}")


def cmd_inspect(cfg: InspectConfig) -> None:
    from lib.tokenizer import TextTokenizer

    tok = TextTokenizer(cfg.tokenizer, cfg.pad_token)
    ids = tok.encode([cfg.text])[0]
    print(f"tokenizer   {cfg.tokenizer} ({tok.kind})")
    print(f"vocab size  {tok.vocab_size}")
    print("special ids " + ", ".join(f"{k}={v}" for k, v in tok.ids.items()))
    print(f"sample      {cfg.text!r}")
    print(f"  {len(ids)} tokens, {len(cfg.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    print(f"  ids    {ids}")
    print(f"  pieces {tok.pieces(cfg.text)}")
    print(f"  round trip exact: {tok.decode(ids) == cfg.text}")


SUBCOMMANDS = {"train": (TrainTokenizerConfig, cmd_train), "encode": (EncodeConfig, cmd_encode),
               "decode": (DecodeConfig, cmd_decode), "inspect": (InspectConfig, cmd_inspect)}


@exit_on_user_error
def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        cls, run = SUBCOMMANDS[argv[0]]
        prog = f"{os.path.basename(sys.argv[0])} {argv[0]}"
        return run(config_lib.parse(cls, argv[1:], description=cls.__doc__, prog=prog))
    cfg = config_lib.parse(TokenizeConfig, argv, description=__doc__)
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
