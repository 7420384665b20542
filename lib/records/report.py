"""End-of-run outputs besides the model (lib/model/export.py): the plot of the metrics and report.md."""
from __future__ import annotations

from pathlib import Path

from lib.files import atomic_text
from lib.records.metrics import read_jsonl


def plot_metrics(run_dir: str | Path) -> Path | None:
    """loss.png: training loss and held-out loss against optimizer step (of a mixture, each
    source's too), the figures of harness tasks run during training (if any), and the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    if not train:
        return None
    tasks = [r for r in records if r.get("type") == "task"]
    task_figures = sorted({k for r in tasks for k in r if k.startswith("task_") and not k.endswith("_stderr")})
    if task_figures:  # harness tasks during training (train.py --tasks_every): a panel beside the loss
        fig, (ax, ax_task, ax_lr) = plt.subplots(3, 1, figsize=(8, 8), sharex=True, height_ratios=[3, 2, 1])
        for name in task_figures:
            points = [(r["step"], r[name]) for r in tasks if r.get(name) is not None]
            ax_task.plot(*zip(*points), "o-", label=name.removeprefix("task_"))
        ax_task.set_ylabel("task figure")
        ax_task.grid(alpha=0.3)
        ax_task.legend(fontsize="small")
    else:
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        label = f"held-out loss ({evals[-1].get('val_tokens', 0):,} tokens)"
        mixed = sorted({k for r in evals for k in r if k.startswith("val_loss_")})  # a mixture's sources
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-",
                label=label.replace("held-out loss", "held-out loss, the mixture") if mixed else label)
        for key in mixed:
            points = [(r["step"], r[key]) for r in evals if r.get(key) is not None]
            ax.plot(*zip(*points), ".--", label=f"held-out loss, {key.removeprefix('val_loss_')}")
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
    if "reward_accuracy" in final_eval:  # preference pairs (lib/model/preference.py summary)
        scored = (f"- held-out, {held_out}: loss {final_eval['loss']:.4f}, reward accuracy "
                  f"{final_eval['reward_accuracy']:.3f}, reward margin {final_eval['reward_margin']:.4f}, "
                  f"log-probability accuracy {final_eval['logp_accuracy']:.3f}")
    else:
        scored = (f"- held-out, {held_out} ({final_eval['tokens']:,} tokens; the sample every evaluation of the run "
                  f"scores): loss {final_eval['loss']:.4f}, perplexity {final_eval['perplexity']:.2f}, bits/byte "
                  f"{final_eval['bits_per_byte']:.4f}, next-token accuracy {final_eval['accuracy']:.3f}")
    lines = [f"# Run {title}", ""] + [f"- {fact}" for fact in facts] + [scored, "", "![loss](loss.png)", ""]
    with atomic_text(path) as f:
        f.write("\n".join(lines))
    return path
