#!/usr/bin/env python
"""Benchmark `scripts/tokenize.py encode`: throughput against a Hugging Face fast tokenizer of the
same vocabulary, and peak memory while streaming a corpus far larger than that memory.

    python scripts/bench_tokenize.py                  # both parts (make bench)
    python scripts/bench_tokenize.py --gen_gb 0.2     # a smaller generated corpus

1. Throughput, on the built-in corpus (data/stdlib, every split): `tokenize.py encode` run as a
   subprocess (its own figure, which leaves out interpreter start-up), writing each output format
   (a .npy token stream, and JSONL with attention masks), against the baseline, the dataset's
   Hugging Face tokenizer (transformers, Rust, every core) called in-process on the same texts in
   batches, I/O left out: a conservative ratio. Rounds alternate between the three; medians are
   compared. The ids of all must be identical.
2. Memory, on a generated JSONL corpus of --gen_gb GB (stdlib files with a new identifier per
   document, so the word cache keeps meeting new words): the resident memory of the encode
   process and its workers, sampled twice a second, must stay flat. Plotted to OUT/encode_memory.png.
"""
import os
import sys

_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

TOKENIZE = Path(_root) / "scripts" / "tokenize.py"


@dataclass
class BenchConfig:
    """Tokenizer encoding benchmark."""

    data: Path = Path("data/stdlib")
    """A folder written by scripts/tokenize.py: its corpus is encoded with its tokenizer."""
    out_dir: Path = Path("runs/bench")
    rounds: int = 5
    """Throughput rounds per side (the machines are noisy: medians of several)."""
    gen_gb: float = 2.0
    """Size of the generated corpus for the memory part (0: skip it)."""
    keep_generated: bool = False
    """Keep the generated corpus (in out_dir) for the next run instead of deleting it."""


