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
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Optional

from lib.errors import UserError

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
    except RuntimeError as exc:  # SentencePiece's own checks, such as a vocabulary too small for the characters
        reason = str(exc).split("] ", 1)[-1].split(" Increase vocab_size")[0]
        raise UserError(f"SentencePiece cannot train with tokenizer.vocab_size={cfg.vocab_size}, "
                        f"tokenizer.character_coverage={cfg.character_coverage}: {reason} Raise "
                        "--tokenizer.vocab_size or lower --tokenizer.character_coverage.") from None
    path = out_dir / SP_MODEL
    path.write_bytes(model.getvalue())
    return path


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


def _read_proto(sp_model_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(sp_model_path).read_bytes())
    return proto, pb


# Where a SentencePiece model's pieces never cross a word boundary, encoding a text equals
# encoding its words one by one and concatenating. Words here: a run of spaces with the
# non-space characters after it (SentencePiece starts a new word at a space that follows a
# non-space), or spaces before a newline or the end, or a newline alone. Their encodings are cached.
# A literal "\u2581" in text is a space to SentencePiece (spaces become it before encoding).
# Possessive quantifiers (nothing to backtrack into) make the regex a tenth faster.
_WORD = re.compile("[ \u2581]*+[^ \u2581\n]++|[ \u2581]++|\n")  # the commonest case first
_CROSSES_WORDS = re.compile("[^\u2581]\u2581|\n.|.\n", re.S)
# Units: a word cut further where its characters change class (letters, digits, anything else;
# "_" counts as punctuation), leading spaces staying with the first unit, newlines alone. BPE
# merges only adjacent symbols whose concatenation is a piece, so a cut that no piece spans is
# never merged across; SentencePiece's default training (split_by_unicode_script,
# split_by_number) makes no piece that mixes these classes.
# "  foo.bar_baz(12)" -> "  foo", ".", "bar", "_", "baz", "(", "12", ")". _SEP, a unit of its
# own, separates the words that are split together.
_SEP = "\x00"
_UNIT = re.compile(r"[ \u2581]*+(?:[^\W\d_]++|\d++|(?:[^\w \u2581\n\x00]|_)++)|[ \u2581]++|\n|\x00")
# the same cuts on ASCII text, in plain byte classes: a regex pass nearly twice as fast
_UNIT_ASCII = re.compile(r" *+(?:[A-Za-z]++|[0-9]++|[^A-Za-z0-9 \n\x00]++)| ++|\n|\x00", re.ASCII)


def cache_levels(sp_model_path) -> tuple[bool, bool]:
    """(word_local, unit_local) of a SentencePiece model, from one read of its file.

    word_local: encoding word by word (`_WORD`) gives exactly the model's ids: a BPE model with
    identity normalization, no dummy prefix or whitespace collapsing, and no piece that spans a
    non-space followed by a space or holds a newline beside anything else. Not unigram: its
    Viterbi search breaks exact ties between segmentations by the rounding of scores summed
    from the start of the text, so a word's pieces can depend on what precedes it.

    unit_local: word_local, and every piece lies within one unit (`_UNIT`), so that no merge
    ever spans a cut between units. Pieces checked: those BPE may form from text (normal,
    user-defined and unused ones; SentencePiece puts unused ones in its merge table too).
    """
    proto, pb = _read_proto(sp_model_path)
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        return False, False
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        return False, False
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return False, False
    kinds = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED,
             pb.ModelProto.SentencePiece.UNUSED)
    pieces = [p.piece for p in proto.pieces if p.type in kinds]
    if any(_CROSSES_WORDS.search(p) for p in pieces):
        return False, False
    return True, all(len(_UNIT.findall(p)) == 1 for p in pieces)


def word_local(sp_model_path) -> bool:
    """Whether the model may be encoded word by word (see cache_levels)."""
    return cache_levels(sp_model_path)[0]


def unit_local(sp_model_path) -> bool:
    """Whether the model's words may also be encoded unit by unit (see cache_levels)."""
    return cache_levels(sp_model_path)[1]


class _IdsText:
    """Values as the text "id, id, ..." (what json.dumps writes inside a list's brackets)."""

    sep = _SEP  # the value of _SEP itself, where words split together are cut apart again
    empty = ""
    join = ", ".join

    def __init__(self, units: bool):
        self.units: dict[str, str] | None = {} if units else None

    @staticmethod
    def from_ids(encoded: list[list[int]]) -> list[str]:
        return _ids_text(encoded)

    @staticmethod
    def split(joined: str) -> list[str]:
        return joined.split(f", {_SEP}, ")


