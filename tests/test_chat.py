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
                      ({"messages": []}, "non-empty list"), ({"messages": ["hi"]}, "message 1 is neither a")):
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


def chat_jsonl(path, n=120):
    import json

    rows = [{"messages": [{"role": "system", "content": "Answer with the number."},
                          {"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{2 * i}."}]} if i % 2 else
            {"prompt": f"Spell {i} backwards.", "completion": str(i)[::-1]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    from conftest import run_script

    tmp = tmp_path_factory.mktemp("chat")
    run_script("scripts/tokenize.py", "--corpus.source", str(chat_jsonl(tmp / "talk.jsonl")), "--out_dir",
               str(tmp / "data"), "--tokenizer.vocab_size", "300")
    return tmp / "data"


def test_tokenized_conversations_carry_a_mask_of_the_answers(chat_data):
    import json

    import numpy as np
    from transformers import AutoTokenizer

    from lib.data.batches import load_masks, load_split

    manifest = json.loads((chat_data / "tokens" / "manifest.json").read_text())
    assert manifest["loss_mask"] and "<|assistant|>" in manifest["chat_template"]
    tok = AutoTokenizer.from_pretrained(chat_data / "tokenizer")
    tokens, docs = load_split(chat_data / "tokens", "train")
    mask = np.concatenate(load_masks(chat_data / "tokens", "train"))
    ends = np.cumsum(docs[:, 0])
    answers = [tok.decode(tokens[e - n:e][mask[e - n:e] == 1]) for e, n in zip(ends, docs[:, 0])]
    corpus = [json.loads(x) for x in (chat_data / "corpus" / "train-00000.jsonl").read_text().splitlines()]
    assert answers == [r["messages"][-1]["content"] + "</s>" for r in corpus]
    # a document's recorded bytes are its answer's
    assert list(docs[:, 1]) == [len(r["messages"][-1]["content"].encode()) for r in corpus]


@pytest.mark.parametrize("packing", ["pack", "pad_longest"])
def test_the_loss_counts_the_answers_alone(chat_data, packing):
    """The loss equals cross-entropy over the answer tokens; the prompt's positions get no gradient."""
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from lib.data.batches import DataConfig, build_train_data
    from lib.model.loss import IGNORE_INDEX, TokenLoss

    data = build_train_data(chat_data / "tokens", DataConfig(seq_len=48, packing=packing), {"pad": 3})
    batch = data.make_batch([0, 1, 2, 3])
    labels = torch.from_numpy(batch.labels)
    keep = labels != IGNORE_INDEX
    assert 0 < keep.sum() < (torch.from_numpy(batch.input_ids) != 3).sum() // 2  # answers are the short part
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=64))
    logits = model(**batch.model_inputs("cpu")).logits
    logits.retain_grad()
    loss_sum, n = TokenLoss().loss_sum(logits, labels)
    assert int(n) == int(keep.sum())
    torch.testing.assert_close(loss_sum / n, F.cross_entropy(logits[keep].float(), labels[keep]))
    (loss_sum / n).backward()
    assert torch.all(logits.grad[~keep] == 0) and torch.all(logits.grad[keep].abs().sum(-1) > 0)


