"""Build a causal LM from a small config, or load one offline from a local folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lib.errors import UserError


@dataclass
class ModelConfig:
    """Architecture of a model built from scratch (ignored when `init_from` is set)."""

    size: Optional[str] = None
    """A named shape that sets the fields below (lib/model/registry.py SIZES: llama-20m, llama-135m,
    llama-1b, gpt2-124m, gpt2-355m), over a --config preset; flags given with it still change
    single fields."""
    arch: Literal["llama", "gpt2", "gpt"] = "llama"
    """llama or gpt2: transformers' classes; gpt: this project's own model (lib/model/gpt.py), which
    exports as a Llama (with qk_norm, a Qwen3) where its options allow, else in its own format."""
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    """Key/value heads for grouped-query attention (llama); None means n_heads."""
    d_ff: Optional[int] = None
    """MLP hidden width; None means 8/3 * d_model rounded up to a multiple of 64 (llama)."""
    max_seq_len: int = 512
    dropout: float = 0.0
    """Attention dropout (llama) or all dropouts (gpt2)."""
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    init_std: float = 0.02
    qk_norm: bool = False
    """arch gpt: RMSNorm on each head's queries and keys before the rotary positions."""
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    """arch gpt: SwiGLU (gate, up, down; d_ff defaults to 8/3 d_model) or ReLU² (up, relu(x)^2, down;
    d_ff defaults to 4 d_model, the same weights)."""
    logit_softcap: Optional[float] = None
    """arch gpt: squash the logits to (-c, c) by c * tanh(logits / c); None: not at all."""
    file: Optional[str] = None
    """arch gpt: build the model from this file instead of lib/model/gpt.py: your copy of it (make
    fork NAME=x FILE=lib/model/gpt.py makes experiments/x/gpt.py, which the fork audit tracks), with
    its GPT and GPTConfig classes kept. A final/ it cannot export as a standard architecture records
    the file and its checksum, and eval.py reads such a folder with that file as it was."""
    init_from: Optional[str] = None
    """A model to start from instead: a folder (a run's final/, any Hugging Face model folder), a
    name (gpt2, tinyllama, smollm-135m, ...) or an org/name id, looked up in the Hugging Face cache
    (lib/model/registry.py). Nothing is downloaded unless allow_download."""
    allow_download: bool = False
    """Let init_from fetch a named model that is not on this machine from the Hugging Face hub."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code when loading it (only for repositories you trust)."""


def _d_ff(cfg: ModelConfig) -> int:
    if cfg.d_ff is not None:
        return cfg.d_ff
    if cfg.arch == "gpt" and cfg.mlp == "relu2":
        return 4 * cfg.d_model
    return -(-int(8 * cfg.d_model / 3) // 64) * 64


def build_model(cfg: ModelConfig, vocab_size: int, special: dict[str, int]):
    """A freshly initialised causal LM (float32 weights) for `vocab_size` tokens.

    `special` maps bos/eos/pad to ids so the saved model generates and pads correctly.
    With `cfg.init_from` set, the weights come from that local folder instead.
    """
    if cfg.init_from:
        return load_pretrained(cfg.init_from, trust_remote_code=cfg.trust_remote_code)
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"model.d_model={cfg.d_model} must be divisible by model.n_heads={cfg.n_heads}")
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = dict(bos_token_id=special["bos"], eos_token_id=special["eos"], pad_token_id=special["pad"])
    if cfg.file and cfg.arch != "gpt":
        raise UserError(f"--model.file {cfg.file}: a model file is for --model.arch gpt (this is {cfg.arch})")
    own_only = [flag for flag, on in (("--model.qk_norm", cfg.qk_norm), (f"--model.mlp {cfg.mlp}", cfg.mlp != "swiglu"),
                                      ("--model.logit_softcap", cfg.logit_softcap is not None)) if on]
    if own_only and cfg.arch != "gpt":
        raise UserError(f"{own_only[0]} is an option of the project's own model (--model.arch gpt), not of "
                        f"--model.arch {cfg.arch}: drop it (--model.no_qk_norm, --model.mlp swiglu, "
                        "--model.logit_softcap None) or train --model.arch gpt")
    if cfg.arch == "gpt":
        own = model_module(cfg.file)
        GPT, GPTConfig = own.GPT, own.GPTConfig
        return GPT(GPTConfig(vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                             n_kv_heads=cfg.n_kv_heads, d_ff=_d_ff(cfg), max_seq_len=cfg.max_seq_len, mlp=cfg.mlp,
                             qk_norm=cfg.qk_norm, tie_embeddings=cfg.tie_embeddings, logit_softcap=cfg.logit_softcap,
                             rope_theta=cfg.rope_theta, dropout=cfg.dropout, init_std=cfg.init_std, **ids))
    if cfg.arch == "llama":
        hf_cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=_d_ff(cfg),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
            max_position_embeddings=cfg.max_seq_len, attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
            initializer_range=cfg.init_std, **ids,
        )
    else:
        hf_cfg = GPT2Config(
            vocab_size=vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
            n_inner=cfg.d_ff, n_positions=cfg.max_seq_len, resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=cfg.tie_embeddings,
            initializer_range=cfg.init_std, **ids,
        )
    hf_cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)


