"""LoRA fine-tuning through peft: wrap a model, checkpoint only what trains, tie a run to its base."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lib.errors import UserError


@dataclass
class LoraOptions:
    """Low-rank adapters on a frozen base (peft). Off while r is 0."""

    r: int = 0
    """Adapter rank; 0 trains every weight of the model instead."""
    alpha: float = 16.0
    """Scale of the adapter's update is alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: str = "all-linear"
    """Comma-separated module names to adapt (q_proj,v_proj), or all-linear (every linear layer
    but the output head: GPT-2's c_attn, c_proj, c_fc; a Llama's q/k/v/o and gate/up/down_proj)."""
    quantize: Literal["none", "4bit"] = "none"
    """4bit: QLoRA, the frozen base held in 4-bit NF4 (needs a CUDA GPU and bitsandbytes)."""


def enabled(opts: LoraOptions) -> bool:
    if opts.r < 0:
        raise UserError(f"--lora.r must be 0 (off) or a positive rank, got {opts.r}")
    if opts.quantize != "none":
        check_quantize(opts)
    return opts.r > 0


def check_quantize(opts: LoraOptions) -> None:
    """A UserError saying what is missing for QLoRA here: adapters, a CUDA GPU, bitsandbytes; and,
    where all are present, that this version does not load 4-bit bases yet (DEFERRED.md)."""
    import importlib.util

    import torch

    if opts.r <= 0:
        raise UserError("--lora.quantize 4bit quantizes the frozen base under LoRA adapters: give --lora.r too")
    if not torch.cuda.is_available():
        raise UserError("--lora.quantize 4bit (QLoRA) needs a CUDA GPU, and this machine has none: drop it to train "
                        "plain LoRA, whose frozen base stays in the run's precision (bf16 halves its memory)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--lora.quantize 4bit (QLoRA) needs bitsandbytes: pip install bitsandbytes, or drop the flag")
    raise UserError("--lora.quantize 4bit: loading a 4-bit base is not in this version yet (see DEFERRED.md); "
                    "drop the flag to train plain LoRA with a bf16 base")


def apply(model, opts: LoraOptions):
    """Freeze `model` and wrap it with fresh adapters (initialised from torch's RNG)."""
    from peft import LoraConfig, get_peft_model

    targets = opts.target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise UserError("--lora.target_modules is empty; name modules (q_proj,v_proj) or pass all-linear")
    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model..."
        linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                         if type(mod).__name__ in ("Linear", "Conv1D")})
        raise UserError(f"--lora.target_modules {opts.target_modules!r}: {str(exc).splitlines()[0]} "
                        f"This model's linear layers: {', '.join(linear)}") from None


def trainable_names(model) -> list[str]:
    """Names, as in `model.state_dict()`, of the parameters that train."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def save_trainable_only(accelerator, model) -> None:
    """Make `accelerator.save_state` write only `model`'s trainable tensors (the adapters), not a
    second copy of the frozen base."""
    target = accelerator.unwrap_model(model)  # Accelerate may hold the DDP wrapper or the model itself
    keep = set(trainable_names(target))  # saved names carry no DDP "module."

    def hook(models, weights, output_dir):
        # under FSDP Accelerate writes each model's shards itself (`weights` is empty): those
        # checkpoints hold every weight, sharded
        for i, m in enumerate(models[:len(weights)]):
            if accelerator.unwrap_model(m) is target:
                weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(hook)


def check_checkpoint(checkpoint: Path, state: dict, model, base_sha: Optional[str], init_from: Optional[str]) -> None:
    """Refuse to resume adapters on another base, or adapters other than this run's: the
    checkpoint's tensors must be exactly `model`'s trainable ones (`model` unwrapped: no DDP or
    compile wrapper; an FSDP checkpoint holds the frozen base too). `state` is the checkpoint's
    verified record."""
    if state.get("lora_base_sha256") != base_sha:
        raise UserError(f"{checkpoint} holds LoRA adapters trained on a base model whose weights hash to "
                        f"{str(state.get('lora_base_sha256'))[:12]}, but --model.init_from {init_from} hashes "
                        f"to {str(base_sha)[:12]}: adapters only make sense on their own base; point "
                        "--model.init_from at it")
    from lib.checkpoint import is_sharded, tensor_names

    saved, want = tensor_names(Path(checkpoint)), set(trainable_names(model))
    missing = sorted(want - saved)
    # an FSDP job's shards hold the frozen base as well; a plain checkpoint holds the adapters only
    extra = [] if is_sharded(Path(checkpoint)) else sorted(saved - want)
    if missing or extra:
        raise UserError(f"{checkpoint} does not hold this run's adapters: {len(missing)} missing "
                        f"({', '.join(missing[:3])}), {len(extra)} unexpected ({', '.join(extra[:3])}); "
                        "resume with the --lora options the run started with")


def base_fingerprint(init_from: Optional[str]) -> Optional[str]:
    """sha256 over the weight files of a local base model (None for a base built from config,
    which the seed determines)."""
    if not init_from:
        return None
    from lib.files import sha256_file

    files = sorted(p for p in Path(init_from).iterdir() if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()

