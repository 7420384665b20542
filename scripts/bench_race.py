#!/usr/bin/env python
"""A quality race at equal wall time: the default run against litgpt's pretrain and transformers.Trainer.

    make race                                   # part of make bench; puts litgpt in .venv-litgpt first
    python scripts/bench_race.py --only ours,trainer_tuned

Every entrant trains for the same wall time (the preset's budget, 9 minutes) on the same token
data of the same tokenizer, at the same shape and tokens per step, and is scored by eval.py on
the same held-out bytes (the whole split). The default preset runs first, exactly as `make train`
runs it; the shape it was sized to on this machine, its sequences per step and the precision it
chose are then given to the peers, each a Llama of that shape:

  ours            scripts/train.py --config configs/train/default.yaml
  litgpt_recipe   litgpt's pretrain at its TinyStories recipe (config_hub/pretrain/tinystories.yaml:
                  AdamW 5e-4, weight decay 0.1, betas 0.9/0.95, 1000 warmup steps, cosine to 0), compiled
  litgpt_tuned    the same at 3e-3, 30 warmup steps, cosine to 10%
  trainer_recipe  transformers.Trainer at the settings of the run_clm example (AdamW 5e-5, linear decay)
  trainer_tuned   Trainer set carefully: AdamW 3e-3, weight decay 0.1, betas 0.9/0.95, 30 warmup steps, cosine

The peers have no time budget of their own (litgpt accepts --train.max_time and ignores it), so
each first trains --timing_steps steps to measure its step time, its start-up (compile) and the
cost of one evaluation, and then trains the number of steps that fills the budget; the table
shows the wall time each one took. During training every entrant scores the same held-out
windows (the 32,768-token sample train.py evaluates) every 100 steps: race.png plots those bits
per byte against wall time. The peers train on the packed blocks train.py cuts (seq_len + 1
tokens, stride seq_len), shuffled once with a fixed seed; they attend across documents, as their
users' runs do.

Out: runs/bench/race/race.json, race.png, and each entrant's folder (its final model, curve.jsonl,
eval/). litgpt lives in a venv of its own (.venv-litgpt, `make litgpt`): it pins huggingface-hub
below what this venv's transformers needs.
"""
import os
import sys

_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import numpy as np  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402

ROOT = Path(_root)
ENTRANTS = ("ours", "litgpt_recipe", "litgpt_tuned", "trainer_recipe", "trainer_tuned")
# each peer's optimizer settings (AdamW throughout); warmup in optimizer steps
RECIPES = {
    "litgpt_recipe": dict(lr=5e-4, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=1000, min_lr=0.0,
                          schedule="cosine"),
    "litgpt_tuned": dict(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=30, min_lr=3e-4,
                         schedule="cosine"),
    "trainer_recipe": dict(lr=5e-5, weight_decay=0.0, betas=[0.9, 0.999], warmup_steps=0, schedule="linear"),
    "trainer_tuned": dict(lr=3e-3, weight_decay=0.1, betas=[0.9, 0.95], warmup_steps=30, schedule="cosine"),
}


@dataclass
class RaceConfig:
    """Quality at equal wall time against litgpt's pretrain and transformers.Trainer."""

    preset: Path = Path("configs/train/default.yaml")
    """The entrant `ours` trains; its sized shape, batch and precision are the peers' too."""
    data_dir: Optional[Path] = None
    """A tokenized dataset instead of the preset's (every entrant trains and is scored on it)."""
    out_dir: Path = Path("runs/bench/race")
    only: Optional[str] = None
    """Comma-separated entrants to run (ours, litgpt_recipe, litgpt_tuned, trainer_recipe,
    trainer_tuned). Left out, `ours` is the run already in OUT_DIR/ours (an earlier race's, or a
    run of the preset copied there), when there is one. Default: all."""
    litgpt_python: Path = Path(".venv-litgpt/bin/python")
    """The interpreter of litgpt's venv (`make litgpt` makes it)."""
    minutes: Optional[float] = None
    """The budget of every entrant; default: the preset's max_minutes (a shorter one for a trial;
    the preset's shape is still sized for its own budget, through the run's --max_minutes)."""
    timing_steps: int = 40
    """Steps of each peer's timing run (its first 10 hold the start-up and are not averaged)."""
    eval_every: int = 100
    """Steps between the curve's held-out scores, for every entrant (train.py's default preset too)."""
    worker: Optional[str] = None
    """Internal: run one Trainer entrant from a spec file in this process."""
    spec: Optional[Path] = None
    """Internal: the worker's spec file."""


