"""SentencePiece round trips exactly, and the Hugging Face twin gives identical ids."""
from __future__ import annotations

import random
import re
from array import array

import pytest

from lib.data.corpus import CorpusConfig, build_corpus, iter_records
from lib.errors import UserError
from lib.data.tokenizer import (SPECIAL_IDS, EncodeOptions, TextTokenizer, TokenizerConfig, build_hf_tokenizer,
                           encode_batch, load_sentencepiece, train_sentencepiece)

TRICKY = [
    "def f(x):\n    return x\n",
    "\tindented\twith tabs\t\n\n\n   trailing   spaces   \n",
    "  leading spaces",
    "héllo wörld — ✓ 😀 中文 ﬁ",  # accents, dashes, emoji, CJK, a compatibility ligature
    "",
    "\n",
    " ",
    "x = 1e-3  # comment\r\n",
    "<s> </s> <pad> literal special-looking text",
    "".join(chr(c) for c in range(32, 127)),
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"tok_{request.param}")
    # the split of the first 120 files as the share alone makes it (no floor): the texts these
    # tests compare the two tokenizers on
    build_corpus(CorpusConfig(max_files=120, val_min_bytes=0, val_min_docs=0), tmp / "corpus")
    texts = [r["text"] for r in iter_records(tmp / "corpus", "train")]
    path = train_sentencepiece(texts, tmp / "tok", TokenizerConfig(vocab_size=600, model_type=request.param))
    hf = build_hf_tokenizer(path)
    hf.save_pretrained(str(tmp / "hf"))
    from transformers import AutoTokenizer

    return load_sentencepiece(path), AutoTokenizer.from_pretrained(str(tmp / "hf")), texts, tmp


def sp_model_type(sp) -> str:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return "unigram" if proto.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM else "bpe"


def test_special_ids(tok):
    sp, hf, _, _ = tok
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == tuple(SPECIAL_IDS.values())
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == tuple(SPECIAL_IDS.values())
    assert len(hf) == sp.get_piece_size() == 600


def test_round_trip_is_exact(tok):
    sp, hf, texts, _ = tok
    for text in TRICKY + texts[:50]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert hf.decode(hf(text, add_special_tokens=False).input_ids) == text


def test_hf_ids_equal_sentencepiece_ids(tok):
    sp, hf, texts, _ = tok
    rng = random.Random(0)
    lines = [line for t in texts for line in t.split("\n")]
    samples = TRICKY + texts + rng.sample(lines, 2000)
    # random byte-level noise exercises byte fallback
    samples += ["".join(chr(rng.randrange(32, 0x3000)) for _ in range(40)) for _ in range(200)]
    mismatched = [s for s in samples if sp.encode(s) != hf(s, add_special_tokens=False).input_ids]
    if sp_model_type(sp) == "bpe":
        assert not mismatched, f"{len(mismatched)} of {len(samples)} differ, e.g. {mismatched[0]!r}"
    else:
        # unigram: exact score ties (e.g. runs of whitespace pieces) are broken differently
        assert len(mismatched) <= len(samples) // 200, mismatched[:3]
        for s in mismatched:
            assert hf.decode(hf(s, add_special_tokens=False).input_ids) == s
            assert len(hf(s, add_special_tokens=False).input_ids) == len(sp.encode(s))
    assert TRICKY[8] not in mismatched  # special-token strings in text stay text


def test_hf_adds_bos_and_pads(tok):
    sp, hf, _, _ = tok
    enc = hf(["def f():", "x"], padding=True)
    assert enc.input_ids[0][0] == sp.bos_id() and enc.input_ids[1][0] == sp.bos_id()
    assert len(enc.input_ids[0]) == len(enc.input_ids[1])
    assert sp.pad_id() in enc.input_ids[1] and enc.attention_mask[1][-1] == 0


def test_newline_and_indent_are_pieces(tok):
    sp, _, _, _ = tok
    pieces = [sp.id_to_piece(i) for i in sp.encode("a\n    b")]
    assert "\n" in pieces
    assert "<0x0A>" not in pieces  # the newline is its own piece, not a byte fallback