class _IdsPacked:
    """Values as packed machine integers (array typecode "H": uint16, "I": uint32).

    The separator value is the all-ones integer. No id equals it, and no misaligned run of bytes
    of joined values can: that would need an id whose top byte is all ones (>= 0xFF00 for uint16).
    """

    empty = b""
    join = b"".join

    def __init__(self, units: bool, code: str):
        from array import array

        self.code, self.size, self.array = code, array(code).itemsize, array
        self.limit = 0xFF << (8 * self.size - 8)  # ids must stay below it
        self.sep = array(code, [(1 << 8 * self.size) - 1]).tobytes()
        self.units: dict[str, bytes] | None = {} if units else None

    def from_ids(self, encoded: list[list[int]]) -> list[bytes]:
        flat = self.array(self.code, itertools.chain.from_iterable(encoded)).tobytes()
        ends = list(itertools.accumulate(len(e) * self.size for e in encoded))
        return [flat[a:b] for a, b in zip([0] + ends, ends)]

    def split(self, joined: bytes) -> list[bytes]:
        return joined.split(self.sep)


class _Form:
    """One form of cached values: a codec's, or what `convert` makes of a batch of them. Keyed
    three ways: `pieces` (bytes p -> the value of " " + p), `firsts` (bytes p -> the value of p,
    for the first piece of a text) and `words` (str, for texts the piece split cannot take)."""

    def __init__(self, codec, convert=None):
        self.codec, self.convert = codec, convert
        self.empty = next(iter(convert([codec.empty]))) if convert else codec.empty
        self.pieces: dict[bytes, object] = {}
        self.firsts: dict[bytes, object] = {}
        self.words: dict[str, object] = {}

    def caches(self) -> list[dict]:
        return [self.pieces, self.firsts, self.words]


def _split_pieces(encs: list[bytes]) -> tuple[list[bytes], list[int]]:
    """Cut UTF-8 texts (holding no NUL and no "\u2581") into pieces at every space that follows
    anything but a space or a newline: the words of `_WORD`, except that a newline, the spaces
    after it and the next word stay with what precedes them. Each such space becomes a NUL and
    one bytes.split cuts there, so every piece after the first of a text stands for " " + piece.
    Returns the pieces of all the texts and the index of each text's first piece."""
    import numpy as np

    data = b"\0".join(encs)
    arr = np.frombuffer(data, np.uint8)
    space = arr == 32
    cut = space.copy()
    cut[1:] &= ~(space[:-1] | (arr[:-1] == 10) | (arr[:-1] == 0))  # (NUL: the start of a text)
    cut[:1] = False
    at = np.flatnonzero(cut)
    buf = arr.copy()
    buf[at] = 0
    pieces = buf.tobytes().split(b"\0")
    starts = np.cumsum([0] + [len(e) + 1 for e in encs[:-1]])
    return pieces, (np.arange(len(encs)) + np.searchsorted(at, starts)).tolist()


_UNIT_CLASS = None  # byte -> 0 space, 1 newline or NUL, 2 letter, 3 digit, 4 other ASCII, 5 not ASCII


def _split_units(data: bytes) -> list[bytes]:
    """UTF-8 bytes cut into units as `_UNIT` cuts ASCII text (NULs stand alone): a cut before
    and after every newline or NUL, before a space that follows a non-space, and between a
    letter, digit, other character or run of non-ASCII bytes and one of another class (a run of
    non-ASCII bytes may need other cuts: the caller cuts texts holding one again). Numpy marks
    the cuts, every byte is repeated once more where one falls, the first copy becomes 0xFF (no
    byte of UTF-8), and one bytes.split cuts there: half the time of the regex."""
    import numpy as np

    global _UNIT_CLASS
    if _UNIT_CLASS is None:
        table = np.full(256, 4, np.uint8)
        table[128:] = 5
        table[[32, 10, 0]] = 0, 1, 1
        for lo, hi, cls in ((b"a", b"z", 2), (b"A", b"Z", 2), (b"0", b"9", 3)):
            table[lo[0] : hi[0] + 1] = cls
        _UNIT_CLASS = table
    if not data:
        return []
    arr = np.frombuffer(data, np.uint8)
    c = _UNIT_CLASS[arr]
    prev, cur = c[:-1], c[1:]
    cut = (cur == 1) | (prev == 1) | ((cur == 0) & (prev != 0)) | ((prev >= 2) & (cur != prev))
    repeats = np.ones(len(arr), np.intp)
    repeats[1:] += cut
    out = np.repeat(arr, repeats)
    at = np.flatnonzero(cut) + 1
    out[at + np.arange(len(at))] = 0xFF
    return out.tobytes().split(b"\xff")