def run(cmd: list, what: str, log: Path, env: dict | None = None) -> None:
    """Run `cmd`, its output into `log` (and its last lines into the error when it fails)."""
    with log.open("w") as fh:
        proc = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise UserError(f"{what} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


def whole_split(model: Path, out: Path, extra: tuple = ()) -> dict:
    """eval.py's whole-split record of `model` (a run folder, or a model folder with --data):
    bits_per_byte, lzma_bits_per_byte on the same text, ..."""
    run([sys.executable, ROOT / "scripts" / "eval.py", "--model", model, "--samples", "0", "--out_dir", out, *extra],
        f"eval.py on {model}", out.parent / f"{out.name}.log")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return rows[-1]


def figures(record: dict) -> dict:
    return {"bits_per_byte": record["bits_per_byte"], "lzma_bits_per_byte": record["lzma_bits_per_byte"]}


def run_ours(cfg: RaceConfig, folder: Path) -> dict:
    run([sys.executable, ROOT / "scripts" / "train.py", "--config", cfg.preset, "--runs_dir", folder.parent,
         "--run_name", folder.name, "--overwrite", "--eval_every", cfg.eval_every, "--tracking.no_mlflow",
         *(["--max_minutes", cfg.minutes] if cfg.minutes else []), *(["--data.dir", cfg.data_dir] if cfg.data_dir else [])],
        "scripts/train.py (ours)", folder.parent / "ours-train.log")
    return summarize_ours(folder)


def summarize_ours(folder: Path) -> dict:
    """Ours' figures from its run folder: the curve of its evaluations, its rate, its whole split."""
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x.strip()]
    curve = [{"elapsed_s": r["elapsed_s"], "step": r["step"], "val_bits_per_byte": r["val_bits_per_byte"]}
             for r in rows if r["type"] == "eval"]
    train = [r for r in rows if r["type"] == "train"]
    # the training rate as for the peers: the median over the log's intervals (an interval holding
    # an evaluation, or the start-up, is an outlier the median leaves out)
    return {"curve": curve, "steps": train[-1]["step"], "train_s": train[-1]["elapsed_s"],
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train])),
            **figures(whole_split(folder, folder / "race-eval"))}


def shared_inputs(cfg: RaceConfig, ours: Path) -> dict:
    """What every peer gets: ours' shape, batch and precision; the training blocks, shuffled once;
    the held-out windows train.py scored (the same sample), and their bytes."""
    from lib.data.batches import load_shards, load_split, tokens_dir
    from lib.data.corpus import read_manifest
    from lib.model.evaluate import held_out_sample, token_byte_lengths

    tc = config_lib.load_yaml(ours / "config.yaml")
    tok_dir = tokens_dir(Path(tc["data"]["dir"]))
    manifest = read_manifest(tok_dir, "tokens")
    seq_len = tc["data"]["seq_len"]
    m = tc["model"]
    if m["logit_softcap"] or m["mlp"] != "swiglu" or m["n_kv_heads"] not in (None, m["n_heads"]):
        raise UserError(f"{ours}: the race's peers are Llamas; this run's model options have no Llama counterpart")
    from lib.model.build import ModelConfig, _d_ff

    d_ff = _d_ff(ModelConfig(arch="llama", d_model=m["d_model"], d_ff=m["d_ff"]))
    shape = {"vocab_size": manifest["vocab_size"], "d_model": m["d_model"], "n_layers": m["n_layers"],
             "n_heads": m["n_heads"], "n_kv_heads": m["n_kv_heads"] or m["n_heads"], "d_ff": d_ff,
             "tie_embeddings": m["tie_embeddings"], "rope_theta": m["rope_theta"], "norm_eps": 1e-5,
             "qk_norm_in_ours": m.get("qk_norm", False)}
    shared = cfg.out_dir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate(load_shards(tok_dir, "train"))
    n = (len(tokens) - 1) // seq_len
    blocks = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:n]
    order = np.random.default_rng(0).permutation(n)
    np.save(shared / "train_blocks.npy", np.ascontiguousarray(blocks[order]).astype(np.uint16))
    val_tokens, val_docs = load_split(tok_dir, "val")
    tokenizer = (tok_dir / manifest["tokenizer_dir"]).resolve()
    sample = held_out_sample(val_tokens, val_docs, seq_len, tc["eval_tokens"], token_byte_lengths(tokenizer), seed=0)
    np.save(shared / "eval_inputs.npy", sample.inputs)
    np.save(shared / "eval_targets.npy", sample.targets)
    precision = json.loads((ours / "provenance.json").read_text())["mixed_precision"]
    return {"shape": shape, "seq_len": seq_len, "micro_batch_size": tc["micro_batch_size"] * tc["grad_accum_steps"],
            "bf16": precision == "bf16", "litgpt_precision": "bf16-mixed" if precision == "bf16" else "32-true",
            "train_blocks": str(shared / "train_blocks.npy"), "eval_inputs": str(shared / "eval_inputs.npy"),
            "eval_targets": str(shared / "eval_targets.npy"), "eval_bytes": sample.text_bytes,
            "eval_every": cfg.eval_every, "seed": 0, "budget_s": 60 * tc["max_minutes"],
            "data_dir": str(tc["data"]["dir"]), "tokenizer": str(tokenizer), "blocks": int(n),
            "special": manifest["special_ids"]}


