"""The end of a training run: the final model, in Hugging Face format with its tokenizer.

    export.final_model(accelerator, prepared, run_dir / "final", tokens_dir, fused, lora_opts, rebuild)

Every process calls it (under FSDP each holds a shard, and gathering the full weights takes all
of them); the main process writes. LoRA runs also get `final_adapter/` (the adapter alone, for
peft) beside a `final/` that holds the merged model, which eval.py and any Auto class load.
"""
from __future__ import annotations

from pathlib import Path


def final_model(accelerator, prepared, out_dir: str | Path, tokens_dir: str | Path, fused=None,
                lora_opts=None, rebuild=None) -> None:
    """Write `out_dir` (replaced atomically) from the prepared model. `fused`: a FusedHead to take
    off first, so the saved output layer is a plain nn.Linear. `lora_opts`: the LoRA options of a
    LoRA run (None otherwise); `rebuild()` returns the bare base model, needed for LoRA under FSDP,
    where peft must merge whole tensors."""
    from lib import lora
    from lib.files import atomic_folder, write_checksums
    from lib.report import write_final
    from lib.runtime import is_sharded

    out_dir = Path(out_dir)
    sharded, use_lora = is_sharded(accelerator), lora_opts is not None
    full_state = accelerator.get_state_dict(prepared) if sharded or not use_lora else None
    if not accelerator.is_main_process:
        return
    if fused is not None:
        fused.detach()
    model = accelerator.unwrap_model(prepared)
    if use_lora and sharded:  # an unsharded copy on this process, for peft to merge
        model = lora.apply(rebuild(), lora_opts)
        model.load_state_dict(full_state)
        full_state = None
    if use_lora:
        with atomic_folder(out_dir.with_name(out_dir.name + "_adapter")) as build:
            model.save_pretrained(str(build.path), safe_serialization=True)
            write_checksums(build.path)
        model = model.merge_and_unload()
    write_final(model, tokens_dir, out_dir, full_state)