def test_too_small_vocab_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="vocab_size=100"):
        train_sentencepiece(["abc"], tmp_path, TokenizerConfig(vocab_size=100))


@pytest.mark.parametrize("opts", [
    EncodeOptions(),
    EncodeOptions(max_length=12, padding="max_length"),
    EncodeOptions(max_length=9, truncation_side="left", padding="longest", padding_side="left"),
    EncodeOptions(add_bos=False, max_length=5, padding="longest"),
])
def test_encode_batch_matches_hf_call(tok, opts):
    """The library helper pads and truncates exactly as a transformers tokenizer called with the
    same options, whether it reads the SentencePiece file or the Hugging Face folder."""
    _, hf, _, tmp = tok
    batch = ["def f(x):\n    return x", "a", "class A:\n    pass\n" * 3, ""]
    hf.truncation_side, hf.padding_side = opts.truncation_side, opts.padding_side
    ref = hf(batch, add_special_tokens=opts.add_bos, truncation=opts.max_length is not None,
             max_length=opts.max_length, padding={"none": False}.get(opts.padding, opts.padding))
    for source in (tmp / "tok" / "sp.model", tmp / "hf"):
        ids, mask = encode_batch(TextTokenizer(source), batch, opts)
        assert ids == ref["input_ids"], source
        assert mask == ref["attention_mask"], source


def test_encode_batch_keeps_eos_when_truncating(tok):
    _, _, _, tmp = tok
    t = TextTokenizer(tmp / "tok" / "sp.model")
    full = t.encode(["class A:\n    pass\n" * 3])[0]
    ids, _ = encode_batch(t, ["class A:\n    pass\n" * 3], EncodeOptions(add_eos=True, max_length=6))
    assert ids == [[1, *full[:4], 2]]
    ids, _ = encode_batch(t, ["class A:\n    pass\n" * 3], EncodeOptions(add_eos=True, max_length=6, truncation_side="left"))
    assert ids == [[1, *full[-4:], 2]]


def test_encode_batch_errors(tok, tmp_path):
    _, _, _, tmp = tok
    t = TextTokenizer(tmp / "tok" / "sp.model")
    with pytest.raises(UserError, match="needs --max_length"):
        encode_batch(t, ["x"], EncodeOptions(padding="max_length"))
    with pytest.raises(UserError, match="no room"):
        encode_batch(t, ["x"], EncodeOptions(add_eos=True, max_length=1))
    with pytest.raises(UserError, match="neither"):
        TextTokenizer(tmp_path)