def llama_config(shape: dict, special: dict):
    """transformers' LlamaConfig of the race's `shape`, with the dataset's special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["d_model"], intermediate_size=shape["d_ff"],
                       num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                       num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=512,
                       rms_norm_eps=shape["norm_eps"], rope_theta=shape["rope_theta"],
                       tie_word_embeddings=shape["tie_embeddings"], bos_token_id=special.get("bos"),
                       eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))


def llama_folder(shape: dict, state: dict, tokenizer: Path, special: dict, out: Path):
    """A transformers Llama folder of `shape` holding `state` (transformers' names), with the tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from lib.data.tokenizer import copy_tokenizer_files

    model = LlamaForCausalLM(llama_config(shape, special))
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and shape["tie_embeddings"])]
    if missing or unexpected:
        raise UserError(f"the converted weights do not fit a Llama: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if shape["tie_embeddings"]:
        model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_tokenizer_files(tokenizer, out)
    return model.eval().to(torch.float32)


def peer_steps(timing: dict, budget_s: float, eval_every: int) -> tuple[int, dict]:
    """Steps that fill `budget_s`: the start-up (the first 10 steps' excess over the steady step
    time), then steps at the steady time, each eval_every-th followed by one evaluation."""
    starts = timing["step_starts"]
    step_s = float(np.median(np.diff(starts[10:])))
    startup = (starts[10] - timing["t0"]) - 10 * step_s
    per_step = step_s + timing["eval_s"] / eval_every
    return max(1, int((budget_s - startup) / per_step)), {"step_s": step_s, "startup_s": startup,
                                                          "eval_s": timing["eval_s"]}


def trainer_worker(spec_path: Path) -> None:
    """One transformers.Trainer entrant (or its timing run) from a spec: writes curve.jsonl,
    result.json and final/ in the spec's out_dir."""
    import torch
    from transformers import LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    spec = json.loads(spec_path.read_text())
    out, shape, opt = Path(spec["out_dir"]), spec["shape"], spec["optimizer"]
    blocks = np.load(spec["train_blocks"], mmap_mode="r")
    eval_inputs = torch.from_numpy(np.load(spec["eval_inputs"]).astype(np.int64))
    eval_targets = torch.from_numpy(np.load(spec["eval_targets"]).astype(np.int64))
    batch = spec["micro_batch_size"]

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            row = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": row, "labels": row}  # the model shifts the labels: seq_len targets a row

    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(llama_config(shape, spec["special"]))
    clock = {"starts": [], "eval_s": 0.0}
    curve = (out / "curve.jsonl").open("w")

    @torch.no_grad()
    def score() -> float:
        model.eval()
        nats = 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["bf16"]):
            for k in range(0, len(eval_inputs), batch):
                logits = model(eval_inputs[k:k + batch]).logits.float()
                nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), eval_targets[k:k + batch].flatten(),
                                                                ignore_index=-100, reduction="sum"))
        model.train()
        return nats / math.log(2) / spec["eval_bytes"]

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock["t0"] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            clock["starts"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % spec["eval_every"] == 0 or (spec.get("timing") and state.global_step == 12):
                t = time.perf_counter()
                bpb = score()
                clock["eval_s"] = time.perf_counter() - t
                curve.write(json.dumps({"elapsed_s": time.perf_counter() - clock["t0"], "step": state.global_step,
                                        "val_bits_per_byte": bpb}) + "\n")
                curve.flush()

    args = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=spec["steps"], per_device_train_batch_size=batch,
        learning_rate=opt["lr"], weight_decay=opt["weight_decay"], adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1], warmup_steps=opt["warmup_steps"], lr_scheduler_type=opt["schedule"],
        max_grad_norm=1.0, bf16=spec["bf16"], use_cpu=True, save_strategy="no", report_to=[],
        logging_steps=spec["eval_every"], seed=spec["seed"], disable_tqdm=True, dataloader_drop_last=True)
    trainer = Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()])
    trainer.train()
    train_s = time.perf_counter() - clock["t0"]
    curve.close()
    step_s = float(np.median(np.diff(clock["starts"][10:])))
    result = {"steps": spec["steps"], "train_s": train_s, "t0": clock["t0"], "step_starts": clock["starts"],
              "eval_s": clock["eval_s"], "tokens_per_s": batch * spec["seq_len"] / step_s}
    if not spec.get("timing"):
        trainer.save_model(str(out / "final"))
    (out / "result.json").write_text(json.dumps(result) + "\n")


