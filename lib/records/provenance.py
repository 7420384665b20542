"""What produced a run: code version, packages, data identity, hardware."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "transformers", "accelerate", "peft", "sentencepiece", "tokenizers", "numpy",
            "tyro", "datasets", "mlflow")


def git_state(repo: str | Path | None = None) -> dict:
    """{'commit', 'dirty'} of the repository holding this code (None values outside git)."""
    repo = Path(repo or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions(names=PACKAGES) -> dict:
    """Installed versions of the packages that shape results (None when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(cfg, data_manifest: dict, accelerator, n_params: int, resumed_from=None,
               tracking_uri: str | None = None) -> dict:
    """Everything needed to say what a run was, as JSON-ready data (`tracking_uri`: where it is
    tracked, lib.records.tracking.effective_uri)."""
    import torch

    from lib.config import to_dict

    return {
        "argv": sys.argv,
        "git": git_state(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": str(accelerator.device),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "torch_threads": torch.get_num_threads(),
        "n_params": n_params,
        "data": {"dir": str(Path(cfg.data.dir).resolve()),  # where it was, whatever the working directory
                 "tokens_content_hash": data_manifest["content_hash"],
                 "corpus_content_hash": data_manifest["corpus_content_hash"],
                 "tokenizer_sha256": data_manifest["tokenizer_sha256"]},
        "resumed_from": str(resumed_from) if resumed_from else None,
        "tracking_uri": tracking_uri,
        "config": to_dict(cfg),
    }