def test_gpt2_style_tokenizer_without_pad(tmp_path):
    """A tokenizer with no pad token pads only when told what to pad with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>").save_pretrained(tmp_path)
    t = TextTokenizer(tmp_path)
    assert t.ids["pad"] is None
    with pytest.raises(UserError, match="--pad_token eos"):
        encode_batch(t, ["ab", "a"], EncodeOptions(padding="longest", add_bos=False))
    ids, mask = encode_batch(TextTokenizer(tmp_path, pad_token="eos"), ["ab a", "b"], EncodeOptions(padding="longest", add_bos=False))
    assert ids == [[3, 1], [2, 0]] and mask == [[1, 1], [1, 0]]
    with pytest.raises(UserError, match="not a token"):
        TextTokenizer(tmp_path, pad_token="<nope>")
    # the special token's string inside training text stays text, not the token (its characters
    # are not in this toy vocabulary: they vanish rather than becoming id 0)
    assert 0 not in t.encode(["a <|endoftext|> b"])[0]


def _random_code_like(rng: random.Random, n: int) -> str:
    atoms = ["def", "return", " ", "  ", "    ", "\n", "\n\n", "\t", "x", "_y1", "(", "):", "12", "3.5", "é", "中文",
             "😀", "<s>", "</s>", "▁", "#", "'", '"', "\r\n", "ﬁ", "self.", "=", "==", "   \n", "\x00"]
    return "".join(rng.choice(atoms) for _ in range(n))


def test_word_cached_encoding_gives_sentencepiece_ids(tok):
    from lib.data.fast_encoder import (_UNIT, _UNIT_ASCII, _WORD, WordCachedEncoder, _split_pieces, _split_units, unit_local,
                                  word_local)

    # pieces, defined here independently: a run of spaces or not, then non-spaces or newlines with
    # the spaces after them (where lib.data.tokenizer cuts at spaces after anything but a space/newline)
    _PIECE = re.compile("[ \u2581]++(?:[^ \u2581\n]++|\n[ \u2581]*+)*+|(?:[^ \u2581\n]++|\n[ \u2581]*+)++")

    sp, _, texts, tmp = tok
    if sp_model_type(sp) == "unigram":
        assert not word_local(tmp / "tok" / "sp.model")  # see word_local: ties depend on context
        return
    # our training settings split pieces by script and number, so units are safe too
    assert word_local(tmp / "tok" / "sp.model") and unit_local(tmp / "tok" / "sp.model")
    assert _UNIT.findall("  foo.bar_baz(12)") == ["  foo", ".", "bar", "_", "baz", "(", "12", ")"]
    assert _WORD.findall("x\n\n  if a:\n \n") == ["x", "\n", "\n", "  if", " a:", "\n", " ", "\n"]
    rng = random.Random(0)
    samples = TRICKY + texts[:40] + [_random_code_like(rng, rng.randint(0, 200)) for _ in range(300)]
    for text in samples:  # the splits cover every character: none is silently dropped
        assert "".join(_WORD.findall(text)) == text and "".join(_UNIT.findall(text)) == text
        if "\x00" not in text and "\u2581" not in text:  # numpy's cuts are the regexes' cuts
            pieces, first = _split_pieces([text.encode()])
            assert first == [0] and [pieces[0]] + [b" " + p for p in pieces[1:]] == [p.encode() for p in _PIECE.findall(text) or [""]]
            ascii_text = text.encode("ascii", "replace").decode()
            assert _split_units(ascii_text.encode()) == [u.encode() for u in _UNIT.findall(ascii_text)]
        ascii_text = text.encode("ascii", "replace").decode()  # the ASCII regex cuts ASCII the same
        assert _UNIT_ASCII.findall(ascii_text) == _UNIT.findall(ascii_text)
    assert any(not t.isascii() for t in samples) and any(t.isascii() and "_" in t for t in samples)
    # a tiny cache: it is cleared many times along the way and must still give the same ids
    for enc in (WordCachedEncoder(sp), WordCachedEncoder(sp, max_words=50),
                WordCachedEncoder(sp, units=True), WordCachedEncoder(sp, max_words=50, units=True)):
        most_keys = most_units = 0
        for start in range(0, len(samples), 37):
            batch = samples[start : start + 37]
            assert enc.encode(batch) == sp.encode(batch)
            assert enc.encode_text(batch) == [(", ".join(map(str, ids)), len(ids)) for ids in sp.encode(batch)]
            for code, head, tail in (("H", b"", b""), ("I", array("I", [1]).tobytes(), array("I", [2, 2]).tobytes())):
                packed = enc.encode_packed(batch, code, head, tail)
                assert [array(code, p).tolist() for p in packed] == [array(code, head).tolist() + ids
                                                                     + array(code, tail).tolist() for ids in sp.encode(batch)]
            # bounded by max_words, or by the distinct keys (units) of the largest batch
            keys = {k for t in batch for k in (_WORD if "\x00" in t or "\u2581" in t else _PIECE).findall(t)}
            units = {u.encode() for t in batch for u in _UNIT.findall(t)}
            units |= {u for t in batch for u in _split_units(t.encode())}  # (non-ASCII runs kept whole)
            most_keys, most_units = max(most_keys, len(keys)), max(most_units, len(units) + 1)  # + the NUL
            for form in enc._forms.values():
                assert all(len(c) <= max(enc.max_words, most_keys) for c in form.caches())
                assert form.codec.units is None or len(form.codec.units) <= max(enc.max_words, most_units)
        assert all(bool(f.codec.units) == enc.use_units for f in enc._forms.values())  # the unit caches were used
    assert TextTokenizer(tmp / "tok" / "sp.model")._words.use_units


def test_unit_cache_is_off_for_models_with_pieces_across_classes(tmp_path):
    """A piece that joins a letter to punctuation ("x.y" as one user-defined symbol, or a model
    trained without splitting by script) would be cut apart unit by unit: units must be off,
    words still on, and the ids still SentencePiece's."""
    from lib.data.fast_encoder import WordCachedEncoder, unit_local, word_local

    texts = [f"x.y = self.value_{i} + 12\n    return x.y\n" for i in range(300)]
    path = train_sentencepiece(texts, tmp_path / "tok", TokenizerConfig(vocab_size=300, user_defined_symbols=["x.y"]))
    assert word_local(path) and not unit_local(path)
    tt = TextTokenizer(path)
    assert tt._words is not None and not tt._words.use_units
    assert tt.encode(texts[:5]) == tt._sp.encode(texts[:5])
    import sentencepiece as spm

    lines = [line for t in texts for line in t.splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "m"), vocab_size=80,
                                   model_type="bpe", hard_vocab_limit=False, minloglevel=2,
                                   normalization_rule_name="identity", add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, split_by_unicode_script=False,
                                   split_by_number=False)
    assert word_local(tmp_path / "m.model") and not unit_local(tmp_path / "m.model")
    # and the check matters: cut into units anyway, this model's ids would come out wrong
    sp = load_sentencepiece(tmp_path / "m.model")
    assert WordCachedEncoder(sp).encode(texts) == sp.encode(texts)
    assert WordCachedEncoder(sp, units=True).encode(texts) != sp.encode(texts)


