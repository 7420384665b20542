"""Base models as users have them (a Hugging Face folder: weights, config, tokenizer files), built
and saved by the tests themselves: nothing comes from a hub."""
from __future__ import annotations

import shutil
from pathlib import Path


def book_texts() -> list[str]:
    """Python's own documentation topics (pydoc_data, on every machine with Python): plain English
    with code, about 700 KB."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def save_gpt2_base(folder: Path, vocab_size: int = 600, n_positions: int = 128, seed: int = 0,
                   texts=None, n_embd: int = 64, n_layer: int = 2, n_head: int = 2, bos: bool = True,
                   eos: bool = True) -> Path:
    """A GPT-2-style base: byte-level BPE trained on `texts` (default `book_texts()`) with one
    <|endoftext|> as bos, eos and unk (as GPT-2's; `bos=False`: as eos and pad only, no bos, as
    Qwen's tokenizers have it; `eos=False` too: no special token at all), and a GPT2LMHeadModel
    at random initialisation."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts if texts is not None else book_texts(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    eot = "<|endoftext|>"
    special = (dict(bos_token=eot, eos_token=eot, unk_token=eot) if bos else
               dict(eos_token=eot, pad_token=eot) if eos else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **special)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(folder)
    return folder


def save_llama_base(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A Llama-style base with a SentencePiece-style Hugging Face tokenizer: the tokenizer.json of
    `tokenizer_dir` (a tokenize.py tokenizer folder) without its sp.model, and a 2-layer
    LlamaForCausalLM at random initialisation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=128, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    model.save_pretrained(folder)
    return folder
