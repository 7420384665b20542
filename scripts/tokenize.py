#!/usr/bin/env python
"""Corpus -> SentencePiece tokenizer -> token shards; and train/encode/decode/inspect tools.

    python scripts/tokenize.py --config configs/tokenize/stdlib.yaml     # the pipeline (prepare)
    python scripts/tokenize.py --corpus.source book.txt --tokenizer gpt2 --out_dir data/book
                                                   # the pipeline with a base model's own tokenizer
    python scripts/tokenize.py train   --corpus.source my_texts/ --out_dir tok/
    python scripts/tokenize.py encode  --tokenizer tok/sp.model --input in.jsonl --max_length 128
    python scripts/tokenize.py decode  --tokenizer tok/sp.model --input ids.jsonl --output text.jsonl
    python scripts/tokenize.py inspect --tokenizer runs/default/final
    python scripts/tokenize.py stdlib-pairs --out_dir data/pairs-src     # instruction pairs, offline

The pipeline writes OUT_DIR/corpus (JSONL shards + manifest), OUT_DIR/tokenizer (sp.model and a
Hugging Face tokenizer with identical ids; or, with --tokenizer NAME_OR_FOLDER, that model's own
tokenizer files, for fine-tuning it) and OUT_DIR/tokens (.npy token shards + manifest).
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

import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.data.corpus import CorpusConfig, build_corpus  # noqa: E402
from lib.files import atomic_text  # noqa: E402
from lib.errors import UserError, exit_on_user_error, writing_to  # noqa: E402
from lib.data.tokenizer import EncodeOptions, TokenizerConfig  # noqa: E402


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
    plugins: tuple[str, ...] = ()
    """Plugins to import first (.py files or module names), e.g. a reader for another kind of input
    file (lib/plugins.py); installed packages' `lm.plugins` entry points load too."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    force: bool = False
    """Redo every stage even when its inputs are unchanged."""


def log(msg: str) -> None:
    print(f"[tokenize] {msg}", flush=True)


@dataclass
class TrainTokenizerConfig(_Preset):
    """Train a SentencePiece tokenizer (and its Hugging Face twin) on any corpus source."""

    out_dir: Path = Path("tokenizer")
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class _TokenizerArgs:
    tokenizer: Path = Path("data/stdlib/tokenizer/sp.model")
    """A SentencePiece .model file, a Hugging Face tokenizer or model folder, or a model name (gpt2,
    tinyllama, org/name) in the Hugging Face cache."""
    pad_token: Optional[str] = None
    """For tokenizers without one (GPT-2): 'eos' pads with eos, or name a token of the vocabulary."""


@dataclass
class EncodeConfig(EncodeOptions, _TokenizerArgs, _Preset):
    """Encode texts to ids with optional truncation and padding (exactly as lib.data.tokenizer.encode_batch)."""

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


def open_tokenizer(cfg: _TokenizerArgs):
    """The tokenizer --tokenizer names: a file or folder, else a model name looked up offline."""
    from lib.data.tokenizer import TextTokenizer

    path = cfg.tokenizer
    if not path.exists():
        from lib.model.registry import resolve_tokenizer

        path = resolve_tokenizer(str(path))
    return TextTokenizer(path, cfg.pad_token)


def cmd_train(cfg: TrainTokenizerConfig) -> None:
    from lib.data.corpus import iter_source
    from lib.data.pipeline import write_tokenizer

    if cfg.tokenizer.pretrained:
        raise UserError("--tokenizer.pretrained: `train` makes a new tokenizer; a base model's own is used by the "
                        "pipeline (scripts/tokenize.py --tokenizer NAME --corpus.source ...)")
    t0 = time.time()
    info = write_tokenizer((r["text"] for r in iter_source(cfg.corpus)), cfg.out_dir, cfg.tokenizer)
    log(f"trained {cfg.tokenizer.model_type} vocab {info['vocab_size']} in {time.time() - t0:.1f}s -> "
        f"{cfg.out_dir} (sp.model + Hugging Face files); special ids {info['special_ids']}")