def run_encode(tokenizer: Path, src: Path, out: Path, *extra: str, sample_memory: bool = False):
    """Run tokenize.py encode; return (its log line, [(seconds, rss bytes of the process tree)])."""
    import psutil

    cmd = [sys.executable, str(TOKENIZE), "encode", "--tokenizer", str(tokenizer), "--input", str(src),
           "--output", str(out), *extra]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples, t0 = [], time.perf_counter()
    if sample_memory:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                samples.append((time.perf_counter() - t0, rss))
            except psutil.Error:
                pass
            time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise UserError(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    line = [x for x in stdout.splitlines() if "encoded" in x][-1]
    return line, samples


def parse_rate(line: str) -> tuple[float, float, float]:
    """(MB/s, tokens/s, seconds) from tokenize.py encode's summary line."""
    m = re.search(r"in ([\d.]+)s \(([\d.]+) MB/s, ([\d,]+) tokens/s", line)
    return float(m.group(2)), float(m.group(3).replace(",", "")), float(m.group(1))


def throughput(cfg: BenchConfig) -> dict:
    from transformers import AutoTokenizer

    from lib.data.corpus import iter_records, read_manifest

    corpus_dir, tok_dir = cfg.data / "corpus", cfg.data / "tokenizer"
    splits = list(read_manifest(corpus_dir, "corpus")["splits"])
    texts = [r["text"] for split in splits for r in iter_records(corpus_dir, split)]
    src = cfg.out_dir / "builtin.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"[bench] built-in corpus: {len(texts)} documents, {mb:.2f} MB ({', '.join(splits)})", flush=True)

    import numpy as np

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    formats = {"npy": cfg.out_dir / "builtin.ids.npy", "jsonl": cfg.out_dir / "builtin.ids.jsonl"}
    ours, theirs, hf_ids = {k: [] for k in formats}, [], None
    for r in range(cfg.rounds):
        for out in formats.values():  # the two output formats, then the baseline
            line, _ = run_encode(tok_dir / "sp.model", src, out)
            ours[out.suffix[1:]].append(parse_rate(line))
        t = time.perf_counter()
        hf_ids = []
        for i in range(0, len(texts), 1024):
            hf_ids += hf(texts[i : i + 1024], add_special_tokens=False)["input_ids"]
        secs = time.perf_counter() - t
        theirs.append((mb / secs, sum(map(len, hf_ids)) / secs, secs))
        print(f"[bench] round {r + 1}: tokenize.py encode -> .npy {ours['npy'][-1][0]:.2f} MB/s, -> .jsonl "
              f"{ours['jsonl'][-1][0]:.2f} MB/s | HF fast tokenizer {theirs[-1][0]:.2f} MB/s", flush=True)
    with open(formats["jsonl"], encoding="utf-8") as f:
        jsonl_ids = [json.loads(line)["ids"][1:] for line in f]  # drop the bos encode adds
    flat, docs = np.load(formats["npy"]), np.load(formats["npy"].with_suffix(".docs.npy"))
    ends = np.cumsum(docs[:, 0])
    npy_ids = [flat[e - n + 1 : e].tolist() for e, n in zip(ends.tolist(), docs[:, 0].tolist())]
    identical = {"jsonl": jsonl_ids == hf_ids, "npy": npy_ids == hf_ids}
    # the same command with the Hugging Face tokenizer folder: one tool, only the tokenizer differs
    line, _ = run_encode(tok_dir, src, cfg.out_dir / "builtin.hf.ids.jsonl")
    cli_hf = parse_rate(line)
    (cfg.out_dir / "builtin.hf.ids.jsonl").unlink()
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    res = {"corpus_mb": mb, "hf_mb_s": med(theirs, 0), "hf_tok_s": med(theirs, 1), "cli_hf_mb_s": cli_hf[0],
           "cores": os.cpu_count(), "rounds": cfg.rounds}
    for k in formats:
        res[k] = {"mb_s": med(ours[k], 0), "tok_s": med(ours[k], 1), "ratio": med(ours[k], 0) / res["hf_mb_s"],
                  "identical_ids": identical[k]}
    print(f"[bench] baseline, HF fast tokenizer in-process, no I/O: {res['hf_mb_s']:.2f} MB/s, "
          f"{res['hf_tok_s']:,.0f} tokens/s (median of {cfg.rounds})")
    for k, what in (("npy", ".npy token stream + .docs.npy"), ("jsonl", "JSONL ids + attention_mask")):
        print(f"[bench] tokenize.py encode -> {what} (SentencePiece, word cache, {os.cpu_count()} processes): "
              f"{res[k]['mb_s']:.2f} MB/s, {res[k]['tok_s']:,.0f} tokens/s: {res[k]['ratio']:.2f}x the baseline "
              f"(target >= 3x); ids identical: {identical[k]}")
    print(f"[bench] (tokenize.py encode given the HF tokenizer folder instead: {cli_hf[0]:.2f} MB/s)", flush=True)
    for out in formats.values():
        out.unlink()
    formats["npy"].with_suffix(".docs.npy").unlink()
    src.unlink()
    return res


def generate_corpus(cfg: BenchConfig, path: Path) -> None:
    """--gen_gb GB of JSONL documents: stdlib files cycled, each with its own identifier in place
    of `self`, so the text keeps bringing new words."""
    import random

    from lib.data.corpus import iter_records

    stamp = path.with_suffix(".stamp")
    want = f"{cfg.gen_gb}:v1"
    if path.is_file() and stamp.is_file() and stamp.read_text() == want:
        print(f"[bench] reusing {path}")
        return
    texts = [r["text"] for r in iter_records(cfg.data / "corpus", "train")]
    rng = random.Random(0)
    target, written, t0 = int(cfg.gen_gb * 1e9), 0, time.perf_counter()
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            text = rng.choice(texts).replace("self", f"self_{rng.getrandbits(24):06x}")
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line)
    stamp.write_text(want)
    print(f"[bench] generated {written / 1e9:.2f} GB in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)


def memory(cfg: BenchConfig) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    src = cfg.out_dir / "generated.jsonl"
    generate_corpus(cfg, src)
    out = cfg.out_dir / "generated.ids.jsonl"
    print(f"[bench] encoding {src.stat().st_size / 1e9:.2f} GB while sampling memory ...", flush=True)
    try:
        line, samples = run_encode(cfg.data / "tokenizer" / "sp.model", src, out, sample_memory=True)
    finally:
        out.unlink(missing_ok=True)
        if not cfg.keep_generated:
            src.unlink(missing_ok=True)
            src.with_suffix(".stamp").unlink(missing_ok=True)
    rate = parse_rate(line)
    secs = [s for s, _ in samples]
    rss = [r / 2**20 for _, r in samples]
    n = len(rss)
    first, last = max(rss[: max(1, n // 5)]), max(rss[-max(1, n // 5):])
    res = {"gb": src.stat().st_size / 1e9 if src.exists() else cfg.gen_gb, "mb_s": rate[0], "tok_s": rate[1],
           "peak_rss_mib": max(rss), "peak_first_fifth_mib": first, "peak_last_fifth_mib": last}
    print(f"[bench] streamed {cfg.gen_gb:.2f} GB at {rate[0]:.2f} MB/s, {rate[1]:,.0f} tokens/s")
    print(f"[bench] resident memory (encode + workers): peak {max(rss):.0f} MiB; peak in the first fifth "
          f"{first:.0f} MiB, in the last fifth {last:.0f} MiB (growth {last / first - 1:+.1%})")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(secs, rss)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory, MiB")
    ax.set_ylim(0, max(rss) * 1.2)
    ax.set_title(f"tokenize.py encode on {cfg.gen_gb:g} GB of JSONL: resident memory (all processes)")
    fig.tight_layout()
    fig.savefig(cfg.out_dir / "encode_memory.png", dpi=110)
    print(f"[bench] plot -> {cfg.out_dir / 'encode_memory.png'}", flush=True)
    return res


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(BenchConfig, description=__doc__)
    if not (cfg.data / "tokenizer" / "sp.model").is_file():
        raise UserError(f"{cfg.data} has no tokenizer: run `make tokenize` first")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    results = {"throughput": throughput(cfg)}
    if cfg.gen_gb > 0:
        results["memory"] = memory(cfg)
    (cfg.out_dir / "tokenize.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"[bench] results -> {cfg.out_dir / 'tokenize.json'}")


if __name__ == "__main__":
    main()
