"""SentencePiece training, encoding, and an exact Hugging Face fast-tokenizer twin.

Settings chosen so that text round-trips exactly (code is whitespace-sensitive): identity
normalization, no dummy prefix, no whitespace collapsing, byte fallback for any character
outside the vocabulary, and "\\n" as its own piece (SentencePiece trains on lines, so it would
otherwise never see a newline). Special ids are fixed: unk 0, bos 1, eos 2, pad 3.

The Hugging Face tokenizer is built explicitly from the SentencePiece vocabulary (for BPE, a BPE
model whose merges are ranked by the SentencePiece piece scores: identical ids; for unigram, a
Unigram model with the same scores: identical except where two segmentations tie exactly in
score, which the two libraries break differently) rather than through
`LlamaTokenizerFast(vocab_file=...)`, which in transformers 5 silently produced a tokenizer of
three pieces. Tests check its ids against SentencePiece itself.
"""
from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Optional

from lib.errors import UserError
from lib.data.fast_encoder import WordCachedEncoder, _read_proto, cache_levels, packed_code  # noqa: F401  (packed_code: encode.py)

if TYPE_CHECKING:
    import sentencepiece

SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
SPECIAL_PIECES = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}
SP_MODEL = "sp.model"
# A Hugging Face tokenizer's files that decide which ids a text becomes: copied verbatim from a
# base model, so that the data, the base and the final model show the same fingerprint.
ENCODING_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
# Its files that only tell a client how to use it (special tokens, bos handling, chat template).
CLIENT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass
class TokenizerConfig:
    """SentencePiece training settings."""

    vocab_size: int = 8192
    model_type: Literal["bpe", "unigram"] = "bpe"
    character_coverage: float = 0.9999
    """Share of characters covered by pieces; the rest are spelled as UTF-8 bytes."""
    byte_fallback: bool = True
    max_lines: int = 400_000
    """Lines sampled (seeded) from the train split to train on; SentencePiece trains on lines."""
    user_defined_symbols: list[str] = field(default_factory=list)
    """Extra strings that always become one piece (added after "\\n")."""
    seed: int = 0
    pretrained: Optional[str] = None
    """Encode with this model's own tokenizer instead of training one (the settings above are then
    unused): a model name (gpt2, tinyllama, org/name in the Hugging Face cache), a model folder,
    or a folder of tokenizer files. The way to prepare text for fine-tuning that model; tokenize.py
    also takes it as --tokenizer NAME."""


