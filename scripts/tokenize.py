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
import itertools  # noqa: E402
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
    try:
        sp_path = train_sentencepiece(texts, tmp, tok_cfg)
        build_hf_tokenizer(sp_path).save_pretrained(str(tmp))
        sp = load_sentencepiece(sp_path)
        info = {"key": key, "sp_model_sha256": sha256_file(sp_path), "vocab_size": sp.get_piece_size(),
                "special_ids": special_ids(sp), "settings": dataclasses.asdict(tok_cfg)}
        write_json(tmp / "build.json", info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous tokenizer, if any, stays as it was
        raise
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


def _pack_texts(texts: list[str]) -> tuple[bytes, list[int], list[int]]:
    """One batch of texts -> their `bos ids eos` packed end to end, the ids and the UTF-8 bytes
    of each text."""
    tokens, counts = _packed_stream(texts, add_bos=True, add_eos=True)
    return tokens, counts, [len(t.encode("utf-8")) for t in texts]


def _encode_shards(tok, files: list[Path]):
    """Yield (ids, ids per document, bytes per document) of each corpus shard in turn, documents
    as `bos ids eos`: through the word cache in every core's worker (batches of about 1 MB, in
    order), or SentencePiece's own threads for models the cache cannot take."""
    import collections

    import numpy as np

    from lib.parallel import default_workers, ordered_map
    from lib.tokenizer import packed_code

    global _ENCODER
    _ENCODER = tok
    bos, eos = tok.ids["bos"], tok.ids["eos"]
    if tok._words is None:
        for path in files:
            texts = [r["text"] for r in iter_shard(path)]
            encoded = tok.encode(texts)
            flat = np.fromiter(itertools.chain.from_iterable((bos, *e, eos) for e in encoded), np.int64)
            yield (flat, np.array([len(e) + 2 for e in encoded], np.int64),
                   np.array([len(t.encode("utf-8")) for t in texts], np.int64))
        return
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
    results = ordered_map(_pack_texts, batches(), workers, _init_encoder, (tok.path, None, tok.threads))
    for packed, n_ids, n_bytes in results:
        parts.append(packed)
        lengths += n_ids
        sizes += n_bytes
        if ends.popleft():
            yield (np.frombuffer(b"".join(parts), np.dtype(packed_code(tok.vocab_size))), np.array(lengths, np.int64),
                   np.array(sizes, np.int64))
            parts, lengths, sizes = [], [], []


def stage_tokens(cfg: TokenizeConfig, corpus_dir: Path, corpus_manifest: dict, tok_dir: Path) -> dict:
    """Encode every corpus shard to a .npy token shard; keyed on corpus and sp.model hashes."""
    import numpy as np

    from lib.tokenizer import TextTokenizer, special_ids

    tokens_dir = cfg.out_dir / "tokens"
    sp_hash = sha256_file(tok_dir / SP_MODEL)
    key = canonical_hash({"corpus": corpus_manifest["content_hash"], "sp_model": sp_hash})
    if not cfg.force and (tokens_dir / "manifest.json").is_file():
        old = read_manifest(tokens_dir, "tokens")
        if old.get("key") == key:
            log(f"tokens: unchanged, reusing {tokens_dir}")
            return old
    t0 = time.time()
    tok = TextTokenizer(tok_dir / SP_MODEL)
    sp = tok._sp
    ids = special_ids(sp)
    dtype = np.uint16 if sp.get_piece_size() <= np.iinfo(np.uint16).max + 1 else np.uint32
    tmp = tokens_dir.with_name("tokens.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    splits, total_tokens, total_bytes = {}, 0, 0
    encoded = _encode_shards(tok, [corpus_dir / shard["file"] for info in corpus_manifest["splits"].values()
                                   for shard in info["shards"]])
    for split, info in corpus_manifest["splits"].items():
        shards = []
        for shard in info["shards"]:
            flat, lengths, sizes = next(encoded)
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
        n_tok, n_bytes = sum(s["tokens"] for s in shards), sum(s["text_bytes"] for s in shards)
        splits[split] = {"shards": shards, "tokens": n_tok, "docs": sum(s["docs"] for s in shards),
                         "text_bytes": n_bytes}
        total_tokens, total_bytes = total_tokens + n_tok, total_bytes + n_bytes
    encoded.close()
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
    """.jsonl: {"ids": [...], "attention_mask": [...]} per input text. .npy: every text's ids end
    to end (uint16; uint32 past 65,280 ids), with OUTPUT.docs.npy beside it holding a (tokens,
    text bytes) row per text: the layout of the token shards train.py reads. No padding."""
    batch_size: int = 1024
    """Texts per batch (padding=longest pads each batch to its longest row)."""
    workers: Optional[int] = None
    """Processes encoding batches in parallel (default: every core; SentencePiece models only,
    a Hugging Face tokenizer uses its own threads)."""


@dataclass
class DecodeConfig(_TokenizerArgs, _Preset):
    """Decode JSONL lines of {"ids": [...]}, or a .npy token stream from encode, back to {"text": ...}."""

    input: Path = Path("ids.jsonl")
    """.jsonl of {"ids": [...]} lines, or a .npy written by encode (with its .docs.npy)."""
    output: Path = Path("decoded.jsonl")
    keep_special: bool = False
    """Keep special tokens (bos, eos, pad) in the text."""


@dataclass
class InspectConfig(_TokenizerArgs, _Preset):
    """Show a tokenizer's vocabulary size, special ids and a sample tokenization."""

    text: str = "def greet(name):\n    return f'hello {name}'\n"


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
    import json

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
            raise UserError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise UserError(f"{path}:{lineno}: no string field {text_field!r}")
        texts.append(obj[text_field])
    return texts


_ENCODER = None  # this process's TextTokenizer: cmd_encode's own, inherited by forked workers


def _init_encoder(path: Path, pad_token: Optional[str], threads: Optional[int] = None) -> None:
    """Load the tokenizer in a worker, unless it came with the fork (0.07 s saved per worker)."""
    from lib.tokenizer import TextTokenizer

    global _ENCODER
    if _ENCODER is None:  # a spawned (not forked) worker
        _ENCODER = TextTokenizer(path, pad_token)
        _ENCODER.set_threads(threads)


def _ones_json(n: int) -> str:
    """json.dumps([1] * n), without the list."""
    return "[" + "1, " * (n - 1) + "1]" if n else "[]"


def _encode_batch_to_jsonl(task) -> tuple[str, int, int, int, int]:
    """One batch: raw lines -> JSONL text of ids and masks, with its counts."""
    import json

    from lib.tokenizer import encode_batch

    cfg, first, lines = task
    texts = parse_texts(cfg.input, first, lines, cfg.text_field)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = getattr(_ENCODER, "_words", None)
    if words is not None and cfg.max_length is None and cfg.padding == "none":
        # the common case, written straight from cached word texts: the same bytes as below
        encode_batch(_ENCODER, [], cfg)  # the same option checks
        head = [str(_ENCODER.ids["bos"])] if cfg.add_bos else []
        tail = [str(_ENCODER.ids["eos"])] if cfg.add_eos else []
        parts, n_tokens = [], 0
        for joined, n in words.encode_text(texts):
            n += len(head) + len(tail)
            ids = ", ".join(head + ([joined] if joined else []) + tail)
            parts.append(f'{{"ids": [{ids}], "attention_mask": {_ones_json(n)}}}\n')
            n_tokens += n
        return "".join(parts), len(texts), n_tokens, 0, n_bytes
    ids, masks = encode_batch(_ENCODER, texts, cfg)
    out = "".join(f'{{"ids": {json.dumps(x)}, "attention_mask": {json.dumps(m)}}}\n' for x, m in zip(ids, masks))
    n_tokens = sum(map(len, ids))
    n_pad = n_tokens - sum(map(sum, masks))
    return out, len(texts), n_tokens, n_pad, n_bytes


def docs_path(output: Path) -> Path:
    """The (tokens, text bytes) per-document table beside a .npy token stream: X.docs.npy."""
    return output.with_suffix(".docs.npy")


def _packed_stream(texts: list[str], add_bos: bool, add_eos: bool) -> tuple[bytes, list[int]]:
    """Texts encoded through this process's word cache, packed end to end (uint16, or uint32
    for large vocabularies), each between bos and eos as asked, and the ids of each."""
    from array import array

    from lib.tokenizer import packed_code

    code = packed_code(_ENCODER.vocab_size)
    head = array(code, [_ENCODER.ids["bos"]] if add_bos else []).tobytes()
    tail = array(code, [_ENCODER.ids["eos"]] if add_eos else []).tobytes()
    packed = _ENCODER._words.encode_packed(texts, code, head, tail)
    size = array(code).itemsize
    return b"".join(packed), [len(p) // size for p in packed]


def _encode_batch_to_npy(task) -> tuple[tuple[bytes, bytes], int, int, int, int]:
    """One batch: raw lines -> packed ids of every text end to end, and the bytes of its
    (tokens, text bytes) rows, with its counts."""
    from array import array

    from lib.tokenizer import encode_batch, packed_code

    cfg, first, lines = task
    texts = parse_texts(cfg.input, first, lines, cfg.text_field)
    sizes = [len(t.encode("utf-8")) for t in texts]
    if getattr(_ENCODER, "_words", None) is not None and cfg.max_length is None:
        encode_batch(_ENCODER, [], cfg)  # the same option checks
        tokens, counts = _packed_stream(texts, cfg.add_bos, cfg.add_eos)
    else:
        ids, _ = encode_batch(_ENCODER, texts, cfg)
        counts = list(map(len, ids))
        tokens = array(packed_code(_ENCODER.vocab_size), itertools.chain.from_iterable(ids)).tobytes()
    docs = array("q", itertools.chain.from_iterable(zip(counts, sizes))).tobytes()
    return (tokens, docs), len(texts), sum(counts), 0, sum(sizes)


def cmd_train(cfg: TrainTokenizerConfig) -> None:
    from lib.corpus import iter_source

    t0 = time.time()
    info = write_tokenizer((r["text"] for r in iter_source(cfg.corpus)), cfg.out_dir, cfg.tokenizer)
    log(f"trained {cfg.tokenizer.model_type} vocab {info['vocab_size']} in {time.time() - t0:.1f}s -> "
        f"{cfg.out_dir} (sp.model + Hugging Face files); special ids {info['special_ids']}")


def cmd_encode(cfg: EncodeConfig) -> None:
    import contextlib

    from lib.corpus import atomic_npy
    from lib.progress import progress
    from lib.parallel import default_workers, ordered_map
    from lib.tokenizer import TextTokenizer, encode_batch, packed_code

    global _ENCODER
    tok = _ENCODER = TextTokenizer(cfg.tokenizer, cfg.pad_token)
    encode_batch(tok, [], cfg)  # option errors now, before any work
    npy = cfg.output.suffix == ".npy"
    if npy and cfg.padding != "none":
        raise UserError(f"--output {cfg.output}: a .npy output is one flat stream of every text's ids (indexed by "
                        f"{docs_path(cfg.output).name}), so it takes no --padding; write a .jsonl output to pad")
    if not cfg.input.is_file():
        raise UserError(f"--input {cfg.input}: no such file")
    workers = cfg.workers or default_workers()
    if tok.kind != "sentencepiece":
        workers = 1  # the Rust tokenizer already spreads a batch over every core
    elif workers > 1:
        tok.set_threads(1)  # (inherited by the forked workers)
    n_texts = n_tokens = n_pad = n_bytes = 0
    t0 = time.time()
    bar = progress(total=cfg.input.stat().st_size, unit="B", unit_scale=True, desc="encode")
    # Batches of batch_size texts; unless they are padded to their longest, also cut at 1 MB so
    # that every worker has work even when a few texts are large.
    max_bytes = None if cfg.padding == "longest" else 1 << 20
    tasks = ((cfg, first, lines) for first, lines in read_batches(cfg.input, cfg.batch_size, max_bytes, bar.update))
    with contextlib.ExitStack() as files:  # on error, neither file is left; the ids file is renamed first
        if npy:
            docs = files.enter_context(atomic_npy(docs_path(cfg.output), "<i8", (2,)))
            out = files.enter_context(atomic_npy(cfg.output, packed_code(tok.vocab_size)))
        else:
            out = files.enter_context(atomic_text(cfg.output))
        work = _encode_batch_to_npy if npy else _encode_batch_to_jsonl
        for result, *counts in ordered_map(work, tasks, workers, _init_encoder,
                                                 (cfg.tokenizer, cfg.pad_token, tok.threads)):
            if npy:
                out.write(result[0])
                docs.write(result[1])
            else:
                out.write(result)
            n_texts, n_tokens, n_pad, n_bytes = (a + b for a, b in zip((n_texts, n_tokens, n_pad, n_bytes), counts))
    bar.close()
    secs = max(time.time() - t0, 1e-9)
    written = f"{cfg.output} and {docs_path(cfg.output).name}" if npy else str(cfg.output)
    log(f"encoded {n_texts:,} texts ({n_bytes / 1e6:.2f} MB) into {n_tokens:,} ids, padding "
        f"{n_pad / max(n_tokens, 1):.1%}, in {secs:.1f}s ({n_bytes / 1e6 / secs:.1f} MB/s, "
        f"{n_tokens / secs:,.0f} tokens/s, {workers} process(es)) -> {written}")


def read_npy_docs(path: Path):
    """(ids, docs) of a .npy token stream written by encode, checked against each other."""
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


def cmd_decode(cfg: DecodeConfig) -> None:
    import json

    from lib.tokenizer import TextTokenizer

    tok = TextTokenizer(cfg.tokenizer, cfg.pad_token)
    if not cfg.input.is_file():
        raise UserError(f"--input {cfg.input}: no such file")

    def rows():
        if cfg.input.suffix == ".npy":
            ids, docs = read_npy_docs(cfg.input)
            pos = 0
            for n in docs[:, 0].tolist():
                yield ids[pos : pos + n].tolist()
                pos += n
            return
        with open(cfg.input, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["ids"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{cfg.input}:{lineno}: expected a JSON object with an 'ids' list") from None

    n = 0
    with atomic_text(cfg.output) as out:
        for ids in rows():
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