def model_module(file: str | Path | None):
    """The module of the project's own model: lib/model/gpt.py, or `file`, a copy of it with its
    GPT and GPTConfig classes (imported once per path; a UserError if it is missing or lacks them)."""
    import hashlib
    import importlib.util
    import sys

    import lib.model.gpt  # first: the Auto classes keep reading the project's own format with it

    if not file:
        return lib.model.gpt
    path = Path(file).resolve()
    if not path.is_file():
        raise UserError(f"--model.file {file}: no such file (make fork NAME=x FILE=lib/model/gpt.py makes a copy to edit)")
    # one module per path and content: a file edited since it was last imported is imported anew
    name = f"lm_model_file_{hashlib.sha256(str(path).encode() + path.read_bytes()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the researcher's own edit: say where, not a traceback of ours
            del sys.modules[name]
            raise UserError(f"--model.file {file} failed to import: {type(exc).__name__}: {exc}") from exc
    module = sys.modules[name]
    missing = [c for c in ("GPT", "GPTConfig") if not hasattr(module, c)]
    if missing:
        raise UserError(f"--model.file {file} defines no {' or '.join(missing)}: a model file keeps lib/model/gpt.py's "
                        "classes (GPT, GPTConfig) under their names")
    return module


def refuse_masked_lm(path: str | Path) -> None:
    """A UserError for a masked-LM folder (BERT-style): AutoModelForCausalLM would load it as a
    causal model without complaint and score it wrongly (DEFERRED.md says why it is not supported)."""
    from lib.files import read_json

    archs = read_json(Path(path) / "config.json", "model config").get("architectures") or []
    masked = [a for a in archs if a.endswith("ForMaskedLM")]
    if masked:
        raise UserError(f"{path} is a masked language model ({masked[0]}); this project trains and evaluates causal "
                        "models only: a masked LM has no left-to-right probability of a text to report (DEFERRED.md)")


def check_model_files(model_dir: str | Path, in_run: bool, trust_unverified: bool = False, say=print) -> dict | None:
    """Before a model folder is read: its files against its checksums.json (train.py writes one into
    every final/ and final_adapter/), the verified file -> sha256 table returned. A missing or
    changed file is a UserError naming it. A folder without the record is refused when it is a
    run's (`in_run`: a changed model would be taken for the run's) unless `trust_unverified`, and
    only warned about otherwise (a model not written by train.py); None then."""
    from lib.files import CHECKSUMS, verify_checksums

    model_dir = Path(model_dir)
    if (model_dir / CHECKSUMS).is_file():
        verified = verify_checksums(model_dir)
        say(f"{model_dir}: {len(verified)} files match {CHECKSUMS}")
        return verified
    if in_run and not trust_unverified:
        raise UserError(f"{model_dir} is a run's model but has no {CHECKSUMS}, so its files cannot be checked against "
                        "what training wrote (scripts/audit.py --checks run fails it too); pass --trust_unverified to "
                        "use it anyway")
    say(f"warning: {model_dir} has no {CHECKSUMS} ({'--trust_unverified' if in_run else 'a model not written by train.py'}"
        "): its files are not checked")
    return None


