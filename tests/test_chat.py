"""Conversation records: parsed with their file and line named on a fault, rendered through a chat
template with the assistant's spans located by the template itself, and those spans mapped onto
the tokens of a Llama-style (SentencePiece) and a GPT-2-style (byte-level BPE) tokenizer."""
from __future__ import annotations

import pytest

from lib.data.chat import DEFAULT_TEMPLATE, is_chat_record, parse_record, render, render_text, token_mask
from lib.errors import UserError

TALK = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "6, as 3 doubled."}]}


def test_records_are_recognised_and_faults_named():
    assert is_chat_record(TALK) and is_chat_record({"prompt": "a", "completion": "b"})
    assert not is_chat_record({"text": "plain"}) and not is_chat_record({"prompt": "only"})
    conv = parse_record({"prompt": "Name a prime.", "completion": "7", "system": "Be brief."}, "p.jsonl:1")
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    for obj, what in (({"messages": [{"role": "user", "content": "hi"}]}, "p.jsonl:4: no assistant turn"),
                      ({"messages": [{"role": "bot", "content": "hi"}]}, "p.jsonl:4: message 1 has role 'bot'"),
                      ({"messages": [{"role": "user", "content": 3}]}, "message 1 (user) has a int content"),
                      ({"messages": []}, "non-empty list"), ({"messages": ["hi"]}, "message 1 is not a")):
        with pytest.raises(UserError, match=what.replace("(", r"\(").replace(")", r"\)")):
            parse_record(obj, "p.jsonl:4")


def test_assistant_spans_are_what_each_turn_adds():
    doc = render(parse_record(TALK, "t:1"), eos_token="</s>")
    assert [doc.text[a:b] for a, b in doc.trained] == ["4</s>", "6, as 3 doubled.</s>"]
    prompt = render_text(DEFAULT_TEMPLATE, TALK["messages"][:2], add_generation_prompt=True)
    assert doc.text.startswith(prompt) and doc.trained[0][0] == len(prompt)
    assert doc.text == ("<|system|>\nBe brief.\n<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s><|user|>\nAnd 3+3?\n"
                        "<|assistant|>\n6, as 3 doubled.</s>")
    # a template that rewrites earlier turns cannot have its spans located
    odd = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(UserError, match="t:1: the chat template's rendering"):
        render(parse_record(TALK, "t:1"), template=odd)


def test_token_mask_marks_tokens_starting_in_a_span():
    assert token_mask([(0, 2), (2, 4), (4, 6), (6, 6), (6, 9)], [(2, 6)]) == [0, 1, 1, 0, 0]
    assert token_mask([(0, 3), (3, 5)], [(1, 4)]) == [0, 1]  # a token straddling the start is prompt


def gpt2_style(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([render(parse_record(TALK, "t")).text * 20, "the quick brown fox " * 50],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def llama_style(tmp_path):
    from lib.data.corpus import CorpusConfig, build_corpus, iter_records
    from lib.data.tokenizer import TokenizerConfig, build_hf_tokenizer, train_sentencepiece

    build_corpus(CorpusConfig(max_files=20, val_min_bytes=0, val_min_docs=0), tmp_path / "corpus")
    texts = [r["text"] for r in iter_records(tmp_path / "corpus", "train")]
    return build_hf_tokenizer(train_sentencepiece(texts, tmp_path / "sp", TokenizerConfig(vocab_size=400)))


@pytest.mark.parametrize("make", [gpt2_style, llama_style])
def test_template_round_trip_through_the_tokens(make, tmp_path):
    tok = make(tmp_path)
    doc = render(parse_record(TALK, "t:1"), eos_token=tok.eos_token)
    enc = tok(doc.text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=False)
    mask = token_mask(enc.offset_mapping, doc.trained)
    ids = enc.input_ids
    assert tok.decode(ids) == doc.text  # the rendered text round trips
    assert ids.count(tok.eos_token_id) == 2  # each assistant turn ends with eos, one token
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "4" + tok.eos_token + "6, as 3 doubled." + tok.eos_token
    # every token is wholly prompt or wholly answer: the trained tokens are exactly the spans' text
    assert sum(mask) < len(ids) and trained[-1] == tok.eos_token_id
