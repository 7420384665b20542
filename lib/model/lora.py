"""LoRA fine-tuning through peft: wrap a model, checkpoint only what trains, tie a run to its base."""
from __future__ import annotations

import dataclasses
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
    """4bit: QLoRA, the frozen base held in 4-bit NF4 through bitsandbytes (CUDA GPUs; CPUs too,
    slowly); final/ merges the adapters into the full-precision base."""


def enabled(opts: LoraOptions) -> bool:
    if opts.r < 0:
        raise UserError(f"--lora.r must be 0 (off) or a positive rank, got {opts.r}")
    if opts.quantize != "none":
        check_quantize(opts)
    return opts.r > 0


def check_quantize(opts: LoraOptions, init_from: Optional[str] = None) -> None:
    """A UserError saying what QLoRA lacks here: adapters, a base model to quantize, bitsandbytes."""
    import importlib.util

    if opts.r <= 0:
        raise UserError("--lora.quantize 4bit quantizes the frozen base under LoRA adapters: give --lora.r too")
    if init_from is not None and not init_from:
        raise UserError("--lora.quantize 4bit quantizes a trained base: give --model.init_from (a folder or a name)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("--lora.quantize 4bit (QLoRA) needs bitsandbytes, which is not installed here: "
                        "pip install bitsandbytes (it runs on CUDA GPUs and, more slowly, on CPUs), or drop the flag")


def load_4bit_base(path: str | Path, compute_dtype, device):
    """The model in `path` with every linear layer but the output head held in 4-bit NF4
    (bitsandbytes quantizes the weights as they load, onto `device`), made ready for adapters:
    frozen, with layer norms and the output head in float32 for stable gradients. Matmuls run in
    `compute_dtype` (the run's precision)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute_dtype)
    device_map = {"": device.index if device.type == "cuda" else str(device)}
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, quantization_config=quant,
                                                 device_map=device_map)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merge_into_full_base(trained, opts: LoraOptions, base_dir: str | Path):
    """The adapters of `trained` (a peft model on a 4-bit base) merged into the full-precision
    base reloaded from `base_dir`: the merge QLoRA calls for, since adding them to the 4-bit
    weights would store the sum in 4 bits."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lib.model.build import load_pretrained

    full = apply(load_pretrained(base_dir), dataclasses.replace(opts, quantize="none"))
    adapters = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(trained).items()}
    result = set_peft_model_state_dict(full, adapters)
    if result.unexpected_keys:
        raise UserError(f"the trained adapters do not fit the base in {base_dir}: {result.unexpected_keys[:3]}")
    return full


def apply(model, opts: LoraOptions):
    """Freeze `model` and wrap it with fresh adapters (initialised from torch's RNG)."""
    from peft import LoraConfig, get_peft_model

    targets = opts.target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    if not targets:
        raise UserError("--lora.target_modules is empty; name modules (q_proj,v_proj) or pass all-linear")
    # GPT-2's layers are Conv1D, whose weight is stored (in, out): peft must know, or it warns and
    # sets it itself
    conv1d = any(type(mod).__name__ == "Conv1D" for mod in model.modules())
    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                        task_type="CAUSAL_LM", fan_in_fan_out=conv1d)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model..."
        linear = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                         if type(mod).__name__ in ("Linear", "Conv1D")})
        raise UserError(f"--lora.target_modules {opts.target_modules!r}: {str(exc).splitlines()[0]} "
                        f"This model's linear layers: {', '.join(linear)}") from None


def adapted_modules(model) -> list[str]:
    """The kinds of layer (their last name: q_proj, c_attn) that carry adapters in `model`."""
    return sorted({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters()
                   if ".lora_A." in name})


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
    from lib.records.checkpoint import is_sharded, tensor_names

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

