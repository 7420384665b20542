"""Talking to a model: load a run, a model folder, a LoRA adapter or a model name offline, and
continue prompts or hold a conversation, streaming the text as it is generated (eval.py generate).

    session = Session.open("runs/default", GenerationOptions(temperature=0.8))
    session.complete("def parse(", out=sys.stdout)
    session.chat_turn("What does os.path.join do?", out=sys.stdout)   # a tokenizer with a chat template
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from lib.errors import UserError


@dataclass
class GenerationOptions:
    """How tokens are drawn (transformers' generate)."""

    max_new_tokens: int = 200
    """The most tokens to add (fewer where the model's positions run out, or at its eos)."""
    temperature: float = 0.8
    """0: greedy (the most likely token each time)."""
    top_k: int = 50
    """Draw among the k most likely tokens only (0: all)."""
    top_p: float = 0.95
    """Draw among the most likely tokens that together hold this probability (1: all)."""
    repetition_penalty: float = 1.0
    """Above 1, tokens already in the text are made less likely (1: off)."""

    def check(self) -> None:
        for name, ok, need in (("max_new_tokens", self.max_new_tokens >= 1, "at least 1"),
                               ("temperature", self.temperature >= 0, "0 or more (0: greedy)"),
                               ("top_k", self.top_k >= 0, "0 or more (0: off)"),
                               ("top_p", 0 < self.top_p <= 1, "more than 0, at most 1"),
                               ("repetition_penalty", self.repetition_penalty > 0, "more than 0 (1: off)")):
            if not ok:
                raise UserError(f"--{name} {getattr(self, name)}: must be {need}")

    def generate_kwargs(self) -> dict:
        kw = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return {**kw, "do_sample": False}
        return {**kw, "do_sample": True, "temperature": self.temperature, "top_k": self.top_k or None,
                "top_p": self.top_p}


@dataclass
class ModelSource:
    """What `--model` named, as folders: the weights, a LoRA adapter on them, the run they came from."""

    model_dir: Path
    adapter_dir: Optional[Path] = None
    run_dir: Optional[Path] = None
    tokenizer_dir: Path = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.model_dir


def locate(spec: str) -> ModelSource:
    """A run folder (its final/), a model folder, a LoRA adapter folder (final_adapter/: its base
    is the folder its adapter_config.json names) or a model name in the Hugging Face cache."""
    from lib.model import registry

    path = Path(spec).expanduser()
    if (path / "final" / "config.json").is_file():
        return ModelSource(path / "final", run_dir=path)
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
        base_dir = registry.resolve(base, option=f"the base model of {path}")
        run = path.parent if (path.parent / "config.yaml").is_file() else None
        tok = path if (path / "tokenizer_config.json").is_file() else base_dir
        return ModelSource(base_dir, adapter_dir=path, run_dir=run, tokenizer_dir=tok)
    if (path / "config.json").is_file():
        return ModelSource(path, run_dir=path.parent if (path.parent / "config.yaml").is_file() else None)
    if path.exists():
        raise UserError(f"--model {spec}: neither a run folder with final/, a model folder with config.json, nor a "
                        "LoRA adapter folder with adapter_config.json")
    return ModelSource(registry.resolve(spec, option="--model"))


def require_chat_template(tok, where) -> None:
    if not getattr(tok, "chat_template", None):
        raise UserError(f"{where}: the tokenizer has no chat template (tokenizer_config.json), so the model was not "
                        "instruction-tuned on conversations; continue plain text with --prompt or --interactive "
                        "(without --chat)")


class _Streamer:
    """Receives generate's tokens, writes the new text to `out` as soon as it decodes to whole
    characters (a multi-byte character split over tokens waits for its last piece)."""

    def __init__(self, tok, out: TextIO, prompt_len: int):
        self.tok, self.out, self.skip = tok, out, prompt_len
        self.ids: list[int] = []
        self.written = 0

    def put(self, value) -> None:
        ids = value.reshape(-1).tolist()
        if self.skip:  # generate hands over the prompt first
            cut = min(self.skip, len(ids))
            ids, self.skip = ids[cut:], self.skip - cut
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


class Session:
    """A loaded model and tokenizer, the generation options, and the conversation so far."""

    def __init__(self, model, tok, opts: GenerationOptions, device, bos_first: bool, system: Optional[str] = None):
        self.model, self.tok, self.opts, self.device = model, tok, opts, device
        self.bos_first = bos_first
        self.system = system
        self.history: list[dict] = []

    @classmethod
    def open(cls, spec: str, opts: GenerationOptions, dtype=None, system: Optional[str] = None,
             chat: bool = False, trust_unverified: bool = False) -> "Session":
        """Load what `spec` names (see `locate`) on this machine's device, offline, its files checked
        against their checksums.json first (lib.model.build.check_model_files: a run's model without
        one is refused unless `trust_unverified`); `chat`: refuse a tokenizer without a chat template
        before loading any weights. What the check finds goes to stderr (stdout is the text)."""
        import torch

        from lib.data.tokenizer import load_hf_tokenizer
        from lib.model.build import check_model_files, load_pretrained

        opts.check()
        src = locate(spec)
        say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
        # what the run wrote (its final/, or its adapter) must carry its record; a base model
        # from elsewhere is checked where it has one
        written = src.adapter_dir or src.model_dir
        for folder in filter(None, (src.model_dir, src.adapter_dir)):
            check_model_files(folder, src.run_dir is not None and folder == written, trust_unverified, say=say)
        tok = load_hf_tokenizer(src.tokenizer_dir)
        if chat:
            require_chat_template(tok, src.tokenizer_dir)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_pretrained(src.model_dir, dtype=dtype)
        if src.adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(src.adapter_dir))
        model = model.to(device).eval()
        # documents trained on here start with bos: a prompt does too, whatever the tokenizer's habit
        bos_first = src.run_dir is not None and tok.bos_token_id is not None
        return cls(model, tok, opts, device, bos_first, system)

    def encode(self, text: str) -> list[int]:
        ids = self.tok(text).input_ids
        bos = self.tok.bos_token_id
        if self.bos_first and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def positions(self) -> int:
        """How many tokens the model reads (a very large number when its config does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None) or 1 << 30

    def _generate(self, ids: list[int], out: TextIO) -> str:
        import torch

        if not ids:
            raise UserError("the prompt encodes to no tokens: give some text")
        positions = self.positions()
        if len(ids) >= positions:
            raise UserError(f"the prompt is {len(ids)} tokens; this model reads at most {positions}")
        kw = self.opts.generate_kwargs()
        kw["max_new_tokens"] = min(kw["max_new_tokens"], positions - len(ids))
        streamer = _Streamer(self.tok, out, len(ids))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            seq = self.model.generate(torch.tensor([ids], device=self.device),
                                      attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=self.device),
                                      streamer=streamer, pad_token_id=pad, **kw)
        return self.tok.decode(seq[0, len(ids):], skip_special_tokens=True)

    def complete(self, prompt: str, out: TextIO) -> str:
        """Continue `prompt`, streaming the continuation to `out`; returns it."""
        return self._generate(self.encode(prompt), out)

    def chat_turn(self, message: str, out: TextIO) -> str:
        """Answer a user message in the conversation so far (the tokenizer's chat template),
        streaming the answer to `out`; the answer joins the conversation."""
        require_chat_template(self.tok, "this model")
        self.history.append({"role": "user", "content": message})
        while True:  # the oldest exchanges go first when the conversation outgrows the model's positions
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tok(text, add_special_tokens=False).input_ids
            if len(self.history) <= 1 or len(ids) < self.positions() - 8:
                break
            del self.history[:2]
        answer = self._generate(ids, out)
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer

    def reset(self) -> None:
        self.history.clear()


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int, device, autocast=None,
                         eos: int | None = None) -> list[list[int]]:
    """Each prompt's greedy continuation (token ids, up to its first `eos`), of up to `new_tokens`
    tokens, fewer where the model's positions end. Greedy and one prompt at a time, so every
    process that calls it with the same weights runs the same forward passes (a sharded model's
    forward is collective). The model is in eval mode meanwhile, then back in its own."""
    import torch

    cfg = model.config
    positions = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), (autocast() if autocast else contextlib.nullcontext()):
        for ids in prompts:
            n = new_tokens if positions is None else max(0, min(new_tokens, positions - len(ids)))
            seq = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                 device=device), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                                 pad_token_id=eos if eos is not None else 0, temperature=None, top_p=None, top_k=None)
            new = seq[0, len(ids):].tolist()
            out.append(new[:new.index(eos)] if eos in new else new)
    model.train(was_training)
    return out
