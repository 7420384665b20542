"""Forgetting, and how a mixture trades it: the default model fine-tuned on a small second corpus
alone, and mixed with its original data at a few weights, each for the same budget; every model
scored on both corpora's held-out splits before and after.

    make train                                        # runs/default: the model to fine-tune
    python experiments/mixture/mixture.py             # the runs, results.jsonl, results.md, mixture.png
    python experiments/mixture/mixture.py --report    # the table and plot from results.jsonl only

The second corpus is Python's documentation topics (pydoc_data, on every machine with Python):
English prose with code, rendered as text (the stdlib corpus holds them too, once, as the Python
source of one module's string literals). It is encoded with the default model's own tokenizer into
data/topics. Each fine-tune starts from runs/default/final with the learning rate of the README's
fine-tuning recipe and the same minutes; a run on the topics alone is `--data.dir data/topics`,
the others `--data.mix data/topics:W,data/stdlib:1-W`. Each model is scored by scripts/eval.py on
the whole held-out split of both corpora.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
BASE = "runs/default"
TOPICS = "data/topics"
STDLIB = "data/stdlib"
WEIGHTS = (1.0, 0.5, 0.2)  # the topics' share of the training tokens; 1.0: the topics alone
MINUTES = 3
EVAL_TOKENS = 32_768  # what each in-training evaluation scores (the preset's eval_tokens)
LR = "3e-4"


def write_topics(path: Path) -> None:
    """The topics as one text file, which tokenize.py cuts into documents of about 8 KB at paragraph
    ends (as it does a book): a held-out tenth of those is 80 KB, where whole topics (some of 50 KB)
    would leave a few."""
    from pydoc_data.topics import topics

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(topics[key] for key in sorted(topics)), encoding="utf-8")


def bits_per_byte(model: str, data: str, out_dir: str) -> float:
    """scripts/eval.py's whole-split bits per byte of `model` on `data`."""
    proc = subprocess.run([PY, "scripts/eval.py", "--model", model, "--data", data, "--samples", "0",
                           "--out_dir", out_dir, "--no_tracking"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"eval.py failed on {model} / {data}:\n{proc.stderr[-2000:]}")
    return next(float(line.split()[1]) for line in proc.stdout.splitlines() if line.strip().startswith("bits/byte"))


def run_all() -> list[dict]:
    if not (ROOT / BASE / "final" / "config.json").is_file():
        sys.exit(f"{BASE}/final not found: run `make train` first (the model this experiment fine-tunes)")
    source = ROOT / "runs" / "mixture" / "topics.txt"
    write_topics(source)
    subprocess.run([PY, "scripts/tokenize.py", "--corpus.source", str(source), "--tokenizer", f"{BASE}/final",
                    "--out_dir", TOPICS, "--corpus.val_per_mille", "100", "--force"], cwd=ROOT, check=True)
    results = [{"run": "before", "weight": 0.0, "minutes": 0,
                "stdlib": bits_per_byte(BASE, STDLIB, "runs/mixture/before-stdlib"),
                "topics": bits_per_byte(BASE, TOPICS, "runs/mixture/before-topics")}]
    print(f"[mixture] before: stdlib {results[0]['stdlib']:.4f}, topics {results[0]['topics']:.4f}", flush=True)
    for w in WEIGHTS:
        name = "topics-alone" if w == 1.0 else f"topics-{w:g}"
        data = ["--data.dir", TOPICS] if w == 1.0 else ["--data.mix", f"{TOPICS}:{w:g},{STDLIB}:{1 - w:g}"]
        args = [PY, "scripts/train.py", "--config", "configs/train/default.yaml", "--runs_dir", "runs/mixture",
                "--run_name", name, "--overwrite", "--model.init_from", f"{BASE}/final", "--optim.lr", LR,
                "--max_minutes", str(MINUTES), "--eval_every", "50", "--checkpoint_every", "0",
                "--tracking.no_mlflow", *data]
        print(f"[mixture] {name}: {' '.join(args[2:])}", flush=True)
        t0 = time.time()
        with open(ROOT / "runs" / "mixture" / f"{name}.log", "w") as log:
            subprocess.run(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
        run = f"runs/mixture/{name}"
        records = [json.loads(x) for x in (ROOT / run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        final = next(r for r in records if r["type"] == "final")
        result = {"run": name, "weight": w, "minutes": MINUTES, "steps": final["step"], "tokens": final["tokens_seen"],
                  "topics_share_drawn": final.get("mix_share_topics", 1.0),
                  "topics_passes": final.get("mix_passes_topics"),
                  "stdlib": bits_per_byte(run, STDLIB, f"{run}/eval-stdlib"),
                  "topics": bits_per_byte(run, TOPICS, f"{run}/eval-topics"),
                  "curve": [(r["step"], r.get("val_bits_per_byte_topics", r.get("val_bits_per_byte")),
                             r.get("val_bits_per_byte_stdlib")) for r in records if r["type"] == "eval"],
                  "wall_s": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
        print(f"[mixture] {name}: stdlib {result['stdlib']:.4f}, topics {result['topics']:.4f}, {result['steps']} steps",
              flush=True)
        results.append(result)
    with open(HERE / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    return results


def report(results: list[dict]) -> None:
    before = results[0]
    manifest = json.loads((ROOT / TOPICS / "tokens" / "manifest.json").read_text())
    topics_tokens = manifest["splits"]["train"]["tokens"]  # the passes of the run on the topics alone
    rows = ["| run | topics' share of tokens | steps | passes over the topics | stdlib bits/byte (change) | "
            "topics bits/byte (change) | topics, best in training (step) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        change = (lambda k: "" if r["run"] == "before" else f" ({r[k] - before[k]:+.4f})")
        if r["run"] == "before":
            rows.append(f"| before | - | - | - | {r['stdlib']:.4f} | {r['topics']:.4f} | - |")
            continue
        passes = r.get("topics_passes") or r["tokens"] * r["weight"] / topics_tokens
        best = min(r["curve"], key=lambda c: c[1])
        rows.append(f"| {r['run']} | {r['topics_share_drawn']:.1%} | {r['steps']} | {passes:.1f} | "
                    f"{r['stdlib']:.4f}{change('stdlib')} | {r['topics']:.4f}{change('topics')} | "
                    f"{best[1]:.4f} ({best[0]}) |")
    (HERE / "results.md").write_text(
        f"# Fine-tuning on the documentation topics, alone and mixed ({results[-1].get('date', '')})\n\n"
        f"Each run: {BASE}/final fine-tuned for {MINUTES} minutes at learning rate {LR}; bits per byte on the whole "
        "held-out split of each corpus (scripts/eval.py); the share is the one the sampler drew; the best in "
        f"training is the lowest of the in-training evaluations (each scores up to {EVAL_TOKENS:,} "
        f"held-out tokens; the topics' split holds {manifest['splits']['val']['tokens']:,}).\n\n"
        + "\n".join(rows) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results[1:]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    shares = [r["weight"] for r in runs]
    ax.plot(shares, [r["stdlib"] for r in runs], "o-", label="stdlib (the original data)")
    ax.plot(shares, [r["topics"] for r in runs], "s-", label="topics (the new corpus)")
    ax.axhline(before["stdlib"], color="tab:blue", ls=":", label="stdlib before")
    ax.axhline(before["topics"], color="tab:orange", ls=":", label="topics before")
    ax.set_xlabel("the topics' share of the fine-tuning tokens")
    ax.set_ylabel("held-out bits per byte (whole split)")
    ax.set_title(f"After {MINUTES} min of fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    for r in runs:
        line, = ax_t.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], "-", label=f"{r['run']}: topics")
        if r["curve"] and r["curve"][0][2] is not None:
            ax_t.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], "--", color=line.get_color(),
                      label=f"{r['run']}: stdlib")
    ax_t.axhline(before["topics"], color="gray", ls=":", label="topics before")
    ax_t.set_xlabel("optimizer step")
    ax_t.set_ylabel("held-out bits per byte (in-training sample)")
    ax_t.set_title("During fine-tuning")
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(HERE / "mixture.png", dpi=100)
    print((HERE / "results.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only the table and plot, from results.jsonl")
    args = parser.parse_args()
    if args.report:
        results = [json.loads(x) for x in (HERE / "results.jsonl").read_text().splitlines() if x.strip()]
    else:
        results = run_all()
    report(results)


if __name__ == "__main__":
    main()
