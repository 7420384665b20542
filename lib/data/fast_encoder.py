"""The word-cached encoder: a SentencePiece model's encodings of words (or smaller units) cached,
so that a corpus, whose words repeat, is encoded a word at a time from the cache, with the same ids
as encoding whole texts. lib/tokenizer.TextTokenizer uses it where the model allows (cache_levels).
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Iterator

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
