"""The end of a training run: the final model, in Hugging Face format with its tokenizer.

    export.final_model(accelerator, prepared, run_dir / "final", tokens_dir, fused, lora_opts, rebuild)

Every process calls it (under FSDP each holds a shard, and gathering the full weights takes all
of them); the main process writes. LoRA runs also get `final_adapter/` (the adapter alone, for
peft) beside a `final/` that holds the merged model, which eval.py and any Auto class load.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from lib.errors import UserError
from lib.files import atomic_folder, read_json, write_checksums, write_json


def final_model(accelerator, prepared, out_dir: str | Path, tokens_dir: str | Path, fused=None,
                lora_opts=None, rebuild=None, base_dir=None, probe_ids=None, trained_len: int | None = None) -> None:
    """Write `out_dir` (replaced atomically) from the prepared model. `fused`: a FusedHead to take
    off first, so the saved output layer is a plain nn.Linear. `lora_opts`: the LoRA options of a
    LoRA run (None otherwise); `rebuild()` returns the bare base model, needed for LoRA under FSDP,
    where peft must merge whole tensors. A LoRA run from a saved base (`base_dir`) has its merge
    checked on `probe_ids` (check_merge) before `out_dir` is put in place, and the figures written
    to `out_dir/export.json`; a failed check leaves the previous `out_dir` and raises.
    `trained_len`: for a model trained from scratch, the sequence length it learned, recorded as
    its length (record_trained_length)."""
    from lib.model import lora
    from lib.train.runtime import is_sharded

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
    try:
        _write(model, out_dir, tokens_dir, full_state, lora_opts, base_dir, probe_ids, trained_len)
    except Exception as exc:  # noqa: BLE001 -- safetensors reports a full disk as its own error type
        from lib.errors import free_mb, is_disk_full

        if not is_disk_full(exc):
            raise
        size = sum(t.numel() * t.element_size() for t in (full_state or model.state_dict()).values())
        raise UserError(f"disk full writing the final model {out_dir}: it takes about {size / 1e6:.1f} MB "
                        f"({free_mb(out_dir)}); nothing of it was kept, the run's checkpoints are whole. Free "
                        "some space, then run the same command with --resume auto: it resumes at the last step "
                        "and writes the final model") from None


def _write(model, out_dir: Path, tokens_dir, full_state, lora_opts, base_dir, probe_ids, trained_len) -> None:
    """final_model's writing, on the main process."""
    from lib.model import lora

    check, use_lora = None, lora_opts is not None
    if use_lora:
        adapter_dir = out_dir.with_name(out_dir.name + "_adapter")
        with atomic_folder(adapter_dir) as build:
            model.save_pretrained(str(build.path), safe_serialization=True)
            write_checksums(build.path)
        if lora_opts.quantize != "none":  # trained on a 4-bit base: merge into the full-precision one
            model = lora.merge_into_full_base(model, lora_opts, base_dir)
        model = model.merge_and_unload()
        if base_dir is not None and probe_ids is not None:
            check = lambda folder: write_json(  # noqa: E731
                folder / EXPORT_RECORD, check_merge(folder, base_dir, adapter_dir, probe_ids))
    write_final(model, tokens_dir, out_dir, full_state, check=check, trained_len=trained_len)


MERGE_TOLERANCE = 1e-3  # largest |logit| difference accepted between the merged model and base + adapter
EXPORT_RECORD = "export.json"


def check_merge(merged_dir: str | Path, base_dir: str | Path, adapter_dir: str | Path, probe_ids,
                tolerance: float = MERGE_TOLERANCE) -> dict:
    """Reload the merged model from `merged_dir` and the base from `base_dir` with the adapter from
    `adapter_dir` (fresh, as a user would), run both on `probe_ids` (a [rows, tokens] integer array)
    and compare: the largest absolute logit difference and the perplexity of each on the probe's
    next tokens. A UserError when the difference exceeds `tolerance`; else the figures."""
    import math

    import torch
    from peft import PeftModel

    from lib.model.loss import token_loss_sum
    from lib.model.build import load_pretrained

    ids = torch.as_tensor(probe_ids, dtype=torch.long)
    merged = load_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(load_pretrained(base_dir), str(adapter_dir)).eval()

    def logits_and_ppl(model):
        with torch.no_grad():
            logits = model(ids).logits.float()
        total, n = token_loss_sum(logits[:, :-1], ids[:, 1:])
        return logits, math.exp(float(total / n))

    a, ppl_merged = logits_and_ppl(merged)
    b, ppl_adapted = logits_and_ppl(adapted)
    record = {"probe_tokens": int(ids.numel()), "max_abs_logit_diff": float((a - b).abs().max()),
              "perplexity_merged": ppl_merged, "perplexity_base_plus_adapter": ppl_adapted,
              "perplexity_rel_diff": abs(ppl_merged - ppl_adapted) / ppl_adapted, "tolerance": tolerance}
    if not record["max_abs_logit_diff"] <= tolerance:
        raise UserError(f"{merged_dir}: the merged model's logits differ from base + adapter by "
                        f"{record['max_abs_logit_diff']:.3g} (tolerance {tolerance:g}) on {ids.numel()} probe tokens; "
                        f"the merge is wrong (the adapter alone is in {adapter_dir})")
    return record


