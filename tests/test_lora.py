"""LoRA fine-tuning of a model loaded offline from a local folder: checkpoints hold the adapters
and their optimizer state only (under FSDP2, the shards of every weight), resume bit for bit,
refuse another base model, and the final folder holds the merged model next to the adapter."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lib.records.checkpoint import complete_checkpoints, is_sharded, tensor_names
from conftest import BITWISE, run_script, train
from test_resume import DDP, FSDP, assert_same_run


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """A tiny pretrained model saved the way any local Hugging Face model is."""
    runs = tmp_path_factory.mktemp("base")
    train(tiny_data, runs, "base", *BITWISE, "--max_steps", "3", "--checkpoint_every", "0", "--eval_every", "0")
    return runs / "base" / "final"


def lora_args(base_dir, *extra):
    return (*BITWISE, "--log_every", "1", "--model.init_from", str(base_dir), "--lora.r", "4", "--lora.dropout", "0.1",
            *extra)


def test_checkpoints_hold_adapters_and_final_is_merged(tiny_data, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train(tiny_data, tmp_path, "ft", *lora_args(base, "--max_steps", "4", "--checkpoint_every", "2",
                                                 "--eval_every", "0"))
    run = tmp_path / "ft"
    checkpoint = complete_checkpoints(run)[-1]
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    # 7 linear layers in each of 2 decoder layers, an A and a B matrix each: nothing of the base
    assert len(keys) == 28 and all(".lora_A." in k or ".lora_B." in k for k in keys), keys
    assert (checkpoint / "model.safetensors").stat().st_size < (base / "model.safetensors").stat().st_size / 4
    optimizer_state = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert len(optimizer_state["state"]) == 28  # moments for the adapters alone

    merged = AutoModelForCausalLM.from_pretrained(run / "final")
    original = AutoModelForCausalLM.from_pretrained(base)
    m, o = merged.state_dict(), original.state_dict()
    assert m.keys() == o.keys()
    assert torch.equal(m["model.embed_tokens.weight"], o["model.embed_tokens.weight"])  # frozen
    assert torch.equal(m["model.norm.weight"], o["model.norm.weight"])
    assert not torch.equal(m["model.layers.0.self_attn.q_proj.weight"], o["model.layers.0.self_attn.q_proj.weight"])
    # the merged model computes what the base plus the saved adapter computes
    adapted = PeftModel.from_pretrained(original, run / "final_adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)

    # the run checked its merge the same way before writing final/, and recorded it
    from lib.errors import UserError
    from lib.model.export import MERGE_TOLERANCE, check_merge

    record = json.loads((run / "final" / "export.json").read_text())
    assert record["max_abs_logit_diff"] <= MERGE_TOLERANCE and record["perplexity_rel_diff"] < 1e-4, record
    assert record["probe_tokens"] > 0
    # a merged model whose weights were changed afterwards fails the same check
    tampered = tmp_path / "tampered"
    shutil.copytree(run / "final", tampered)
    weights = load_file(tampered / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"] += 0.05
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})
    assert check_merge(run / "final", base, run / "final_adapter", ids)["max_abs_logit_diff"] <= MERGE_TOLERANCE
    with pytest.raises(UserError, match="differ from base"):
        check_merge(tampered, base, run / "final_adapter", ids)
    # eval.py generate talks to the adapter folder (on the base it names) as to the merged model
    said = [run_script("scripts/eval.py", "generate", "--model", str(m), "--prompt", "def ", "--temperature", "0",
                       "--max_new_tokens", "12").stdout for m in (run / "final_adapter", run)]
    assert said[0] == said[1] and len(said[0]) > len("def \n")


def test_lora_resume_is_bitwise_and_refuses_another_base(tiny_data, base, tmp_path):
    common = lora_args(base, "--max_steps", "8", "--checkpoint_every", "0", "--eval_every", "4")
    train(tiny_data, tmp_path, "straight", *common)
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "3")

    other = tmp_path / "other_base"
    shutil.copytree(base, other)
    weights = load_file(other / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.001
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    wrong = train(tiny_data, tmp_path, "resumed", *lora_args(other, "--max_steps", "8", "--checkpoint_every", "0",
                                                             "--eval_every", "4"), "--resume", "auto", check=False)
    assert wrong.returncode != 0 and "own base" in wrong.stderr and "Traceback" not in wrong.stderr
    resized = train(tiny_data, tmp_path, "resumed", *common, "--lora.r", "8", "--resume", "auto", check=False)
    assert resized.returncode != 0 and "does not fit this model" in resized.stderr, resized.stderr[-2000:]

    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto")
    assert "resumed from" in proc.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_unknown_target_module_is_a_clear_error(tiny_data, base, tmp_path):
    proc = train(tiny_data, tmp_path, "bad", *lora_args(base, "--lora.target_modules", "qproj",
                                                        "--max_steps", "2"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--lora.target_modules 'qproj'" in proc.stderr and "q_proj" in proc.stderr


@pytest.mark.parametrize("launch", ["ddp", "fsdp2"])
def test_lora_data_parallel_saves_and_resumes_bitwise(tiny_data, base, tmp_path, launch):
    # DDP: Accelerate holds the bare model while training goes through the DDP wrapper, and the
    # adapter filter must find it either way. FSDP2: every weight is sharded, the checkpoint holds
    # the shards, and the final adapter and merged model come from the gathered weights
    launcher = DDP if launch == "ddp" else FSDP
    common = lora_args(base, "--max_steps", "4", "--checkpoint_every", "0", "--eval_every", "0")
    train(tiny_data, tmp_path, "straight", *common, launcher=launcher)
    train(tiny_data, tmp_path, "resumed", *common, "--stop_at_step", "2", launcher=launcher)
    checkpoint = complete_checkpoints(tmp_path / "resumed")[-1]
    if launch == "ddp":
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            assert len(list(f.keys())) == 28
    else:
        assert is_sharded(checkpoint) and len(tensor_names(checkpoint)) > 28  # the base's shards too
    proc = train(tiny_data, tmp_path, "resumed", *common, "--resume", "auto", launcher=launcher)
    assert "resumed from" in proc.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    # what was trained is what was saved: the merged model differs from the base, and equals the
    # base plus the saved adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").eval()
    original = AutoModelForCausalLM.from_pretrained(base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], original.state_dict()[q])
    adapted = PeftModel.from_pretrained(original, tmp_path / "straight" / "final_adapter").eval()
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)


def test_a_model_is_not_trained_on_data_of_another_tokenizer(tiny_data, micro_data, base, tmp_path):
    # micro_data has its own tokenizer (also 512 pieces, trained on other files): ids mean other text
    proc = train(micro_data, tmp_path, "other", "--model.init_from", str(base), "--max_steps", "2", check=False)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr and "tokenizer files" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "other").exists()
    # the base was built with 128 positions and trained on 64 tokens: its export says 64
    proc = train(tiny_data, tmp_path, "long", "--model.init_from", str(base), "--data.seq_len", "128",
                 "--max_steps", "2", check=False)
    assert proc.returncode == 2 and "longer than the 64 positions" in proc.stderr, proc.stderr


def test_full_fine_tuning_from_a_cached_model_name_lowers_the_loss(tiny_data, base, tmp_path):
    """A model given by name is found in the Hugging Face cache layout (here: the tiny base, saved
    there as 'org/tiny-base'), fully fine-tuned on data in its own tokens, and its loss falls."""
    import json

    repo_dir = tmp_path / "hf" / "hub" / "models--org--tiny-base"
    shutil.copytree(base, repo_dir / "snapshots" / "rev1")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("rev1")
    proc = train(tiny_data, tmp_path, "full", "--model.init_from", "org/tiny-base", "--max_steps", "30",
                 "--log_every", "5", "--eval_every", "0", "--eval_tokens", "2000", "--checkpoint_every", "0",
                 "--optim.lr", "3e-3", env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": ""})
    assert "Traceback" not in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["type"] == "train"]
    assert losses[-1] < losses[0] - 0.2, losses
    # config.yaml records the folder the name resolved to
    assert str(repo_dir / "snapshots" / "rev1") in (tmp_path / "full" / "config.yaml").read_text()


def test_qlora_trains_on_a_4bit_base_resumes_exactly_and_merges_into_the_full_base(tiny_data, base, tmp_path):
    """--lora.quantize 4bit: the frozen base held in NF4 (bitsandbytes, here on the CPU), adapters
    trained on it; a stop and resume gives the same adapters bit for bit; final/ is the full-
    precision base with the adapters merged in, checked against base + adapter."""
    from safetensors.torch import load_file

    args = lora_args(base, "--lora.quantize", "4bit", "--eval_every", "0", "--checkpoint_every", "3")
    straight = train(tiny_data, tmp_path, "q", *args, "--max_steps", "6")
    assert "base held in 4-bit NF4" in straight.stdout, straight.stdout
    train(tiny_data, tmp_path, "q2", *args, "--max_steps", "3")
    train(tiny_data, tmp_path, "q2", *args, "--max_steps", "6", "--resume", "auto")
    a = load_file(tmp_path / "q" / "final_adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "q2" / "final_adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 28 and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # B starts at zero: it trained
    final = tmp_path / "q" / "final"
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    record = json.loads((final / "export.json").read_text())
    assert record["max_abs_logit_diff"] <= record["tolerance"]
    merged, original = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    assert torch.equal(merged["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    # the merge went into the full-precision weights: they moved by the adapter's update only
    q = "model.layers.0.self_attn.q_proj.weight"
    assert 0 < (merged[q] - original[q]).abs().max() < 0.1


def test_qlora_without_bitsandbytes_says_how_to_get_it(monkeypatch):
    import importlib.util

    from lib.errors import UserError
    from lib.model.lora import LoraOptions, check_quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        check_quantize(LoraOptions(r=4, quantize="4bit"), "some/base")
    with pytest.raises(UserError, match="give --lora.r"):
        check_quantize(LoraOptions(r=0, quantize="4bit"), "some/base")
    with pytest.raises(UserError, match="give --model.init_from"):
        check_quantize(LoraOptions(r=4, quantize="4bit"), "")