def cmd_encode(cfg: EncodeConfig) -> None:
    from lib.data.encode import docs_path, encode_file
    from lib.files import ensure_writable
    from lib.data.parallel import default_workers
    from lib.progress import progress

    ensure_writable(cfg.output.parent, "--output's folder")
    tok = open_tokenizer(cfg)
    # one process for a Hugging Face tokenizer: its Rust code already spreads a batch over every core
    workers = (cfg.workers or default_workers()) if tok.kind == "sentencepiece" else 1
    t0 = time.time()
    bar = progress(total=cfg.input.stat().st_size if cfg.input.is_file() else 0, unit="B", unit_scale=True,
                   desc="encode")
    n_texts, n_tokens, n_pad, n_bytes = encode_file(cfg, tok, workers, bar.update)
    bar.close()
    secs = max(time.time() - t0, 1e-9)
    written = f"{cfg.output} and {docs_path(cfg.output).name}" if cfg.output.suffix == ".npy" else str(cfg.output)
    log(f"encoded {n_texts:,} texts ({n_bytes / 1e6:.2f} MB) into {n_tokens:,} ids, padding "
        f"{n_pad / max(n_tokens, 1):.1%}, in {secs:.1f}s ({n_bytes / 1e6 / secs:.1f} MB/s, "
        f"{n_tokens / secs:,.0f} tokens/s, {workers} process(es)) -> {written}")


