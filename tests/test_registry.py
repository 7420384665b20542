"""Models by name, offline: a cache laid out as the Hugging Face hub lays it out, filled with tiny
models the test builds and saves itself; a missing model names every place looked and the command
that fetches it."""
from __future__ import annotations

import pytest

from lib.errors import UserError
from lib.model.registry import MODELS, resolve


def cache_model(hub, repo: str, model, revision: str = "0123abc") -> None:
    """Save `model` where the hub's cache keeps `repo` at `revision`, with refs/main naming it."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    model.save_pretrained(repo_dir / "snapshots" / revision)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub = tmp_path / "hf" / "hub"
    cache_model(hub, MODELS["gpt2"], AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64)))
    cache_model(hub, MODELS["tinyllama"], AutoModelForCausalLM.from_config(
        LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                    vocab_size=100, max_position_embeddings=64)))
    return hub


def test_names_and_folders_load_offline(hub, tmp_path):
    from lib.model.build import load_pretrained

    gpt2 = resolve("gpt2")
    assert gpt2 == hub / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    assert type(load_pretrained(gpt2)).__name__ == "GPT2LMHeadModel"
    llama = resolve("tinyllama")
    assert resolve(MODELS["tinyllama"]) == llama  # the repository id works as well as the short name
    assert type(load_pretrained(llama)).__name__ == "LlamaForCausalLM"
    assert resolve(str(llama)) == llama  # and the folder itself


def test_a_missing_model_names_where_it_looked_and_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError) as err:
        resolve("gpt2")
    text = str(err.value)
    assert "gpt2" in text and str(tmp_path / "empty" / "hub" / "models--openai-community--gpt2") in text
    assert "hf download openai-community/gpt2" in text and "--model.allow_download" in text
    with pytest.raises(UserError, match="not a model name"):
        resolve("no-such-model")
