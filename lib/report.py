"""End-of-run outputs: the Hugging Face-format final model, and plots of the metrics."""
from __future__ import annotations

import shutil
from pathlib import Path

from lib.files import atomic_folder, atomic_text, read_json, write_checksums, write_json
from lib.metrics import read_jsonl


def write_final(model, tokens_dir: str | Path, out_dir: str | Path, state_dict: dict | None = None,
                check=None, trained_len: int | None = None) -> Path:
    """Save `model` (with `state_dict`, the full one, when its parameters are sharded) and the
    dataset's tokenizer, the one the weights were trained in, so the Auto classes load them
    offline: this project's SentencePiece model with its Hugging Face twin, or a base model's own
    tokenizer files copied byte for byte. `check(folder)`, if given, runs on the complete folder
    before it replaces `out_dir` (its files are covered by checksums.json). `trained_len`: the
    sequence length a model trained from scratch learned (lib.export.record_trained_length)."""
    from transformers import AutoTokenizer

    from lib.tokenizer import SP_MODEL, copy_tokenizer_files

    tokens_dir, out_dir = Path(tokens_dir), Path(out_dir)
    tok_dir = (tokens_dir / ".." / "tokenizer").resolve()
    with atomic_folder(out_dir) as build:  # an older final/ stays until this one is complete
        if state_dict is not None:
            # a gathered state dict holds a tied weight (output layer = embedding) twice, as two
            # tensors: keep the model's first name for each shared parameter, as a plain save does
            first: dict[int, str] = {}
            repeats = {name for name, param in model.named_parameters(remove_duplicate=False)
                       if first.setdefault(id(param), name) != name}
            state_dict = {k: v for k, v in state_dict.items() if k not in repeats}
        model.save_pretrained(str(build.path), safe_serialization=True, state_dict=state_dict)
        stamp = tok_dir / "build.json"
        if stamp.is_file() and "pretrained" in read_json(stamp, "tokenizer record"):
            copy_tokenizer_files(tok_dir, build.path)  # a base model's own files: its fingerprint stays the base's
        else:
            AutoTokenizer.from_pretrained(str(tok_dir)).save_pretrained(str(build.path))
            leave_bos_to_the_client(build.path)
            shutil.copy2(tok_dir / SP_MODEL, build.path / SP_MODEL)
        if trained_len is not None:
            from lib.export import record_trained_length

            record_trained_length(build.path, trained_len)
        if check is not None:  # e.g. a LoRA merge reloaded and compared: raising keeps the old out_dir
            check(build.path)
        write_checksums(build.path)  # audit.py and eval.py check them before trusting the weights
    return out_dir


def leave_bos_to_the_client(folder: Path) -> None:
    """Make the saved tokenizer encode a text without adding bos itself. Training documents start
    with bos, and clients add it their own way: lm-evaluation-harness puts it in front of every
    text as context, a generation script puts it before the prompt. A tokenizer that adds one as
    well gives them two, which the model never saw."""
    for name, update in (("tokenizer.json", {"post_processor": None}),
                         ("tokenizer_config.json", {"add_bos_token": False, "add_eos_token": False})):
        if (folder / name).is_file():
            write_json(folder / name, {**read_json(folder / name, "tokenizer file"), **update})


def plot_metrics(run_dir: str | Path) -> Path | None:
    """loss.png: training loss and held-out loss against optimizer step, and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        label = f"held-out loss ({evals[-1].get('val_tokens', 0):,} tokens)"
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label=label)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(run_dir.name)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def set_report_section(report: str | Path, title: str, body: str) -> None:
    """Put `body` under a `## title` heading of a run's report.md, replacing that section if it is
    there already (a re-run of the same evaluation) and keeping the rest. Written atomically."""
    report = Path(report)
    text = report.read_text(encoding="utf-8") if report.is_file() else ""
    head = f"## {title}\n"
    if head in text:
        before, _, after = text.partition(head)
        rest = after.split("\n## ", 1)
        text = before + ("## " + rest[1] if len(rest) > 1 else "")
    text = text.rstrip("\n") + "\n\n" + head + "\n" + body.rstrip("\n") + "\n"
    with atomic_text(report) as f:
        f.write(text.lstrip("\n"))


def write_run_report(run_dir: str | Path, title: str, facts: list[str], final_eval: dict, held_out: str) -> Path:
    """A run's report.md: `facts` as a list, the final held-out evaluation (a dict of
    lib/evaluate.summarize with "tokens"), the loss plot. eval.py adds its own section later."""
    path = Path(run_dir) / "report.md"
    lines = [f"# Run {title}", ""] + [f"- {fact}" for fact in facts] + [
        f"- held-out, {held_out} ({final_eval['tokens']:,} tokens; the sample every evaluation of the run "
        f"scores): loss {final_eval['loss']:.4f}, perplexity {final_eval['perplexity']:.2f}, bits/byte "
        f"{final_eval['bits_per_byte']:.4f}, next-token accuracy {final_eval['accuracy']:.3f}",
        "", "![loss](loss.png)", ""]
    with atomic_text(path) as f:
        f.write("\n".join(lines))
    return path