def test_bad_conversations_are_named_or_skipped_and_counted(tmp_path):
    import json

    from conftest import run_script

    src = chat_jsonl(tmp_path / "talk.jsonl", 40)
    with open(src, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "anyone?"}]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}) + "\n")
    args = ("scripts/tokenize.py", "--corpus.source", str(src), "--tokenizer.vocab_size", "300")
    proc = run_script(*args, "--out_dir", str(tmp_path / "a"), check=False)
    assert proc.returncode != 0 and "talk.jsonl:41: no assistant turn" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a").exists()
    proc = run_script(*args, "--out_dir", str(tmp_path / "b"), "--corpus.on_bad_record", "skip")
    manifest = json.loads((tmp_path / "b" / "corpus" / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_conversation": 2} and manifest["conversations"] == 40


def test_pairs_from_source_and_whole_files_held_out(tmp_path):
    import json

    from lib.data.corpus import CorpusConfig, build_corpus, iter_records
    from lib.data.stdlib_pairs import module_pairs

    mod = tmp_path / "m.py"
    mod.write_text('def area(w, h=1):\n    """Return the area of a rectangle of width w and height h.\n\n    More."""\n'
                   'def _hidden():\n    """Private helpers are left out of the pairs."""\n'
                   'class Box:\n    def open(self, *, force=False):\n        """Open the box, even when stuck."""\n'
                   'def short():\n    """Too short."""\n')
    assert module_pairs(mod, "pkg.m") == [
        {"prompt": "What does pkg.m.area(w, h=1) do?", "completion": "Return the area of a rectangle of width w and height h."},
        {"prompt": "What does pkg.m.Box.open(self, *, force=False) do?", "completion": "Open the box, even when stuck."}]
    src = tmp_path / "src"
    src.mkdir()
    for k in range(30):
        (src / f"mod{k}.jsonl").write_text("".join(json.dumps({"prompt": f"q{k} {i}", "completion": f"a{k} {i}"}) + "\n"
                                                   for i in range(5)))
    build_corpus(CorpusConfig(source=str(src), split_by="file", val_per_mille=100, val_min_bytes=0, val_min_docs=0),
                 tmp_path / "c")
    sides = {s: {r["source"] for r in iter_records(tmp_path / "c", s)} for s in ("train", "val")}
    assert sides["val"] and sides["train"] and not sides["val"] & sides["train"]
    assert sum(1 for _ in iter_records(tmp_path / "c", "val")) == 5 * len(sides["val"])  # whole files


def test_a_tuned_model_chats_through_the_template_it_was_trained_with(chat_data, tmp_path):
    import json

    import numpy as np
    from transformers import AutoTokenizer

    from conftest import BITWISE, run_script, train
    from lib.data.batches import load_split

    train(chat_data, tmp_path, "sft", *BITWISE, "--max_steps", "20", "--checkpoint_every", "0", "--eval_every", "0",
          "--data.seq_len", "48")
    final = tmp_path / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(final, local_files_only=True)
    assert tok.chat_template and tok.chat_template.startswith("{{ bos_token }}")
    # the client's ids for a held-out conversation's prompt are those training saw before the answer
    record = json.loads((chat_data / "corpus" / "val-00000.jsonl").read_text().splitlines()[0])
    tokens, docs = load_split(chat_data / "tokens", "val")
    doc = tokens[: docs[0, 0]].tolist()
    prompt = tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    answer = tok(record["messages"][-1]["content"], add_special_tokens=False).input_ids
    assert doc == prompt + answer + [tok.eos_token_id]
    proc = run_script("scripts/eval.py", "generate", "--model", str(tmp_path / "sft"), "--chat", "--prompt",
                      record["messages"][-2]["content"], "--temperature", "0", "--max_new_tokens", "8")
    assert proc.returncode == 0 and proc.stdout.strip()
    rec = json.loads(run_script("scripts/eval.py", "--model", str(tmp_path / "sft"), "--samples", "0").stdout and
                     (tmp_path / "sft" / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["tokens"] == int(np.concatenate([np.load(chat_data / "tokens" / "val-00000.mask.npy")]).sum())
    # conversations longer than the sequence are cut, and the run names the first and the length to use
    proc = train(chat_data, tmp_path, "short", *BITWISE, "--max_steps", "2", "--checkpoint_every", "0",
                 "--eval_every", "0", "--data.seq_len", "16")
    line = next(x for x in proc.stdout.splitlines() if "longer than --data.seq_len 16 + 1" in x)
    longest = int(np.concatenate([np.load(chat_data / "tokens" / "train-00000.docs.npy")])[:, 0].max())
    assert "(the first: talk.jsonl:" in line and f"--data.seq_len {longest - 1} keeps every one whole" in line


def test_instruction_records_through_a_template_and_a_completion_field(tmp_path):
    import json

    from lib.data.corpus import CorpusConfig, build_corpus, iter_records

    src = tmp_path / "alpaca.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Add {i} and 2.", "input": f"x = {i}", "output": f"{i + 2}"})
                           + "\n" for i in range(30)) + json.dumps({"instruction": "No answer.", "input": ""}) + "\n")
    cfg = dict(source=str(src), template="{instruction}\n\n{input}", val_min_bytes=0, val_min_docs=0)
    with pytest.raises(UserError, match=r"alpaca.jsonl:31: no string field 'output' \(--corpus.completion_field\)"):
        build_corpus(CorpusConfig(**cfg, completion_field="output"), tmp_path / "a")
    m = build_corpus(CorpusConfig(**cfg, completion_field="output", on_bad_record="skip"), tmp_path / "b")
    assert m["conversations"] == 30 and m["skipped"] == {"missing_field": 1}
    first = next(r for s in ("train", "val") for r in iter_records(tmp_path / "b", s) if r["id"].endswith(":1"))
    assert first["messages"] == [{"role": "user", "content": "Add 0 and 2.\n\nx = 0"},
                                 {"role": "assistant", "content": "2"}]
