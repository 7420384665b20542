"""Pretrained models by name, found on disk: offline unless the user opts in to a download.

    resolve("gpt2")              -> ~/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/<rev>
    resolve("runs/base/final")   -> that folder
    resolve("Org/any-model")     -> its snapshot in the Hugging Face cache

A name is a short name below, or any `org/name` repository id; it is looked up in the Hugging Face
cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`), at the revision its
`refs/main` names (else the newest snapshot holding a config.json). Nothing is downloaded unless
`download=True` (train.py --model.allow_download); a missing model is an error naming it, every
place looked at, and the command that fetches it on a connected machine.
"""
from __future__ import annotations

import os
from pathlib import Path

from lib.errors import UserError

MODELS = {  # short name -> Hugging Face repository
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "distilgpt2": "distilbert/distilgpt2",
    "tinyllama": "TinyLlama/TinyLlama_v1.1",
    "tinyllama-chat": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "smollm-135m": "HuggingFaceTB/SmolLM2-135M",
    "smollm-360m": "HuggingFaceTB/SmolLM2-360M",
}


# Shapes built from config (random initialisation, this project's tokenizer or any other):
# `train.py --model.size NAME`. Named after the model whose shape they copy, or their size with a
# 32k vocabulary; the vocabulary itself always comes from the data.
SIZES = {
    "llama-20m": dict(arch="llama", d_model=384, n_layers=6, n_heads=6),
    "llama-135m": dict(arch="llama", d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, d_ff=1536,
                       max_seq_len=2048),  # SmolLM2-135M's shape
    "llama-1b": dict(arch="llama", d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                     max_seq_len=2048, tie_embeddings=False),  # TinyLlama-1.1B's shape
    "gpt2-124m": dict(arch="gpt2", d_model=768, n_layers=12, n_heads=12, max_seq_len=1024),  # GPT-2 small
    "gpt2-355m": dict(arch="gpt2", d_model=1024, n_layers=24, n_heads=16, max_seq_len=1024),  # GPT-2 medium
}


def size(name: str) -> dict:
    """The ModelConfig settings of a shape in SIZES, as a nested dict for lib.config.parse."""
    if name not in SIZES:
        raise UserError(f"--model.size {name}: no such size; sizes: {', '.join(SIZES)} (a trained model is "
                        "--model.init_from NAME instead)")
    return {"d_ff": None, "n_kv_heads": None, "tie_embeddings": True, **SIZES[name]}


def hub_cache() -> Path:
    """The Hugging Face hub cache folder this process would use."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot of a cached repository that refs/main names, else its newest with a config.json."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if (p / "config.json").is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve(spec: str | Path, download: bool = False, option: str = "--model.init_from") -> Path:
    """The local folder of a model given as a folder, a short name (MODELS) or a repository id;
    errors name `option`, the flag the user gave it with."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{option} {path} is not a model folder (no config.json); give a run's final/ folder, a "
                            f"Hugging Face model folder, or a name ({', '.join(sorted(MODELS))})")
        return path
    name = str(spec)
    repo = MODELS.get(name, name if name.count("/") == 1 and not name.startswith((".", "/")) else None)
    if repo is None:
        raise UserError(f"{option} {name}: no such folder, and not a model name "
                        f"({', '.join(sorted(MODELS))}) or an org/name repository id")
    cache = hub_cache()
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    found = _snapshot(repo_dir) if repo_dir.is_dir() else None
    if found is not None:
        return found
    if download:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, cache_dir=str(cache)))
    raise UserError(f"{option}: model {name} ({repo}) is not on this machine: looked for a folder {path.resolve()} and for "
                    f"{repo_dir}/snapshots/* (the Hugging Face cache: HF_HUB_CACHE, HF_HOME/hub or "
                    f"~/.cache/huggingface/hub). On a machine with internet run `hf download {repo}` (it fills "
                    f"that cache; copy {repo_dir.name}/ into this machine's cache), or pass --model.allow_download "
                    "to fetch it from here")


def resolve_tokenizer(spec: str | Path, download: bool = False, option: str = "--tokenizer") -> Path:
    """The local folder of a tokenizer given as a folder of tokenizer files, a model folder, a
    short name or a repository id (looked up as `resolve` does)."""
    from lib.data.tokenizer import has_tokenizer

    path = Path(spec).expanduser()
    folder = path if path.is_dir() else resolve(spec, download, option)
    if not has_tokenizer(folder):
        raise UserError(f"{option} {spec}: {folder} holds no tokenizer (tokenizer.json, vocab.json + merges.txt, "
                        "tokenizer.model or sp.model); give the folder the model's tokenizer was saved to")
    return folder
