#!/usr/bin/env python
"""The time-budget sweep: train each configuration of points.yaml for the same budget, and record
its held-out bits per byte against training minutes, its time to beat lzma -9e on the same text,
and its final whole-split figure (scripts/eval.py).

    python experiments/budget-sweep/sweep.py --speed full                  # every point not yet run
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python experiments/budget-sweep/sweep.py --speed third
    python experiments/budget-sweep/sweep.py --speed full --only s8k-128x4-adamw   # one point
    python experiments/budget-sweep/sweep.py --report                     # table and plot only

Each point is scripts/train.py on configs/train/default.yaml with the point's flags, the budget
(--minutes) and --eval_every from points.yaml, in runs/sweep/<speed>-<point>; the data folder of a
vocabulary size is built by scripts/tokenize.py when missing. One line per (speed, point) is
appended to results.jsonl (a point already there is skipped unless --again), and --report turns
results.jsonl into results.md (the table) and sweep.png (the curves).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

PY = sys.executable


def load_points() -> dict:
    import yaml

    spec = yaml.safe_load((HERE / "points.yaml").read_text())
    return spec


def data_dir(vocab: int) -> str:
    """The stdlib corpus tokenized with a `vocab`-piece BPE (the preset's other settings)."""
    return f"data/stdlib-{vocab // 1024}k"


def ensure_data(vocab: int) -> str:
    out = data_dir(vocab)
    if not (ROOT / out / "tokens" / "manifest.json").exists():
        subprocess.run([PY, "scripts/tokenize.py", "--config", "configs/tokenize/stdlib.yaml", "--out_dir", out,
                        "--tokenizer.vocab_size", str(vocab)], cwd=ROOT, check=True)
    return out


_lzma_cache: dict[str, float] = {}


def lzma_bpb(data: str) -> float:
    """lzma -9e bits per byte on the whole held-out text of `data` (as scripts/eval.py computes it)."""
    if data not in _lzma_cache:
        from lib.data.corpus import iter_records, read_manifest
        from lib.data.batches import tokens_dir
        from lib.model.evaluate import compressor_bpb

        tok = tokens_dir(ROOT / data)
        manifest = read_manifest(tok, "tokens")
        text = "".join(r["text"] for r in iter_records(tok / manifest["corpus_dir"], "val"))
        _lzma_cache[data] = compressor_bpb(text.encode("utf-8"))["lzma"]
    return _lzma_cache[data]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_point(name: str, point: dict, spec: dict, speed: str) -> dict:
    vocab = point.get("vocab", 16384)
    data = ensure_data(vocab)
    run = f"{speed}-{name}"
    args = [PY, "scripts/train.py", "--config", "configs/train/default.yaml", "--runs_dir", "runs/sweep",
            "--run_name", run, "--overwrite", "--data.dir", data, "--max_minutes", str(spec["minutes"]),
            "--eval_every", str(point.get("eval_every", spec["eval_every"])), "--checkpoint_every", "0",
            "--tracking.no_mlflow", *[str(a) for a in point.get("flags", [])]]
    print(f"[sweep] {run}: {' '.join(args[2:])}", flush=True)
    t0 = time.time()
    log = ROOT / "runs" / "sweep" / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # compiled kernels are not reused between points: each pays compilation as a fresh clone does
    with open(log, "w") as out, tempfile.TemporaryDirectory() as kernels:
        proc = subprocess.run(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": kernels})
    wall = time.time() - t0
    run_dir = ROOT / "runs" / "sweep" / run
    if proc.returncode != 0:
        print(f"[sweep] {run} failed (exit {proc.returncode}); see {log}", flush=True)
        return {"speed": speed, "point": name, "failed": proc.returncode, "wall_s": wall}
    records = read_jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    trains = [r for r in records if r["type"] == "train"]
    lz = lzma_bpb(data)
    curve = [(r["elapsed_s"] / 60, r["val_bits_per_byte"]) for r in evals]
    beat = next((m for m, b in curve if b < lz), None)
    whole = subprocess.run([PY, "scripts/eval.py", "--model", str(run_dir), "--samples", "0", "--no_tracking"],
                           cwd=ROOT, capture_output=True, text=True)
    whole_bpb = next((float(line.split()[1]) for line in whole.stdout.splitlines()
                      if line.strip().startswith("bits/byte")), None)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    tps = [r["tokens_per_s"] for r in trains[len(trains) // 4:]]  # past compilation
    result = {"speed": speed, "point": name, "vocab": vocab, "flags": point.get("flags", []),
              "params": provenance.get("n_params"), "steps": trains[-1]["step"], "tokens": trains[-1]["tokens_seen"],
              "tokens_per_s": sorted(tps)[len(tps) // 2] if tps else None,
              "precision": provenance.get("mixed_precision"), "minutes": spec["minutes"], "lzma": lz,
              "time_to_lzma_min": beat, "final_in_training": curve[-1][1] if curve else None,
              "final_whole_split": whole_bpb, "curve": curve, "wall_s": round(wall, 1),
              "isa": os.environ.get("ONEDNN_MAX_CPU_ISA"), "date": time.strftime("%Y-%m-%d")}
    print(f"[sweep] {run}: {result['steps']} steps, {result['tokens']:,} tokens, {result['tokens_per_s']:,.0f} tok/s; "
          f"lzma {lz:.4f}; beaten at {beat if beat is None else round(beat, 2)} min; final {result['final_in_training']:.4f} "
          f"(whole split {whole_bpb}); {wall / 60:.1f} min wall", flush=True)
    return result


def seed_groups(latest: dict) -> dict:
    """(speed, configuration) -> its runs, for configurations run with several seeds: a point
    named `<configuration>-s<N>` is `<configuration>` with --seed N."""
    import re

    groups: dict = {}
    for (speed, name), r in latest.items():
        if r.get("final_whole_split"):
            groups.setdefault((speed, re.sub(r"-s\d+$", "", name)), []).append(r)
    return {k: sorted(v, key=lambda r: r["point"]) for k, v in groups.items() if len(v) > 1}


def mean_of(runs: list[dict]) -> float:
    return sum(r["final_whole_split"] for r in runs) / len(runs)


def report(results: list[dict], points: dict) -> None:
    latest = {}
    for r in results:
        if not r.get("failed"):
            latest[(r["speed"], r["point"])] = r
    speeds = sorted({s for s, _ in latest}, key=lambda s: (s != "full", s))
    lines = ["| speed | point | vocab | params | tok/s | steps | tokens | min to lzma | final (in training) | "
             "whole split | lzma |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for speed in speeds:
        rows = sorted((r for (s, _), r in latest.items() if s == speed),
                      key=lambda r: r["final_whole_split"] or r["final_in_training"] or 9)
        for r in rows:
            beat = f"{r['time_to_lzma_min']:.1f}" if r["time_to_lzma_min"] is not None else "never"
            whole = f"{r['final_whole_split']:.4f}" if r["final_whole_split"] else "-"
            lines.append(f"| {speed} | {r['point']} | {r['vocab'] // 1024}k | {r['params'] / 1e6:.2f}M | "
                         f"{r['tokens_per_s']:,.0f} | {r['steps']:,} | {r['tokens'] / 1e6:.2f}M | {beat} | "
                         f"{r['final_in_training']:.4f} | {whole} | {r['lzma']:.4f} |")
    seeded = seed_groups(latest)
    if seeded:
        lines += ["", "Points run with more than one seed (`-s1`: --seed 1): a difference between two configurations "
                  "smaller than their spread decides nothing.", "",
                  "| speed | configuration | seeds | whole split, each | mean | spread | min to lzma, each |",
                  "|---|---|---|---|---|---|---|"]
        for (speed, config), runs in sorted(seeded.items(), key=lambda kv: (kv[0][0] != "full", mean_of(kv[1]))):
            each = [r["final_whole_split"] for r in runs]
            lzma = ", ".join(f"{m:.2f}" if m else "never" for m in (r["time_to_lzma_min"] for r in runs))
            lines.append(f"| {speed} | {config} | {len(runs)} | {', '.join(f'{b:.4f}' for b in each)} | "
                         f"{mean_of(runs):.4f} | {max(each) - min(each):.4f} | {lzma} |")
    for speed in speeds:
        unrun = [name for name in points if (speed, name) not in latest]
        if unrun:
            lines.append(f"\nNot run at {speed} speed: {', '.join(unrun)}.")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(latest, speeds, HERE / "sweep.png")
    # the own model's options (#36) on their own, where they can be told apart
    own = {k: r for k, r in latest.items() if k[1].startswith("g4k-")}
    if own:
        plot(own, [s for s in speeds if any(k[0] == s for k in own)], HERE / "sweep-own-model.png", ylim=(1.0, 1.8))


def plot(latest: dict, speeds: list[str], path: Path, ylim=(1.0, 2.4)) -> None:
    """Held-out bits per byte against training minutes, a panel per speed, for `latest`'s points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(speeds) or 1, figsize=(7 * max(len(speeds), 1), 5), squeeze=False)
    for ax, speed in zip(axes[0], speeds):
        rows = [r for (s, _), r in latest.items() if s == speed]
        for r in sorted(rows, key=lambda r: r["final_in_training"]):
            xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
            ax.plot(xs, ys, marker=".", label=f"{r['point']} ({r['final_in_training']:.3f})")
        if rows:
            ax.axhline(rows[0]["lzma"], color="black", linestyle="--", label=f"lzma -9e ({rows[0]['lzma']:.3f})")
        ax.set_ylim(*ylim)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("held-out bits per byte (in-training sample)")
        ax.set_title(f"speed: {speed}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", help="label of this machine's speed: full, or third (fp32-only oneDNN)")
    ap.add_argument("--only", default="", help="comma-separated point names (default: all)")
    ap.add_argument("--again", action="store_true", help="rerun points already in results.jsonl")
    ap.add_argument("--report", action="store_true", help="only write results.md and the plots (sweep.png, sweep-own-model.png)")
    a = ap.parse_args()
    spec = load_points()
    points = spec["points"]
    out = HERE / "results.jsonl"
    results = read_jsonl(out) if out.exists() else []
    if not a.report:
        if not a.speed:
            ap.error("--speed is required to run points")
        done = {(r["speed"], r["point"]) for r in results if not r.get("failed")}
        names = [n for n in (a.only.split(",") if a.only else points) if n]
        unknown = [n for n in names if n not in points]
        if unknown:
            ap.error(f"no such point(s) in points.yaml: {', '.join(unknown)}")
        for name in names:
            if (a.speed, name) in done and not a.again:
                continue
            result = run_point(name, points[name], spec, a.speed)
            results.append(result)
            with open(out, "a") as f:
                f.write(json.dumps(result) + "\n")
    report(results, points)


if __name__ == "__main__":
    main()