REPO = Path(__file__).resolve().parents[2]  # a model file inside it is recorded relative to it


def model_file_record(path: Path) -> dict:
    """What export.json records of the model file (--model.file) a final/ needs to be read (by
    recorded_model_file): its path, relative to the repository where it lies inside it (a fork
    does), and its sha256."""
    from lib.files import sha256_file

    path = path.resolve()
    return {"model_file": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
            "model_file_sha256": sha256_file(path)}


def recorded_model_file(folder: Path):
    """The module of the model file (--model.file) that wrote `folder` in the project's own format,
    as its export.json records it; None for a folder any other code reads. A UserError if that file
    is gone or has changed since: its weights would be read by other code than trained them."""
    from lib.files import read_json, sha256_file

    record_path = folder / "export.json"
    record = read_json(record_path, "export record") if record_path.is_file() else {}
    if not record.get("model_file"):
        return None
    file = REPO / record["model_file"]  # an absolute path stays as it is
    if not file.is_file() or sha256_file(file) != record.get("model_file_sha256"):
        state = "is missing" if not file.is_file() else "has changed since"
        raise UserError(f"{folder} was written by the model file {record['model_file']}, which {state}: restore it "
                        f"as it was (sha256 {record.get('model_file_sha256')}, e.g. from git), or retrain")
    return model_module(file)


def load_pretrained(path: str | Path, dtype=None, trust_remote_code: bool = False):
    """Load a causal LM from a local folder, offline; a clear error if it is not one (this
    project's own format too: lib/model/gpt.py registers it with the Auto classes)."""
    from transformers import AutoModelForCausalLM

    import lib.model.gpt  # noqa: F401 -- registers the project's own model type

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a model folder (no config.json); give a run's final/ folder")
    refuse_masked_lm(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    own = recorded_model_file(path)
    try:
        if own is not None:  # written by a model file of the researcher's (--model.file)
            return own.GPT.from_pretrained(path, local_files_only=True, **kwargs)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                                    **kwargs)
    except Exception as exc:  # a truncated or foreign weights file (safetensors, torch, json): the user's input
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise UserError(f"{path}: cannot load the model ({type(exc).__name__}: {first}); check or re-copy its "
                        "files (a run's final/ carries checksums.json: scripts/audit.py --checks run)") from None


def config_dims(hf_config) -> tuple[int, int, int]:
    """(hidden size, MLP width, vocabulary) of a Hugging Face config, Llama- or GPT-2-style."""
    hidden = hf_config.hidden_size
    inter = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None) or 4 * hidden
    return hidden, inter, hf_config.vocab_size


def matmul_dims(cfg: ModelConfig, vocab_size: int) -> tuple[int, int, int]:
    """(hidden size, MLP width, vocabulary) of the model `cfg` builds or loads, without building it:
    the matrix shapes lib.train.precision measures to choose a precision."""
    if cfg.init_from:
        from transformers import AutoConfig

        if not (Path(cfg.init_from) / "config.json").is_file():
            raise UserError(f"{cfg.init_from} is not a model folder (no config.json); give a run's final/ folder")
        import lib.model.gpt  # noqa: F401 -- registers the project's own model type

        return config_dims(AutoConfig.from_pretrained(cfg.init_from, local_files_only=True))
    return cfg.d_model, _d_ff(cfg) if cfg.arch != "gpt2" else (cfg.d_ff or 4 * cfg.d_model), vocab_size


def fp16_on_cpu(accelerator, init_scale: float | None = None) -> bool:
    """Give a CPU Accelerator asked for fp16 what a GPU one has: float16 autocast and (with
    `init_scale`, for training) a dynamic loss scaler. Accelerate alone leaves fp16 off on CPU and
    runs in fp32. Call before `prepare`. True if it did anything.

    Slow on CPUs without float16 units; it is there to run the fp16 path (loss scaling, skipped
    overflow steps, the scaler's state in checkpoints) before paying for GPUs.
    """
    import torch

    if accelerator.mixed_precision != "fp16" or accelerator.device.type != "cpu" or accelerator.native_amp:
        return False
    accelerator.native_amp = True  # Accelerate's autocast() and prepare() read it
    if init_scale is not None:
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return True


