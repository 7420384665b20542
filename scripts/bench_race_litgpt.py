#!/usr/bin/env python
"""One litgpt entrant of the quality race (scripts/bench_race.py), run in litgpt's own venv.

    .venv-litgpt/bin/python scripts/bench_race_litgpt.py SPEC.json

litgpt pins packages this project's venv cannot share, so this file imports nothing of lib/:
only torch, numpy and litgpt. SPEC.json (written by bench_race.py) gives the shape, the token
blocks every entrant trains on (.npy, [n, seq_len + 1] uint16, already shuffled), the held-out
windows every entrant is scored on during training, the optimizer, the steps and the output
folder. litgpt's `pretrain` runs as its users run it (its loop, its init, torch.compile, its
cosine schedule with linear warmup); two things are set from outside, both through its Python
API: the data module serves the blocks above, and its `validate` is replaced by one that scores
the shared held-out windows and writes a curve point (time since the training loop started).

Writes into the output folder: curve.jsonl (elapsed_s, step, bits per byte of the held-out
windows), result.json (steps, train_s, tokens/s), hf_model.pth (the final weights under
transformers' Llama names, converted by litgpt's own converter) and check_logits.npy (the final
model's fp32 logits on the first held-out window, for the conversion check).
"""
import os
import sys

# scripts/ holds tokenize.py, which would shadow the standard library's module of that name
_here = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


class Rows(torch.utils.data.Dataset):
    """The race's token blocks in their given order; notes when each step's first row is read.
    At module level: litgpt saves the train loader with its checkpoint, by pickling."""

    def __init__(self, blocks, batch: int, clock: dict):
        self.blocks, self.batch, self.clock = blocks, batch, clock

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        if i % self.batch == 0:  # a step's first row: when the step starts
            self.clock["starts"].append(time.perf_counter())
        self.clock["step"] += 1 / self.batch
        return torch.from_numpy(self.blocks[i].astype(np.int64))


def make_blocks(DataModule, blocks, batch: int, clock: dict, eval_inputs):
    """A litgpt DataModule serving Rows, `batch` a step; its held-out loader is unread (the
    replaced validate scores the shared windows)."""
    global Blocks

    class Blocks(DataModule):
        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length=None) -> None:
            self.batch_size = batch_size

        def setup(self, stage: str = "") -> None:
            pass

        def train_dataloader(self):
            clock["t0"] = time.perf_counter()  # fit() starts right after the loaders are made
            return torch.utils.data.DataLoader(Rows(blocks, batch, clock), batch_size=self.batch_size,
                                               shuffle=False, drop_last=True)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(eval_inputs[:1], batch_size=1)

    Blocks.__qualname__ = "Blocks"
    return Blocks()


def main(spec_path: str) -> None:
    import litgpt.pretrain as pretrain
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.config import Config
    from litgpt.data import DataModule
    from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    shape = spec["shape"]
    blocks = np.load(spec["train_blocks"], mmap_mode="r")
    eval_inputs = torch.from_numpy(np.load(spec["eval_inputs"]).astype(np.int64))
    eval_targets = torch.from_numpy(np.load(spec["eval_targets"]).astype(np.int64))
    steps, batch, seq_len = spec["steps"], spec["micro_batch_size"], spec["seq_len"]
    clock = {"t0": None, "step": 0, "starts": []}
    curve = (out / "curve.jsonl").open("w")

    data = make_blocks(DataModule, blocks, batch, clock, eval_inputs)

    @torch.no_grad()
    def validate(fabric, model, val_dataloader, max_iters, verbose=True):
        """Bits per byte of the shared held-out windows (a curve point), returned as the mean loss."""
        if not verbose:  # fit()'s sanity check before the first step: no point on the curve
            return torch.tensor(0.0)
        t = time.perf_counter()
        model.eval()
        nats, count = 0.0, 0
        for k in range(0, len(eval_inputs), batch):
            x, y = eval_inputs[k:k + batch], eval_targets[k:k + batch]
            logits = model(x).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                     reduction="sum")
            nats, count = nats + float(loss), count + int((y != -100).sum())
        model.train()
        clock["eval_s"] = time.perf_counter() - t
        curve.write(json.dumps({"elapsed_s": time.perf_counter() - clock["t0"], "step": round(clock["step"]),
                                "val_bits_per_byte": nats / math.log(2) / spec["eval_bytes"]}) + "\n")
        curve.flush()
        return torch.tensor(nats / count)

    pretrain.validate = validate
    save_checkpoint = pretrain.save_checkpoint

    def save_final(fabric, state, tokenizer_dir, path):
        """litgpt's save, then the final model's fp32 logits on a held-out window (the check of the
        conversion to transformers' names)."""
        save_checkpoint(fabric, state, tokenizer_dir, path)
        from litgpt.model import GPT

        model = next(m for m in state["model"].modules() if isinstance(m, GPT))
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            clock["check_logits"] = model.eval()(eval_inputs[:1]).float().numpy()

    pretrain.save_checkpoint = save_final
    config = Config(name="race", block_size=seq_len, vocab_size=shape["vocab_size"],
                    padded_vocab_size=shape["vocab_size"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
                    n_query_groups=shape["n_kv_heads"], n_embd=shape["d_model"],
                    head_size=shape["d_model"] // shape["n_heads"], rotary_percentage=1.0, parallel_residual=False,
                    bias=False, norm_class_name="RMSNorm", norm_eps=shape["norm_eps"], mlp_class_name="LLaMAMLP",
                    intermediate_size=shape["d_ff"], rope_base=shape["rope_theta"])
    opt = spec["optimizer"]
    t = time.perf_counter()
    pretrain.setup(
        model_name="race", model_config=config, out_dir=out / "litgpt", precision=spec["litgpt_precision"],
        data=data,
        train=TrainArgs(save_interval=None, log_interval=spec["eval_every"], global_batch_size=batch,
                        micro_batch_size=batch, max_tokens=steps * batch * seq_len, max_norm=1.0,
                        min_lr=opt["min_lr"], lr_warmup_steps=opt["warmup_steps"],
                        tie_embeddings=shape["tie_embeddings"], max_seq_length=seq_len),
        eval=EvalArgs(interval=12 if spec["timing"] else spec["eval_every"],  # a timing run times one
                      max_iters=1, initial_validation=False, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW",
                   "init_args": {"lr": opt["lr"], "weight_decay": opt["weight_decay"], "betas": opt["betas"]}},
        devices=1, logger_name="csv", seed=spec["seed"])
    total_s = time.perf_counter() - t
    train_s = time.perf_counter() - clock["t0"]
    curve.close()
    final = out / "litgpt" / "final"
    convert_lit_checkpoint(final, out / "hf")
    (out / "hf" / "model.pth").rename(out / "hf_model.pth")
    np.save(out / "check_logits.npy", clock["check_logits"])
    # the training rate: tokens of a step over the median step (evaluations and compile left out)
    step_s = float(np.median(np.diff(clock["starts"])))
    (out / "result.json").write_text(json.dumps({
        "steps": steps, "train_s": train_s, "total_s": total_s, "tokens_per_s": batch * seq_len / step_s,
        "t0": clock["t0"], "step_starts": clock["starts"], "eval_s": clock.get("eval_s", 0.0)}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