def cmd_decode(cfg: DecodeConfig) -> None:
    import json

    from lib.data.encode import read_npy_docs
    from lib.files import ensure_writable

    ensure_writable(cfg.output.parent, "--output's folder")
    tok = open_tokenizer(cfg)
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
    tok = open_tokenizer(cfg)
    ids = tok.encode([cfg.text])[0]
    print(f"tokenizer   {cfg.tokenizer} ({tok.kind})")
    print(f"vocab size  {tok.vocab_size}")
    print("special ids " + ", ".join(f"{k}={v}" for k, v in tok.ids.items()))
    print(f"sample      {cfg.text!r}")
    print(f"  {len(ids)} tokens, {len(cfg.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    print(f"  ids    {ids}")
    print(f"  pieces {tok.pieces(cfg.text)}")
    print(f"  round trip exact: {tok.decode(ids) == cfg.text}")


@dataclass
class PairsConfig(_Preset):
    """Write instruction pairs made from Python's standard library (a documented function's
    signature as the question, its docstring's first paragraph as the answer), one JSONL file
    per module, for instruction tuning offline:
        python scripts/tokenize.py stdlib-pairs --out_dir data/pairs-src
        python scripts/tokenize.py --corpus.source data/pairs-src --corpus.split_by file --out_dir data/pairs"""

    out_dir: Path = Path("data/pairs-src")
    preferences: bool = False
    """Write preference pairs instead: the same question, its own answer chosen, the next function's
    of the same module rejected (for make dpo)."""


def cmd_pairs(cfg: PairsConfig) -> None:
    from lib.data.stdlib_pairs import write_pairs

    counts = write_pairs(cfg.out_dir, cfg.preferences)
    kind = "preference (prompt/chosen/rejected)" if cfg.preferences else "prompt/completion"
    print(f"wrote {counts['pairs']:,} {kind} pairs from {counts['modules']} standard-library modules "
          f"to {cfg.out_dir}/<module>.jsonl")


SUBCOMMANDS = {"train": (TrainTokenizerConfig, cmd_train), "encode": (EncodeConfig, cmd_encode),
               "decode": (DecodeConfig, cmd_decode), "inspect": (InspectConfig, cmd_inspect),
               "stdlib-pairs": (PairsConfig, cmd_pairs)}


def held_out_note(cc, corpus: dict) -> str:
    """How the held-out split was sized: the share asked for, raised to the floors or not, and a
    warning when it stays below them (figures on it would be too noisy to compare)."""
    val = corpus["splits"]["val"]
    used = corpus.get("val_per_mille_used", cc.val_per_mille)
    what = f"held-out split: {val['records']} documents, {val['text_bytes']:,} bytes"
    if used != cc.val_per_mille:
        what += (f" (share raised from {cc.val_per_mille / 10:g}% to {used / 10:g}% of documents to reach the floor of "
                 f"{cc.val_min_bytes:,} bytes and {cc.val_min_docs} documents)")
    missed = ([f"{cc.val_min_bytes:,} bytes (--corpus.val_min_bytes)"] * (val["text_bytes"] < cc.val_min_bytes)
              + [f"{cc.val_min_docs} documents (--corpus.val_min_docs)"] * (val["records"] < cc.val_min_docs))
    if missed:
        what += (f"; WARNING: below the floor of {' and '.join(missed)} even at --corpus.val_max_per_mille "
                 f"{cc.val_max_per_mille}: its bits per byte (the model's and the compressors') are noisy; give "
                 "more text")
    return what


@exit_on_user_error
def main() -> None:
    argv = sys.argv[1:]
    if argv and argv[0] in SUBCOMMANDS:
        cls, run = SUBCOMMANDS[argv[0]]
        prog = f"{os.path.basename(sys.argv[0])} {argv[0]}"
        return run(config_lib.parse(cls, argv[1:], description=cls.__doc__, prog=prog))
    # `--tokenizer NAME_OR_FOLDER`, as the subcommands spell it, is the pipeline's --tokenizer.pretrained
    argv = [a.replace("--tokenizer=", "--tokenizer.pretrained=", 1) for a in argv]
    argv = ["--tokenizer.pretrained" if a == "--tokenizer" and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            else a for i, a in enumerate(argv)]
    cfg = config_lib.parse(TokenizeConfig, argv, description=__doc__)
    from lib import plugins
    from lib.files import ensure_writable, no_empty_folder_left

    plugins.warn_failures(plugins.load(cfg.plugins))  # a reader they add applies to --corpus.source
    from lib.data.pipeline import stage_tokenizer, stage_tokens

    with no_empty_folder_left(cfg.out_dir):  # a failed first build leaves no empty out_dir behind
        ensure_writable(cfg.out_dir, "--out_dir")
        writing_to(cfg.out_dir)  # named by a disk-full error whose file is not known
        t0 = time.time()
        corpus_dir = cfg.out_dir / "corpus"
        corpus = build_corpus(cfg.corpus, corpus_dir)
        for split, info in corpus["splits"].items():
            log(f"corpus: {split}: {info['records']} records, {info['text_bytes'] / 1e6:.2f} MB "
                f"in {len(info['shards'])} shard(s)")
        log(f"corpus: skipped {corpus['skipped'] or 'nothing'}; content hash {corpus['content_hash'][:16]}")
        for kind, first in corpus.get("skipped_first", {}).items():
            log(f"corpus: the first {kind} skipped: {first}")
        log(held_out_note(cfg.corpus, corpus))
        tok_dir = stage_tokenizer(cfg.out_dir, corpus_dir, corpus["content_hash"], cfg.tokenizer, cfg.force, log)
        tokens = stage_tokens(cfg.out_dir, corpus_dir, corpus, tok_dir, cfg.force, log)
        log(f"special ids: {tokens['special_ids']}; vocab {tokens['vocab_size']}")
        for split, info in tokens["splits"].items():
            log(f"tokens: {split}: {info['tokens']:,} tokens in {info['docs']} documents")
        config_lib.save(cfg, cfg.out_dir / "tokenize_config.yaml")  # what built the dataset, once it is built
        log(f"done in {time.time() - t0:.1f}s: {cfg.out_dir}")


if __name__ == "__main__":
    main()