def test_word_cache_is_off_for_models_that_merge_across_words(tmp_path):
    """A model with SentencePiece's default normalization (dummy prefix, collapsed spaces) must
    be encoded whole."""
    import sentencepiece as spm

    from lib.data.fast_encoder import word_local

    texts = [f"alpha beta gamma {i} delta  epsilon\n" * 3 for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "m"),
                                   vocab_size=60, model_type="bpe", hard_vocab_limit=False, minloglevel=2)
    assert not word_local(tmp_path / "m.model")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "n"),
                                   vocab_size=60, model_type="bpe", hard_vocab_limit=False, minloglevel=2,
                                   normalization_rule_name="identity",
                                   add_dummy_prefix=False, remove_extra_whitespaces=False,
                                   split_by_whitespace=False)
    # pieces such as "a▁b" span a space: word by word would differ
    assert not word_local(tmp_path / "n.model")
    tt = TextTokenizer(tmp_path / "n.model")
    assert tt._words is None and tt.encode(texts[:3]) == tt._sp.encode(texts[:3])


def test_packed_and_id_text_encodings_match_encode_batch(tmp_path, tiny_data):
    """The fast public encodings (the word cache's, and the plain fallback for a model that cannot
    take the cache) give exactly encode_batch's ids, with bos/eos where asked."""
    import json
    from array import array

    import sentencepiece as spm

    from lib.data.tokenizer import EncodeOptions, encode_batch, packed_code

    texts = ["def f(x):\n    return x + 1\n", "", "naïve café ▁ \x00 end", "a  b\n\n\tc"]
    whole = [f"alpha beta gamma {i} delta  epsilon\n" * 3 for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(whole), model_prefix=str(tmp_path / "n"),
                                   vocab_size=60, model_type="bpe", hard_vocab_limit=False, minloglevel=2,
                                   normalization_rule_name="identity", add_dummy_prefix=False,
                                   remove_extra_whitespaces=False, split_by_whitespace=False)
    for tok in (TextTokenizer(tiny_data / "tokenizer" / "sp.model"), TextTokenizer(tmp_path / "n.model")):
        for bos, eos in ((True, False), (True, True), (False, False)):
            ids, _ = encode_batch(tok, texts, EncodeOptions(add_bos=bos, add_eos=eos))
            packed, counts = tok.encode_packed(texts, bos, eos)
            assert counts == list(map(len, ids))
            assert packed == array(packed_code(tok.vocab_size), [i for x in ids for i in x]).tobytes()
            assert [json.loads(f"[{t}]") for t, _ in tok.encode_id_text(texts, bos, eos)] == ids
    assert TextTokenizer(tiny_data / "tokenizer" / "sp.model").word_cached
    assert not TextTokenizer(tmp_path / "n.model").word_cached