def run_peer(cfg: RaceConfig, name: str, shared: dict) -> dict:
    """A peer's timing run, then its race run, then eval.py on its final model."""
    folder = cfg.out_dir / name
    if folder.exists():
        shutil.rmtree(folder)
    litgpt = name.startswith("litgpt")
    if litgpt and not cfg.litgpt_python.is_file():
        raise UserError(f"{cfg.litgpt_python} is missing: `make litgpt` makes litgpt's venv")

    def go(steps: int, sub: Path, timing: bool) -> dict:
        sub.mkdir(parents=True, exist_ok=True)
        spec = {**shared, "steps": steps, "out_dir": str(sub), "optimizer": RECIPES[name], "timing": timing}
        (sub / "spec.json").write_text(json.dumps(spec, indent=1) + "\n")
        if litgpt:
            run([cfg.litgpt_python, ROOT / "scripts" / "bench_race_litgpt.py", sub / "spec.json"], f"litgpt ({name})",
                sub / "run.log")
        else:
            run([sys.executable, __file__, "--worker", name, "--spec", sub / "spec.json"], f"Trainer ({name})",
                sub / "run.log")
        return json.loads((sub / "result.json").read_text())

    timing = go(cfg.timing_steps, folder / "timing", True)
    steps, how = peer_steps(timing, shared["budget_s"], cfg.eval_every)
    print(f"[race] {name}: step {how['step_s'] * 1e3:.0f} ms, start-up {how['startup_s']:.0f} s, an evaluation "
          f"{how['eval_s']:.1f} s -> {steps} steps in the {shared['budget_s'] / 60:g}-minute budget", flush=True)
    result = go(steps, folder, False)
    import torch

    if litgpt:
        state = torch.load(folder / "hf_model.pth", map_location="cpu", weights_only=True)
        model = llama_folder(shared["shape"], state, Path(shared["tokenizer"]), shared["special"], folder / "final")
        # litgpt's converter checked: the Llama's logits on a held-out window against litgpt's own
        x = torch.from_numpy(np.load(shared["eval_inputs"])[:1].astype(np.int64))
        with torch.no_grad():
            gap = float((model(x).logits - torch.from_numpy(np.load(folder / "check_logits.npy"))).abs().max())
        if gap > 1e-3:
            raise UserError(f"{name}: the converted Llama's logits differ from litgpt's by {gap:.2g}")
        result["conversion_gap"] = gap
    else:
        from lib.data.tokenizer import copy_tokenizer_files

        copy_tokenizer_files(shared["tokenizer"], folder / "final")
    curve = [json.loads(x) for x in (folder / "curve.jsonl").read_text().splitlines() if x.strip()]
    return {**{k: v for k, v in result.items() if k not in ("step_starts", "t0")}, "curve": curve,
            **figures(whole_split(folder / "final", folder / "eval",
                                  ("--data", shared["data_dir"], "--seq_len", str(shared["seq_len"]),
                                   "--precision", "bf16" if shared["bf16"] else "fp32")))}


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(RaceConfig, description=__doc__)
    if cfg.worker:
        return trainer_worker(cfg.spec)
    names = ENTRANTS if cfg.only is None else tuple(x.strip() for x in cfg.only.split(",") if x.strip())
    unknown = [x for x in names if x not in ENTRANTS]
    if unknown:
        raise UserError(f"--only: unknown entrant {unknown[0]!r}; choose from {', '.join(ENTRANTS)}")
    if any(x.startswith("litgpt") for x in names) and not cfg.litgpt_python.is_file():
        raise UserError(f"{cfg.litgpt_python} is missing: `make litgpt` makes litgpt's venv")
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    saved = cfg.out_dir / "race.json"
    results = json.loads(saved.read_text())["results"] if saved.is_file() else {}
    ours = cfg.out_dir / "ours"
    if "ours" in names or not (ours / "config.yaml").is_file():
        print("[race] ours: the default preset, as make train runs it", flush=True)
        t = time.perf_counter()
        results["ours"] = run_ours(cfg, ours)
        print(f"[race] ours: {results['ours']['bits_per_byte']:.4f} bits per byte ({time.perf_counter() - t:.0f} s)",
              flush=True)
    elif "ours" not in results:  # a run of the preset copied here (a fresh clone's make train, say)
        results["ours"] = summarize_ours(ours)
    shared = shared_inputs(cfg, ours)
    print(f"[race] the peers' shape: {shared['shape']['n_layers']} x {shared['shape']['d_model']}, "
          f"{shared['micro_batch_size']} x {shared['seq_len']} tokens a step, "
          f"{'bf16' if shared['bf16'] else 'fp32'} (as ours ran)", flush=True)
    for name in names:
        if name == "ours":
            continue
        t = time.perf_counter()
        results[name] = run_peer(cfg, name, shared)
        saved.write_text(json.dumps({"shared": shared, "results": results}, indent=1) + "\n")  # kept if a later one fails
        print(f"[race] {name}: {results[name]['bits_per_byte']:.4f} bits per byte "
              f"({results[name]['train_s'] / 60:.1f} min of training, {time.perf_counter() - t:.0f} s in all)",
              flush=True)
    saved.write_text(json.dumps({"shared": shared, "results": results}, indent=1) + "\n")
    report(results, shared, cfg.out_dir)