def cpu_only() -> bool:
    """True when torch sees no accelerator (CUDA, XPU, MPS). Accelerate must then be told so
    (Accelerator(cpu=True)) for a multi-process launch to become CPU DDP over gloo rather than
    independent single processes."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available()
                or (xpu is not None and xpu.is_available()))


def count_params(model, trainable_only: bool = False) -> int:
    """Number of parameters, each shared tensor counted once; a 4-bit weight (bitsandbytes packs
    two in a byte) counts the values it stands for."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        quant = getattr(p, "quant_state", None)
        total += quant.shape.numel() if quant is not None else p.numel()
    return total


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * layers * d_model * seq_len (PaLM appendix B).

    N counts every weight that takes part in matmuls, the output layer included; the second
    term is attention's score and value products. A frozen weight (LoRA's base) costs 4 per token
    instead of 6: its forward product and the gradient of its input, but no gradient of its own.
    """
    cfg = model.config
    n = count_params(model) - cfg.vocab_size * cfg.hidden_size * (0 if cfg.tie_word_embeddings else 1)
    frozen = max(0, n - count_params(model, trainable_only=True))  # an untied input embedding is a lookup
    return 6 * (n - frozen) + 4 * frozen + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def folder_positions(folder: str | Path) -> int | None:
    """The positions of the model in `folder`, from its config.json (max_position_embeddings, or
    GPT-2's n_positions); None where the folder has no readable config or it names none."""
    import json

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    return int(positions) if positions else None


def check_data_fits(init_from: str | Path, manifest: dict, seq_len: int) -> None:
    """A UserError unless data with this tokens manifest can train the model in `init_from`: the
    same tokenizer files when the folder holds a tokenizer (lib.data.tokenizer.tokenizer_fingerprint)
    and then no more ids than the model's embedding rows, else exactly its vocabulary size; the
    same bos and eos ids; and sequences no longer than the model's positions."""
    from transformers import AutoConfig

    from lib.data.tokenizer import tokenizer_fingerprint

    path = Path(init_from)
    if not (path / "config.json").is_file():
        raise UserError(f"--model.init_from {path} is not a model folder (no config.json); give a run's final/ folder")
    refuse_masked_lm(path)
    import lib.model.gpt  # noqa: F401 -- registers the project's own model type

    cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    fingerprint = tokenizer_fingerprint(path)
    rows, vocab = getattr(cfg, "vocab_size", None), manifest["vocab_size"]
    differences = []
    if fingerprint is not None and fingerprint != manifest["tokenizer_sha256"]:
        differences.append("its tokenizer files differ from those the data was encoded with")
    # a model may have more embedding rows than its tokenizer has ids (padded to a multiple)
    if rows is not None and (vocab > rows or (fingerprint is None and vocab != rows)):
        differences.append(f"vocabulary {rows} vs the data's {vocab}")
    for name in ("bos", "eos"):
        model_id = getattr(cfg, f"{name}_token_id", None)
        data_id = manifest["special_ids"].get(name)
        if model_id is not None and data_id is not None and model_id != data_id:
            differences.append(f"{name} id {model_id} vs the data's {data_id}")
    if differences:
        raise UserError(f"--model.init_from {path} uses another tokenizer than the data ({'; '.join(differences)}). "
                        f"Encode your text with the model's own tokenizer: python scripts/tokenize.py --tokenizer "
                        f"{path} --corpus.source YOUR_TEXT --out_dir data/NAME, then --data.dir data/NAME (for a "
                        "model made by train.py, its run's --data.dir also fits: see the run's config.yaml)")
    positions = folder_positions(path)
    if positions and seq_len > positions:
        raise UserError(f"--data.seq_len {seq_len} is longer than the {positions} positions of --model.init_from "
                        f"{path}; use --data.seq_len {positions} or less")