def record_trained_length(folder: str | Path, seq_len: int) -> None:
    """Make a saved model from scratch say the sequence length it was trained on, where
    transformers and lm-evaluation-harness read it (config.json first, then the tokenizer's
    model_max_length): positions past `seq_len` never trained, and a client that fills them scores
    worse than the model is. A Llama's max_position_embeddings is set to `seq_len` (rotary
    positions have no weights); a GPT-2's learned position table is cut to its first `seq_len` rows
    (the rest were never updated) and n_positions set to match."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = read_json(folder / "config.json", "model config")
    if "n_positions" in cfg and cfg["n_positions"] > seq_len:  # GPT-2: the position table is a weight
        index = folder / "model.safetensors.index.json"
        name = "transformer.wpe.weight"
        shard = folder / (read_json(index, "weights index")["weight_map"][name] if index.is_file()
                          else "model.safetensors")
        with safe_open(str(shard), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        tensors[name] = tensors[name][:seq_len].contiguous()
        save_file(tensors, str(shard), metadata=meta)
        cfg["n_positions"] = seq_len
        if cfg.get("n_ctx", 0) > seq_len:
            cfg["n_ctx"] = seq_len
    elif cfg.get("max_position_embeddings", 0) > seq_len:
        cfg["max_position_embeddings"] = seq_len
    write_json(folder / "config.json", cfg)
    tok_cfg = folder / "tokenizer_config.json"
    if tok_cfg.is_file():
        write_json(tok_cfg, {**read_json(tok_cfg, "tokenizer config"), "model_max_length": seq_len})


def write_final(model, tokens_dir: str | Path, out_dir: str | Path, state_dict: dict | None = None,
                check=None, trained_len: int | None = None) -> Path:
    """Save `model` (with `state_dict`, the full one, when its parameters are sharded) and the
    dataset's tokenizer, the one the weights were trained in, so the Auto classes load them
    offline: this project's SentencePiece model with its Hugging Face twin, or a base model's own
    tokenizer files copied byte for byte. `check(folder)`, if given, runs on the complete folder
    before it replaces `out_dir` (its files are covered by checksums.json). `trained_len`: the
    sequence length a model trained from scratch learned (lib.model.export.record_trained_length)."""
    from transformers import AutoTokenizer

    from lib.data.tokenizer import SP_MODEL, copy_tokenizer_files

    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    tok_dir = (tokens_dir / ".." / "tokenizer").resolve()
    model, state_dict, exported = as_standard(model, state_dict)
    with atomic_folder(out_dir) as build:  # an older final/ stays until this one is complete
        if exported is not None:
            write_json(build.path / EXPORT_RECORD, exported)
        if state_dict is not None:
            # a gathered state dict holds a tied weight (output layer = embedding) twice, as two
            # tensors: keep the model's first name for each shared parameter, as a plain save does
            first: dict[int, str] = {}
            repeats = {name for name, param in model.named_parameters(remove_duplicate=False)
                       if first.setdefault(id(param), name) != name}
            state_dict = {k: v for k, v in state_dict.items() if k not in repeats}
        model.save_pretrained(str(build.path), safe_serialization=True, state_dict=state_dict)
        stamp = tok_dir / "build.json"
        template = read_json(tokens_dir / "manifest.json", "token manifest").get("chat_template")
        if stamp.is_file() and "pretrained" in read_json(stamp, "tokenizer record"):
            copy_tokenizer_files(tok_dir, build.path)  # a base model's own files: its fingerprint stays the base's
            config = build.path / "tokenizer_config.json"
            if template and config.is_file() and "chat_template" not in read_json(config, "tokenizer config"):
                from lib.data.chat import CLIENT_PREFIX  # tuned on conversations through this project's template

                write_json(config, {**read_json(config, "tokenizer config"), "chat_template": CLIENT_PREFIX + template})
        else:
            AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True).save_pretrained(str(build.path))
            client_conventions(build.path, template)
            shutil.copy2(tok_dir / SP_MODEL, build.path / SP_MODEL)
        if trained_len is not None:
            record_trained_length(build.path, trained_len)
        if check is not None:  # e.g. a LoRA merge reloaded and compared: raising keeps the old out_dir
            check(build.path)
        write_checksums(build.path)  # audit.py and eval.py check them before trusting the weights
    return out_dir


STANDARD_TOLERANCE = 1e-4  # largest |logit| difference accepted between the project's model and its standard twin


def as_standard(model, state_dict: dict | None = None) -> tuple:
    """(the model to save, its state dict, what export.json records): this project's own model
    (lib/model/gpt.py) as the standard architecture with the same weights (Llama; Qwen3 with
    QK-norm), checked logit for logit on a fixed input, or as it is, in its own format, where an
    option has no standard layout (saying which). A copy of the model file (--model.file) whose
    logits differ from the standard model's on the same weights computes another function: its
    own format, with the file and its checksum recorded for eval.py. Any other model as it is,
    with nothing to record."""
    import sys

    import torch

    import lib.model.gpt

    # the module whose GPT class this model is (FSDP2 wraps it in a subclass of its own)
    own = next((m for m in (sys.modules.get(c.__module__) for c in type(model).__mro__)
                if isinstance(getattr(m, "GPT", None), type) and isinstance(model, m.GPT) and hasattr(m, "to_standard")),
               None)
    if own is None:
        return model, state_dict, None  # transformers' own classes
    forked = own is not lib.model.gpt  # --model.file: a copy of the model file, perhaps changed

    def own_format(why: str):
        record = {"format": "lm_repo_gpt", "why": why}
        if forked:  # the folder is read with that file, unchanged
            from lib.model.build import model_file_record

            record.update(model_file_record(Path(own.__file__)))
        print(f"final model: in this project's own format ({why}); "
              + (f"eval.py reads it with {record['model_file']} as it is now" if forked else
                 "eval.py reads it, and AutoModelForCausalLM after `import lib.model.gpt`"))
        return model, state_dict, record

    try:
        standard = own.to_standard(model, state_dict)
    except ValueError as why:
        return own_format(str(why))
    trained = model
    if state_dict is not None:
        trained = own.GPT(model.config)
        trained.load_state_dict(state_dict, strict=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    was_training = trained.training
    trained.eval()
    with torch.no_grad():
        diff = float((trained.float()(ids, use_cache=False).logits - standard(ids, use_cache=False).logits).abs().max())
    trained.train(was_training)
    if not diff <= STANDARD_TOLERANCE:
        if forked:  # the copy computes another function on the same weights: not a standard model
            return own_format(f"its logits differ from a {type(standard).__name__}'s on the same weights by {diff:.3g}")
        raise RuntimeError(f"the {type(standard).__name__} export of the model differs from it by {diff:.3g} in "
                           "its logits: a weight is mapped wrong (lib/model/gpt.py)")
    print(f"final model: exported as {type(standard).__name__} (logits within {diff:.1e} of the trained model's)")
    return standard, None, {"format": type(standard).__name__, "max_abs_logit_diff": diff, "probe_tokens": 64}


def client_conventions(folder: Path, chat_template: str | None = None) -> None:
    """Save this project's tokenizer the way clients expect a Llama-style one: encoding a text adds
    bos in front (every training document starts with it), so `model.generate(**tok(prompt))`
    conditions as training did; and a special-token string a client writes ("<s>") is that token.
    (The data pipeline encodes with SentencePiece itself, where "<s>" in a file is plain text.)
    Clients that add bos themselves encode with add_special_tokens=False, as
    lm-evaluation-harness does, and get one bos, never two.

    `chat_template`: the template conversations were rendered with in training (the data's
    manifest), saved with bos in front, so that apply_chat_template(messages, tokenize=True)
    gives the ids training saw."""
    from lib.data.chat import CLIENT_PREFIX

    name = "tokenizer_config.json"
    if (folder / name).is_file():
        chat = {"chat_template": CLIENT_PREFIX + chat_template} if chat_template else {}
        write_json(folder / name, {**read_json(folder / name, "tokenizer file"), "add_bos_token": True,
                                   "add_eos_token": False, "split_special_tokens": False, **chat})