def report(results: dict, shared: dict, out: Path) -> None:
    """The table, the ratio the goal names, and race.png."""
    print(f"\n[race] {'entrant':<15} {'bits/byte':>9} {'train min':>9} {'steps':>6} {'tokens/s':>9}")
    for name in ENTRANTS:
        if name in results:
            r = results[name]
            print(f"[race] {name:<15} {r['bits_per_byte']:9.4f} {r['train_s'] / 60:9.2f} {r['steps']:6d} "
                  f"{r['tokens_per_s']:9,.0f}")
    peers = {k: v for k, v in results.items() if k != "ours"}
    if "ours" in results and peers:
        best = min(peers, key=lambda k: peers[k]["bits_per_byte"])
        lower = 1 - results["ours"]["bits_per_byte"] / peers[best]["bits_per_byte"]
        print(f"[race] ours is {lower:.1%} lower in bits per byte than the best peer setting ({best}, "
              f"{peers[best]['bits_per_byte']:.4f}); goal: at least 40% lower: {'met' if lower >= 0.4 else 'NOT met'}")
        for name in ("litgpt_tuned", "trainer_tuned"):
            if name in results:
                print(f"[race] tokens/s ours / {name}: {results['ours']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x "
                      f"(same shape and tokens a step)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"ours": "tab:green", "litgpt_recipe": "tab:purple", "litgpt_tuned": "tab:blue",
              "trainer_recipe": "tab:orange", "trainer_tuned": "tab:red"}
    for name, r in results.items():
        pts = [(p["elapsed_s"] / 60, p["val_bits_per_byte"]) for p in r["curve"]]
        if pts:
            ax.plot(*zip(*pts), color=colors.get(name), lw=1.5 if name == "ours" else 1,
                    label=f"{name}: {r['bits_per_byte']:.4f} whole split")
    lzma = next(iter(results.values()))["lzma_bits_per_byte"]
    ax.axhline(lzma, color="gray", ls=":", lw=1, label=f"lzma -9e on the same text: {lzma:.4f}")
    ax.set_xlabel("wall time since training started (minutes)")
    ax.set_ylabel("held-out bits per byte (the 32,768-token sample)")
    ax.set_ylim(top=3.0)
    s = shared["shape"]
    ax.set_title(f"Equal wall time, same data and shape ({s['n_layers']} x {s['d_model']}, "
                 f"{shared['micro_batch_size']} x {shared['seq_len']} tokens a step)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "race.png", dpi=110)
    plt.close(fig)
    print(f"[race] results -> {out / 'race.json'}, {out / 'race.png'}")


if __name__ == "__main__":
    main()