def _line_iter(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(texts: Iterable[str], out_dir: str | Path, cfg: TokenizerConfig) -> Path:
    """Train a SentencePiece model on `texts` and write `out_dir/sp.model`; return its path.

    Deterministic for a given text stream and `cfg` (SentencePiece's sampler is seeded).
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.vocab_size < 260 + len(cfg.user_defined_symbols) and cfg.byte_fallback:
        raise UserError(
            f"tokenizer.vocab_size={cfg.vocab_size} is too small: byte fallback alone needs 256 "
            "pieces plus 4 special ones; use at least 300"
        )
    spm.set_random_generator_seed(cfg.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_line_iter(texts),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            input_sentence_size=cfg.max_lines,
            shuffle_input_sentence=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n", *cfg.user_defined_symbols],
            unk_id=SPECIAL_IDS["unk"],
            bos_id=SPECIAL_IDS["bos"],
            eos_id=SPECIAL_IDS["eos"],
            pad_id=SPECIAL_IDS["pad"],
            unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"],
            pad_piece=SPECIAL_PIECES["pad"],
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as exc:  # SentencePiece's own checks: a vocabulary too small for the characters, or too large
        raise UserError(sentencepiece_advice(str(exc), cfg.vocab_size, cfg.character_coverage)) from None
    path = out_dir / SP_MODEL
    path.write_bytes(model.getvalue())
    return path


def sentencepiece_advice(error: str, vocab_size: int, coverage: float) -> str:
    """The one-line message for SentencePiece refusing to train, with the change that fixes it: a
    vocabulary too large for the text ("Vocabulary size too high (400). Please set it to a value
    <= 312.") is lowered; one too small for the characters is raised, or fewer characters kept."""
    import re

    reason = error.split("] ", 1)[-1].split(" Increase vocab_size")[0].strip()
    head = f"SentencePiece cannot train with tokenizer.vocab_size={vocab_size}, " \
           f"tokenizer.character_coverage={coverage}: {reason}"
    most = re.search(r"too high.*?<=\s*(\d+)", reason)
    if most:
        return (f"{head} Lower --tokenizer.vocab_size to {most.group(1)} or less (this text holds no more distinct "
                "pieces), or give more text.")
    return f"{head} Raise --tokenizer.vocab_size or lower --tokenizer.character_coverage."


def load_sentencepiece(path: str | Path) -> "sentencepiece.SentencePieceProcessor":
    """Load a SentencePiece model file, with a clear error when it is missing or broken."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer model {path} not found: run `make tokenize` first")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{path} is not a SentencePiece model ({exc})") from None
    return sp


def load_hf_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local folder, without transformers' warning that a text is
    longer than the model's positions ("... will result in indexing errors"): this project never
    feeds a whole document to a model (packing cuts it into blocks; generation keeps the last
    positions), so the warning would only mislead."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if hasattr(tok, "deprecation_warnings"):
        tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def tokenizer_fingerprint(path: str | Path) -> str | None:
    """What decides a tokenizer's ids, as one sha256: a SentencePiece model's bytes (the file, or a
    folder holding sp.model), else a hash of the encoding files a folder holds (ENCODING_FILES),
    else None (no tokenizer there). Client settings (tokenizer_config.json) are left out: an
    export may rewrite them without changing a single id."""
    from lib.files import canonical_hash, sha256_file

    path = tokenizer_source(path)
    if path.is_file():
        return sha256_file(path)
    files = {name: sha256_file(path / name) for name in ENCODING_FILES if (path / name).is_file()}
    return canonical_hash(files) if files else None


def tokenizer_source(path: str | Path) -> Path:
    """What to load for the tokenizer in `path`: its sp.model when it holds one (this project's
    tokenizers, whose Hugging Face twin gives the same ids), else `path` itself (a .model file or a
    Hugging Face tokenizer folder)."""
    path = Path(path)
    return path / SP_MODEL if path.is_dir() and (path / SP_MODEL).is_file() else path


def has_tokenizer(folder: str | Path) -> bool:
    """Whether `folder` holds a tokenizer this project can load (SentencePiece or Hugging Face)."""
    folder = Path(folder)
    return (folder / SP_MODEL).is_file() or any((folder / n).is_file() for n in ENCODING_FILES)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a tokenizer's files (sp.model, the Hugging Face encoding and client files) from `src`
    to `dst` byte for byte; returns their names."""
    import shutil

    names = [n for n in (SP_MODEL, *ENCODING_FILES, *CLIENT_FILES) if (Path(src) / n).is_file()]
    for name in names:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return names


def special_ids(sp) -> dict[str, int]:
    """The special ids a SentencePiece model was trained with (-1 where disabled)."""
    return {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}


def _bpe_merges(sp, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every pair (a, b) whose concatenation is a piece, ranked by that piece's score.

    SentencePiece BPE merges the adjacent pair whose concatenation has the highest score;
    a Hugging Face BPE model with merges in this order makes the same choices.
    """
    ranked = []
    for piece, pid in vocab.items():
        if not sp.is_unknown(pid) and not sp.is_control(pid) and not sp.is_byte(pid):
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    ranked.append((-sp.get_score(pid), pid, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_hf_tokenizer(sp_model_path: str | Path):
    """A transformers fast tokenizer whose ids equal SentencePiece's for any text.

    It adds bos in front of each encoded text (as training documents start), knows the pad
    token, so batches can be padded, and treats special-token strings inside text ("<s>") as
    plain text, as SentencePiece does.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    sp = load_sentencepiece(sp_model_path)
    if sp.pad_id() < 0:
        raise UserError(f"{sp_model_path} was trained without a pad id; retrain it with pad_id set")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    unk = sp.id_to_piece(sp.unk_id())
    proto, pb = _read_proto(sp_model_path)
    if proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM:
        # Control, unknown and byte pieces must never win a Viterbi path over literal text
        # ("<s>" typed in a file is three characters to SentencePiece).
        never = -1e9
        scores = [(sp.id_to_piece(i), never if (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))
                   else sp.get_score(i)) for i in range(sp.get_piece_size())]
        model = models.Unigram(scores, unk_id=sp.unk_id(), byte_fallback=True)
    else:
        model = models.BPE(vocab=vocab, merges=_bpe_merges(sp, vocab), unk_token=unk,
                           fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    specials = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                if sp.is_control(i) or sp.is_unknown(i)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    user_symbols = [p.piece for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in user_symbols])
    bos = sp.id_to_piece(sp.bos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=sp.id_to_piece(sp.eos_id()),
        unk_token=unk,
        pad_token=sp.id_to_piece(sp.pad_id()),
        clean_up_tokenization_spaces=False,
        # SentencePiece reads "<s>" in text as three characters, not as bos: do the same
        split_special_tokens=True,
    )


class TextTokenizer:
    """One interface over a SentencePiece `.model` file or a Hugging Face tokenizer folder.

    `encode` returns ids without special tokens; `encode_batch` adds them. Tokenizers without a
    pad token (GPT-2) get one only when asked: `pad_token="eos"` pads with eos, any other string
    must already be a token of the vocabulary.
    """

    def __init__(self, path: str | Path, pad_token: str | None = None):
        path = Path(path)
        self.path, self.threads = path, None
        if path.is_file():
            self.kind = "sentencepiece"
            self._sp = load_sentencepiece(path)
            ids = special_ids(self._sp)
            self.vocab_size = self._sp.get_piece_size()
            self._piece_to_id = self._sp.piece_to_id
            words, units = cache_levels(path)
            self._words = WordCachedEncoder(self._sp, units=units) if words else None
        elif (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
            self.kind = "huggingface"
            try:
                self._hf = load_hf_tokenizer(path)
            except (OSError, ValueError) as exc:
                raise UserError(f"{path}: not a loadable Hugging Face tokenizer ({exc})") from None
            h = self._hf
            ids = {"unk": _or_none(h.unk_token_id), "bos": _or_none(h.bos_token_id),
                   "eos": _or_none(h.eos_token_id), "pad": _or_none(h.pad_token_id)}
            self.vocab_size = len(h)
            self._piece_to_id = lambda piece: h.convert_tokens_to_ids(piece)
        else:
            raise UserError(f"{path}: neither a SentencePiece .model file nor a tokenizer folder")
        self.ids = {k: (None if v is None or v < 0 else v) for k, v in ids.items()}
        if pad_token is not None:
            if pad_token == "eos":
                if self.ids["eos"] is None:
                    raise UserError(f"{path} has no eos token to pad with")
                self.ids["pad"] = self.ids["eos"]
            else:
                pid = self._piece_to_id(pad_token)
                if pid is None or (self.ids["unk"] is not None and pid == self.ids["unk"] and pad_token != "<unk>"):
                    raise UserError(f"--pad_token {pad_token!r} is not a token of {path}")
                self.ids["pad"] = pid

    def document_ends(self) -> tuple[bool, bool]:
        """(add bos, add eos) for a document stored in the token shards: bos where the tokenizer
        has one, eos where it has one that is not also its bos. GPT-2's one <|endoftext|> thus
        separates documents once, as in its own training, and never twice in a row."""
        bos, eos = self.ids["bos"], self.ids["eos"]
        return bos is not None, eos is not None and eos != bos

    def set_threads(self, n: int | None) -> None:
        """Threads SentencePiece may use per call (None: every core). 1 in worker processes
        that already keep every core busy: its threads would only contend (a tenth more CPU)."""
        self.threads = n
        if self.kind == "sentencepiece" and self._words is not None:
            self._words.threads = n

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no special tokens added."""
        if self.kind == "sentencepiece":
            if self._words is not None:
                return self._words.encode(texts)
            return self._sp.encode(texts, num_threads=self.threads or os.cpu_count() or 1)
        # a special-token string inside training text ("<|endoftext|>" in a file) stays text, as
        # SentencePiece keeps it, whatever the tokenizer's own setting for its clients
        return self._hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    @property
    def word_cached(self) -> bool:
        """True when texts go through the word cache (lib/fast_encoder.WordCachedEncoder): encode_packed
        and encode_id_text then skip building Python lists of ids."""
        return self.kind == "sentencepiece" and self._words is not None

    def encode_packed(self, texts: list[str], add_bos: bool, add_eos: bool) -> tuple[bytes, list[int]]:
        """The texts' ids, each between bos and eos as asked, packed end to end as machine
        integers of array typecode `packed_code(vocab_size)`, and the number of ids of each."""
        from array import array

        code = packed_code(self.vocab_size)
        head = [self.ids["bos"]] if add_bos else []
        tail = [self.ids["eos"]] if add_eos else []
        if self.word_cached:
            packed = self._words.encode_packed(texts, code, array(code, head).tobytes(), array(code, tail).tobytes())
            size = array(code).itemsize
            return b"".join(packed), [len(p) // size for p in packed]
        ids = [head + x + tail for x in self.encode(texts)]
        return array(code, itertools.chain.from_iterable(ids)).tobytes(), list(map(len, ids))

    def encode_id_text(self, texts: list[str], add_bos: bool, add_eos: bool) -> list[tuple[str, int]]:
        """Each text's ids (between bos and eos as asked) as the text json.dumps writes inside the
        list's brackets ("1, 52, 9"), and their number."""
        head = [str(self.ids["bos"])] if add_bos else []
        tail = [str(self.ids["eos"])] if add_eos else []
        pairs = self._words.encode_text(texts) if self.word_cached else [
            (", ".join(map(str, x)), len(x)) for x in self.encode(texts)]
        return [(", ".join(head + ([joined] if joined else []) + tail), n + len(head) + len(tail))
                for joined, n in pairs]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        if self.kind == "sentencepiece":
            specials = {v for v in self.ids.values() if v is not None}
            return self._sp.decode([i for i in ids if not (skip_special and i in specials)])
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def pieces(self, text: str) -> list[str]:
        if self.kind == "sentencepiece":
            return [self._sp.id_to_piece(i) for i in self._sp.encode(text)]
        return self._hf.convert_ids_to_tokens(self.encode([text])[0])


def _or_none(v):
    return None if v is None else int(v)


@dataclass
class EncodeOptions:
    """Special tokens, truncation and padding for `encode_batch`."""

    add_bos: bool = True
    add_eos: bool = False
    max_length: int | None = None
    """Truncate to this many tokens, special tokens included."""
    truncation_side: Literal["right", "left"] = "right"
    padding: Literal["none", "longest", "max_length"] = "none"
    padding_side: Literal["right", "left"] = "right"


def encode_batch(tok: TextTokenizer, texts: list[str], opts: EncodeOptions) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, attention_mask) per text, as a Hugging Face tokenizer called with the same options.

    Truncation cuts the text's own tokens (from the chosen side) and keeps bos/eos, so a
    truncated sequence still starts and ends like any other.
    """
    for name in ("bos", "eos"):
        if getattr(opts, f"add_{name}") and tok.ids[name] is None:
            raise UserError(f"{tok.path} has no {name} token; drop --add_{name}")
    if opts.padding != "none" and tok.ids["pad"] is None:
        raise UserError(f"{tok.path} has no pad token: pass --pad_token eos (or another token) to pad")
    if opts.padding == "max_length" and not opts.max_length:
        raise UserError("--padding max_length needs --max_length")
    head = [tok.ids["bos"]] if opts.add_bos else []
    tail = [tok.ids["eos"]] if opts.add_eos else []
    budget = None if opts.max_length is None else opts.max_length - len(head) - len(tail)
    if budget is not None and budget < 0:
        raise UserError(f"--max_length {opts.max_length} leaves no room for the special tokens")
    out = []
    for ids in tok.encode(list(texts)) if len(texts) else []:
        if budget is not None and len(ids) > budget:
            ids = ids[:budget] if opts.truncation_side == "right" else ids[len(ids) - budget:]
        out.append(head + list(ids) + tail)
    masks = [[1] * len(x) for x in out]
    if opts.padding != "none" and out:
        width = opts.max_length if opts.padding == "max_length" else max(len(x) for x in out)
        for i, x in enumerate(out):
            fill = width - len(x)
            if opts.padding_side == "right":
                out[i], masks[i] = x + [tok.ids["pad"]] * fill, masks[i] + [0] * fill
            else:
                out[i], masks[i] = [tok.ids["pad"]] * fill + x, [0] * fill + masks[i]
    return out, masks
