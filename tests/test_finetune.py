"""Fine-tuning a model a user has, offline, on their own text: the text encoded with the base
model's own tokenizer, the data checked against the model, the tokenizer shipped with the
result. The bases are tiny GPT-2 and Llama folders the tests build and save themselves."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import run_script, train
from helpers.base_models import book_texts, save_gpt2_base, save_llama_base
from lib.data.corpus import iter_records, read_manifest
from lib.errors import UserError
from lib.data.tokenizer import tokenizer_fingerprint


@pytest.fixture(scope="module")
def gpt2_book(tmp_path_factory):
    """(folder, GPT-2 base, its Hugging Face cache as HF_HOME, the book tokenized with its tokenizer)."""
    root = tmp_path_factory.mktemp("finetune")
    base = save_gpt2_base(root / "gpt2-base")
    hub = root / "hf" / "hub" / "models--openai-community--gpt2"  # the same base, as `gpt2` in a hub cache
    shutil.copytree(base, hub / "snapshots" / "abc123")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123")
    book = root / "book.txt"
    book.write_text("\n\n".join(book_texts())[:300_000], encoding="utf-8")
    data = root / "data"
    run_script("scripts/tokenize.py", "--corpus.source", str(book), "--tokenizer", "gpt2", "--out_dir", str(data),
               env={"HF_HOME": str(root / "hf")})
    return root, base, root / "hf", data


def test_text_is_encoded_with_the_base_models_own_tokenizer(gpt2_book):
    from transformers import AutoTokenizer

    from lib.model.evaluate import token_byte_lengths

    root, base, hf, data = gpt2_book
    tok = AutoTokenizer.from_pretrained(str(base))
    manifest = read_manifest(data / "tokens", "tokens")
    assert manifest["vocab_size"] == len(tok) and manifest["tokenizer_sha256"] == tokenizer_fingerprint(base)
    eot = tok.eos_token_id
    assert manifest["special_ids"]["bos"] == manifest["special_ids"]["eos"] == eot
    assert manifest["doc_format"] == "bos ids"  # GPT-2's one <|endoftext|> between documents, never two
    ids = np.load(data / "tokens" / manifest["splits"]["train"]["shards"][0]["file"])
    lengths = np.load(data / "tokens" / manifest["splits"]["train"]["shards"][0]["docs_file"])[:, 0]
    texts = [r["text"] for r in iter_records(data / "corpus", "train")]
    pos = 0
    for text, n in list(zip(texts, lengths))[:3]:
        assert ids[pos : pos + n].tolist() == [eot] + tok(text, add_special_tokens=False).input_ids
        pos += n
    assert (np.diff(np.flatnonzero(ids == eot)) > 1).all()
    # byte-level BPE: each token's bytes are known exactly, so a held-out sample's bits per byte is exact
    val = np.load(data / "tokens" / manifest["splits"]["val"]["shards"][0]["file"])
    assert int(token_byte_lengths(data / "tokenizer")[val].sum()) == manifest["splits"]["val"]["text_bytes"]
    again = run_script("scripts/tokenize.py", "--corpus.source", str(root / "book.txt"), "--tokenizer", str(base),
                       "--out_dir", str(data))  # the same files by path: nothing to redo
    assert "tokenizer: unchanged" in again.stdout and "tokens: unchanged" in again.stdout
    shown = run_script("scripts/tokenize.py", "inspect", "--tokenizer", "gpt2", env={"HF_HOME": str(hf)})
    assert f"vocab size  {len(tok)}" in shown.stdout and "round trip exact: True" in shown.stdout


def test_full_fine_tune_of_a_base_by_name_beats_the_base_and_ships_its_tokenizer(gpt2_book, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, base, hf, data = gpt2_book
    env = {"HF_HOME": str(hf)}
    train(data, tmp_path, "ft", "--model.init_from", "gpt2", "--max_steps", "60", "--eval_every", "0",
          "--checkpoint_every", "0", "--log_every", "1", env=env)
    run = tmp_path / "ft"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert losses[-1] < losses[0] - 0.5, losses
    final = run / "final"
    assert tokenizer_fingerprint(final) == tokenizer_fingerprint(base)  # the base's tokenizer, byte for byte
    assert not (final / "sp.model").exists()
    tok = AutoTokenizer.from_pretrained(str(final))
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.vocab_size == len(tok)
    with torch.no_grad():
        assert model(torch.tensor([[tok.bos_token_id] + tok("x = 1").input_ids])).logits.isfinite().all()
    before = run_script("scripts/eval.py", "--model", "gpt2", "--data", str(data), "--seq_len", "64",
                        "--samples", "0", "--out_dir", str(tmp_path / "before"), env=env)
    after = run_script("scripts/eval.py", "--model", str(run), "--seq_len", "64", "--samples", "1")
    bpb = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["bits_per_byte"]
           for d in (tmp_path / "before", run / "eval")]
    assert bpb[1] < bpb[0] - 0.5, (bpb, before.stdout, after.stdout)
    assert bpb[0] > 0.9 * math.log2(len(tok)) / 2.5  # an untrained base: near uniform over its vocabulary


def test_data_in_another_tokenizer_is_refused_with_the_command_that_fixes_it(gpt2_book, tiny_data, tmp_path):
    root, base, hf, data = gpt2_book
    proc = train(tiny_data, tmp_path, "mismatch", "--model.init_from", str(base), "--max_steps", "2", check=False)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr, proc.stderr
    assert f"tokenize.py --tokenizer {base}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mismatch").exists()
    proc = run_script("scripts/eval.py", "--model", str(base), "--data", str(tiny_data), "--samples", "0", check=False)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr, proc.stderr


def test_a_llama_base_with_a_hugging_face_tokenizer(tiny_data, tmp_path):
    """A Llama folder whose tokenizer is tokenizer.json only (no sp.model): the same stdlib files
    encoded with it give exactly the token shards of tiny_data, whose SentencePiece model it mirrors."""
    from lib.model.build import check_data_fits

    base = save_llama_base(tmp_path / "llama-base", tiny_data / "tokenizer")
    data = tmp_path / "data"
    run_script("scripts/tokenize.py", "--config", "configs/tokenize/smoke.yaml", "--corpus.max_files", "80",
               "--tokenizer", str(base), "--out_dir", str(data))
    ours, theirs = read_manifest(data / "tokens", "tokens"), read_manifest(tiny_data / "tokens", "tokens")
    assert ours["doc_format"] == "bos ids eos" and ours["special_ids"] == theirs["special_ids"]
    assert ours["tokenizer_sha256"] == tokenizer_fingerprint(base) != theirs["tokenizer_sha256"]
    for split in ("train", "val"):
        for a, b in zip(ours["splits"][split]["shards"], theirs["splits"][split]["shards"]):
            assert np.array_equal(np.load(data / "tokens" / a["file"]), np.load(tiny_data / "tokens" / b["file"]))
    check_data_fits(base, ours, 128)
    with pytest.raises(UserError, match="another tokenizer"):
        check_data_fits(base, theirs, 64)  # the same ids, but another tokenizer's files: not provable
    with pytest.raises(UserError, match="--data.seq_len 256 is longer than the 128 positions"):
        check_data_fits(base, ours, 256)
    proc = train(data, tmp_path, "llama", "--model.init_from", str(base), "--max_steps", "4", "--eval_every", "0",
                 "--checkpoint_every", "0")
    assert "llama-base (from it)" in proc.stdout
    assert tokenizer_fingerprint(tmp_path / "llama" / "final") == tokenizer_fingerprint(base)


def test_a_base_without_bos_keeps_documents_apart_after_each_eos(tmp_path):
    """A tokenizer with eos but no bos (Qwen's kind): documents are stored `ids eos`, and packed
    training restarts positions after each eos, so attention still stays within a document."""
    base = save_gpt2_base(tmp_path / "no-bos-base", bos=False)
    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(book_texts())[:60_000], encoding="utf-8")
    data = tmp_path / "data"
    run_script("scripts/tokenize.py", "--corpus.source", str(book), "--tokenizer", str(base), "--out_dir", str(data))
    manifest = read_manifest(data / "tokens", "tokens")
    eos = manifest["special_ids"]["eos"]
    assert manifest["doc_format"] == "ids eos" and manifest["special_ids"]["bos"] is None and eos is not None
    proc = train(data, tmp_path, "ft", "--model.init_from", str(base), "--max_steps", "2", "--eval_every", "0",
                 "--checkpoint_every", "0")
    assert "attention within documents (restarting after each eos)" in proc.stdout
    assert "nothing marks where documents meet" not in proc.stdout
    # eval.py scores the run's data the way it was trained: the same restarts
    proc = run_script("scripts/eval.py", "--model", str(tmp_path / "ft"), "--samples", "0")
    assert "doc_mask True" in proc.stdout
    # a tokenizer with neither: nothing can separate the documents, and tokenize.py says so
    bare = save_gpt2_base(tmp_path / "bare-base", bos=False, eos=False)
    proc = run_script("scripts/tokenize.py", "--corpus.source", str(book), "--tokenizer", str(bare), "--out_dir",
                      str(tmp_path / "bare"))
    assert "neither a bos nor an eos token" in proc.stdout + proc.stderr
    assert read_manifest(tmp_path / "bare" / "tokens", "tokens")["doc_format"] == "ids"


def test_a_masked_lm_is_refused_not_scored_as_causal(tiny_data, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    for proc in (run_script("scripts/eval.py", "--model", str(bert), "--data", str(tiny_data), check=False),
                 train(tiny_data, tmp_path, "ft", "--model.init_from", str(bert), "--max_steps", "2", check=False)):
        assert proc.returncode == 2 and "masked language model (BertForMaskedLM)" in proc.stderr, proc.stderr
        assert "DEFERRED.md" in proc.stderr and "Traceback" not in proc.stderr


def test_an_export_records_the_length_it_was_trained_on(tmp_path):
    """Clients (transformers, lm-evaluation-harness) take the length from config.json: a model from
    scratch says the seq_len it trained on, and a GPT-2's untrained position rows are cut."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from lib.model.export import record_trained_length

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, cfg in (("gpt2", GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=1, n_head=2)),
                      ("llama", LlamaConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        model.save_pretrained(tmp_path / name)
        (tmp_path / name / "tokenizer_config.json").write_text('{"model_max_length": 1e30}')
        record_trained_length(tmp_path / name, 16)
        again = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert again.config.max_position_embeddings == 16  # GPT-2 maps it to n_positions
        assert json.loads((tmp_path / name / "tokenizer_config.json").read_text())["model_max_length"] == 16
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, model(ids).logits)
        if name == "gpt2":
            assert again.transformer.wpe.weight.shape[0] == 16


def test_lora_on_a_gpt2_adapts_its_conv1d_layers_and_the_merge_is_checked(gpt2_book, tmp_path):
    from safetensors.torch import load_file

    root, base, hf, data = gpt2_book
    proc = train(data, tmp_path, "lora", "--model.init_from", str(base), "--lora.r", "4", "--max_steps", "8",
                 "--eval_every", "0", "--checkpoint_every", "0", "--optim.lr", "1e-2")
    assert "LoRA r=4 alpha=16 on c_attn, c_fc, c_proj: " in proc.stdout and " trainable of " in proc.stdout
    adapter = load_file(tmp_path / "lora" / "final_adapter" / "adapter_model.safetensors")
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == {"c_attn", "c_proj", "c_fc"}
    record = json.loads((tmp_path / "lora" / "final" / "export.json").read_text())
    assert record["max_abs_logit_diff"] <= record["tolerance"]
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "lora" / "final" / "model.safetensors")
    changed = {k for k in before if not np.array_equal(before[k].numpy(), after[k].numpy())}
    assert changed and all(k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for k in changed), changed