class WordCachedEncoder:
    """SentencePiece encoding through a cache of word encodings: the same ids, several times
    faster on real text, where most words recur. A cache is cleared when it reaches
    `max_words`, so memory stays bounded on any corpus.

    Texts are cut where `_split_pieces` cuts them (numpy and one bytes.split: twice as fast as
    a regex, and a third fewer keys than words), or, when they hold a NUL or a literal "\u2581",
    into `_WORD` words. Three forms of the same ids, each with its own caches: `encode` (lists
    of ints; the caches hold tuples), `encode_text` (the text "id, id, ...", so that JSON is
    written without a list of ints per text) and `encode_packed` (bytes of uint16/uint32, for
    .npy token streams).

    With `units` (for models where `unit_local` holds), keys missing from a cache are built from
    a second cache of units instead of being encoded whole: SentencePiece's cost goes with the
    characters it is given, and distinct units hold a fifth of the
    characters of distinct pieces ("self.assertEqual" and "self.assertTrue" share "self" and ".").
    """

    def __init__(self, sp, max_words: int = 300_000, units: bool = False):
        self.sp, self.max_words, self.use_units = sp, max_words, units
        self.threads: int | None = None  # SentencePiece's threads per call (None: every core)
        text = _IdsText(units)
        self._forms: dict[str, _Form] = {"text": _Form(text), "tuple": _Form(text, _ids_tuples)}

    def _sp_encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=self.threads)

    def _form(self, code: str) -> _Form:
        """The form of packed ids of typecode `code`."""
        form = self._forms.get(code)
        if form is None:
            codec = _IdsPacked(self.use_units, code)
            if self.sp.get_piece_size() > codec.limit:
                raise ValueError(f"a vocabulary of {self.sp.get_piece_size()} ids does not fit typecode {code!r}")
            form = self._forms[code] = _Form(codec)
        return form

    def _values(self, keys: list, codec, prefix: bytes = b"", raws: list[bytes] | None = None) -> tuple[list, list]:
        """The codec's value (ids as text or packed bytes) of the text `prefix + raw` of each
        key (raws: UTF-8, default the keys themselves), with its key, in an order of its
        choosing: (keys, values)."""
        raws = keys if raws is None else raws
        if codec.units is None:
            return keys, codec.from_ids(self._sp_encode([(prefix + r).decode("utf-8") for r in raws]))
        sep = b"\0" + prefix
        joined = prefix + sep.join(raws)
        if joined.count(b"\0") != len(raws) - 1:  # texts holding a NUL (_SEP) are encoded whole
            odd = [i for i, r in enumerate(raws) if b"\0" in r]
            plain = [i for i, r in enumerate(raws) if b"\0" not in r]
            plain_keys, values = self._values([keys[i] for i in plain], codec, prefix, [raws[i] for i in plain])
            values += codec.from_ids(self._sp_encode([(prefix + raws[i]).decode("utf-8") for i in odd]))
            return plain_keys + [keys[i] for i in odd], values
        values = self._unit_values(_split_units(joined), codec)
        if not joined.isascii():
            # _split_units keeps runs of non-ASCII bytes together, where Unicode classes may call
            # for other cuts: the texts holding any are cut again by the regex
            import numpy as np

            arr = np.frombuffer(joined, np.uint8)
            redo = np.unique(np.searchsorted(np.flatnonzero(arr == 0), np.flatnonzero(arr >= 0x80))).tolist()
            text = (prefix + sep.join([raws[i] for i in redo])).decode("utf-8")
            for i, v in zip(redo, self._unit_values([u.encode("utf-8") for u in _UNIT.findall(text)], codec)):
                values[i] = v
        return keys, values

    def _unit_values(self, units: list[bytes], codec) -> list:
        """The values of the texts whose units (UTF-8) are `units`, texts separated by NUL
        units: built from the unit cache, the values of all of them joined in one pass and cut
        apart again where the separators were."""
        cache = codec.units
        missing = set(units).difference(cache)
        if len(cache) + len(missing) > self.max_words:
            cache.clear()
            missing = set(units)
        missing.discard(b"\0")
        if missing:
            missing = list(missing)
            cache.update(zip(missing, codec.from_ids(self._sp_encode([u.decode("utf-8") for u in missing]))))
        cache[b"\0"] = codec.sep
        return codec.split(codec.join(map(cache.__getitem__, units)))

    def _fill(self, cache: dict, distinct: set, form: _Form, prefix: bytes = b"", raw_of=None) -> None:
        """Put the value of every key of `distinct` in `cache` (the value of the text
        `prefix + raw_of(key)`, see _values), clearing the cache first when it would outgrow
        max_words."""
        missing = distinct.difference(cache)
        if not missing:
            return
        if len(cache) + len(missing) > self.max_words:
            cache.clear()
            missing = distinct
        keys = list(missing)
        raws = list(map(raw_of, keys)) if raw_of else list(keys)
        if not prefix and b"" in raws:  # (the first piece of an empty text)
            i = raws.index(b"")
            cache[keys.pop(i)] = form.empty
            raws.pop(i)
        if keys:
            keys, values = self._values(keys, form.codec, prefix, raws)
            cache.update(zip(keys, form.convert(values) if form.convert else values))

    def _doc_values(self, texts: list[str], form: _Form) -> list[list]:
        """Each text's list of cached values, in order."""
        out: list = [None] * len(texts)
        fast = [i for i, t in enumerate(texts) if _SEP not in t and "\u2581" not in t]
        if fast:
            pieces, first = _split_pieces([texts[i].encode("utf-8") for i in fast])
            self._fill(form.pieces, set(pieces), form, b" ")
            firsts = [pieces[i] for i in first]
            self._fill(form.firsts, set(firsts), form)
            get, head = form.pieces.__getitem__, form.firsts
            for i, a, b, p in zip(fast, first, first[1:] + [len(pieces)], firsts):
                out[i] = [head[p], *map(get, pieces[a + 1 : b])]
        if len(fast) < len(texts):
            rest = [i for i, t in enumerate(texts) if _SEP in t or "\u2581" in t]
            split = [_WORD.findall(texts[i]) for i in rest]
            self._fill(form.words, set(itertools.chain.from_iterable(split)), form, raw_of=lambda w: w.encode("utf-8"))
            get = form.words.__getitem__
            for i, words in zip(rest, split):
                out[i] = list(map(get, words))
        return out

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [list(itertools.chain.from_iterable(v)) for v in self._doc_values(texts, self._forms["tuple"])]

    def encode_text(self, texts: list[str]) -> list[tuple[str, int]]:
        """Each text's ids as the text "id, id, ..." (what json.dumps writes inside the brackets)
        and their number."""
        out = []
        for values in self._doc_values(texts, self._forms["text"]):
            joined = ", ".join(values)
            out.append((joined, joined.count(",") + 1 if joined else 0))
        return out

    def encode_packed(self, texts: list[str], code: str = "H", head: bytes = b"", tail: bytes = b"") -> list[bytes]:
        """Each text's ids packed as machine integers of array typecode `code` ("H": uint16,
        "I": uint32), between the packed ids `head` and `tail`."""
        docs = self._doc_values(texts, self._form(code))
        if head or tail:
            return [head + b"".join(values) + tail for values in docs]
        return list(map(b"".join, docs))


def _ids_text(encoded: list[list[int]]) -> list[str]:
    """["1, 2", "3"] for [[1, 2], [3]] (json.dumps's text inside the brackets), in one str()."""
    return str(encoded)[2:-2].split("], [")  # every word has at least one id


def _ids_tuples(texts: list[str]) -> Iterator[tuple[int, ...]]:
    """The inverse of _ids_text: [(1, 2), (3,)] for ["1, 2", "3"], parsed in one json.loads."""
    return map(tuple, json.loads("[[" + "], [".join(texts) + "]]"))


def packed_code(vocab_size: int) -> str:
    """The array typecode (and numpy dtype character) of packed ids: "H" (uint16) while the
    vocabulary leaves the top byte value free (at most 65,280 ids; see _IdsPacked), else "I"."""
    return "H" if vocab_size <= 0xFF00 else "I"


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
            from transformers import AutoTokenizer

            self.kind = "huggingface"
            try:
                self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
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
        return self._hf(texts, add_special_tokens=False)["input_ids"]

    @property
    def word_cached(self) -> bool:
        """True when texts go through the word cache (lib/tokenizer.WordCachedEncoder): encode_packed
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
