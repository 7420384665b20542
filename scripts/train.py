#!/usr/bin/env python
"""Train a causal language model with Accelerate: the whole loop, top to bottom, in this file.

    python scripts/train.py --config configs/train/default.yaml
    accelerate launch --config_file configs/accelerate/cpu.yaml scripts/train.py --config ...

Writes runs/<run_name>/: config.yaml (resolved), provenance.json, metrics.jsonl, checkpoints/
(resumable with --resume auto), final/ (a Hugging Face model and tokenizer), loss.png, report.md.
"""
# Reading order: TrainConfig (every option), Run (what the loop works on), loss_sum and
# optimizer_step (one step), the periodic actions (evaluate, save_checkpoint), main (set up, data,
# model, run folder, the loop, finish), then the functions main calls. A loss, an optimizer, a
# schedule or a periodic action is a plugin (README, "Changing the training loop"), not an edit.
import os
import sys

# Python puts this file's folder first on sys.path, where scripts/tokenize.py would shadow the
# standard library's `tokenize` for everything imported after it: use the repo root instead.
_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Literal, Optional  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib import errors, plugins  # noqa: E402
from lib.data.batches import DataConfig  # noqa: E402
from lib.errors import UserError, exit_on_user_error, where_am_i  # noqa: E402
from lib.model import registry  # noqa: E402
from lib.model.build import ModelConfig  # noqa: E402
from lib.model.lora import LoraOptions  # noqa: E402
from lib.model.loss import LOSSES, LossConfig, step_scaled_loss  # noqa: E402
from lib.records.monitor import MonitorConfig  # noqa: E402
from lib.records.tracking import TrackingConfig  # noqa: E402
from lib.train import runtime  # noqa: E402
from lib.train.actions import ACTIONS, ActionsConfig  # noqa: E402
from lib.train.optim import OPTIMIZERS, OptimConfig, lr_at, lr_at_progress, set_lr  # noqa: E402

RUN_FILES = ("config.yaml", "provenance.json", "metrics.jsonl", "loss.png", "report.md")  # also sent to MLflow


@dataclass
class TrainConfig:
    """Pretrain from scratch or fine-tune a local model."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    plugins: tuple[str, ...] = ()
    """Plugins to import first (.py files or module names) that add learning-rate schedules and
    other named parts (lib/plugins.py); installed packages' `lm.plugins` entry points load too.
    One that fails to load is a warning, unless the run asks for something it would have added."""
    run_name: str = "default"
    """The run's folder inside runs_dir: one plain folder name (no path, not hidden)."""
    runs_dir: Path = Path("runs")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    size_to_budget: bool = False
    """With max_minutes, on a model built from scratch: measure this machine's matrix-product rate
    and take the shape (width, depth, heads, optimizer, learning rate) that the budget sweep found
    best for the compute the budget buys (lib/train/sizing.py, experiments/budget-sweep). Not applied when
    the command line sets any model field; other options it sets keep their values. config.yaml
    records the chosen values (with this off), and a resumed run keeps them."""
    max_steps: int = 1000
    """Optimizer steps at most; without a time budget the learning-rate schedule spans exactly these."""
    max_minutes: Optional[float] = None
    """Time budget of the run, in wall-clock minutes from the process's start (all resumed parts
    together): start-up, compilation, steps, evaluations and checkpoints, and the final evaluation
    and export, for which time is kept. With fit_schedule, the schedule follows it; in any case the
    run stops (saving everything) once it is spent."""
    fit_schedule: Optional[bool] = None
    """With max_minutes: the learning rate follows the clock, the schedule's progress being the
    share of the budget's training time spent (lib/train/budget.py), so the run ends at the
    schedule's floor on time however fast the machine is and however its load changes; max_steps
    still bounds it. Its progress is kept in checkpoints, so a resumed run continues it. Default:
    on, except with --deterministic (time differs between runs); off: the schedule spans
    max_steps and the budget only stops the run."""
    stop_at_step: Optional[int] = None
    """Stop after this optimizer step (saving everything), the schedule still spanning
    max_steps: for preemptible slots; --resume auto continues exactly."""
    micro_batch_size: int = 16
    """Sequences per forward pass, per process."""
    grad_accum_steps: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: on a GPU, bf16 where supported (else fp16); on a CPU, bf16 only where the model's
    matrix products measure clearly faster in bf16 than in fp32 on this machine (cached), else fp32.
    fp16: float16 autocast with a dynamic loss scaler (on CPU too, where it is slow: to try the
    fp16 path before paying for GPUs)."""
    fp16_init_scale: float = 65536.0
    """fp16: the loss scaler's first scale. Halved at every step whose gradients overflow (that
    update is skipped, counted as overflow_steps), doubled after 2000 steps without one."""
    eval_every: int = 200
    """Evaluate on held-out data every this many optimizer steps (0: only at the end)."""
    eval_tokens: Optional[int] = 32_768
    """Held-out tokens those evaluations score: a fixed, seeded sample of eval.py's windows (seq_len
    tokens every seq_len // 2) drawn from across the split, the same every time, so the figure
    estimates eval.py's whole-split one; None: the whole split."""
    log_every: int = 10
    metrics_out: str = "ndjson"
    """Formats of the run's metrics, comma-separated: ndjson, csv, parquet (metrics.jsonl is always
    written; metrics.csv and metrics.parquet are rebuilt from it at each evaluation, checkpoint and
    the end, so a stopped or resumed run's tables hold exactly its records). eval.py writes the same
    files for its evaluation."""
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    checkpoint_every: int = 500
    keep_last_n: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is written."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest held-out loss (of those written at an evaluation
    step: make checkpoint_every a multiple of eval_every)."""
    resume: Optional[str] = None
    """'auto' (the newest checkpoint of this run that verifies: a folder or a packed .tar.gz; a run
    that stopped before its first one starts over) or a checkpoint folder or archive."""
    allow_data_change: bool = False
    """Resume even though the data's content hash differs from the checkpoint's."""
    overwrite: bool = False
    """Start the run over: remove what its folder holds (saying what), except corrupt checkpoints set
    aside there, which are kept. Without it an existing run folder is continued (--resume auto) or
    refused."""
    fused_loss: bool = True
    """Compute the output layer and the loss together in row chunks that stay in cache, never
    holding the full logits (and skipping padded rows): the same loss and gradients, the head's
    time and memory roughly halved. Off: plain logits then cross-entropy. Not used for fp16 or a
    LoRA-wrapped output layer."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel while training (saved models load with the library default either way).
    auto: eager (plain matmuls and a softmax, which torch.compile fuses) when compiling on CPU, where
    that beat sdpa's CPU flash kernel; else sdpa."""
    compile: bool = False
    """torch.compile the model: compiling costs time at start-up (and again after a resume), then
    steps run faster. With max_minutes, the first steps run eagerly and are timed, and the model is
    compiled only where this machine's record of compiling it says the budget left repays it (the
    first time, it compiles and records the cost and the gain); compiled steps that turn out no
    faster are dropped for eager ones (lib/train/compile_choice.py)."""
    keep_freed_memory: bool = True
    """Let glibc malloc keep freed memory for reuse instead of unmapping and faulting the same
    activation buffers back in every step (faster CPU steps; the process holds its peak memory)."""
    threads: Optional[int] = None
    """torch intra-op threads on CPU (default: torch's choice)."""
    deterministic: bool = False
    """Same results in every process on this machine, for bitwise resume: one intra-op thread on
    CPU unless --threads says otherwise (with several, identical processes sometimes split a sum
    differently and got last-bit different gradients), MKL's reproducible mode
    (MKL_CBWR=AUTO,STRICT), oneDNN kept off AMX (whose bf16 results varied between identical
    processes), and torch's deterministic algorithms (on CUDA also CUBLAS_WORKSPACE_CONFIG)."""
    fit_micro_batch: bool = False
    """Before training, halve micro_batch_size (doubling grad_accum_steps, so optimizer steps do
    not change) until it fits in memory: trial steps on a GPU, a measured estimate on CPU."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: stop before the optimizer step (naming the step and its
    samples), or skip that update and count it."""
    mfu: bool = True
    """Log model FLOP utilization against the device's fastest dense matmul peak, whatever the
    run's precision (on CPU, measured and cached; a figure above 100% triggers a new measurement)."""
    dist_timeout_minutes: float = 10.0
    """Longest any process waits for the others (start-up, a collective, a barrier) before the job
    stops with an error naming the process and the step: a process that died or hangs never keeps
    the rest waiting for ever. Raise it if one process legitimately works alone for longer."""
    debug_stall: Optional[str] = None
    """Testing aid: 'RANK:STEP:SECONDS' makes that process sleep before that optimizer step (1-based)."""
    debug_nan_step: Optional[int] = None
    """Testing aid: make the loss NaN in this optimizer step (1-based) to exercise on_nonfinite."""



SECTIONS = {"loss": LOSSES, "optim": OPTIMIZERS, "actions": ACTIONS}  # config sections plugins add options to


@dataclass
class Run:
    """What the loop works on, built by the set-up functions below in this order: processes and
    precision (start), data (load_data), model and optimizer (build), the run folder and the
    loop's state (open_run). Helpers take the run instead of long argument lists."""

    cfg: TrainConfig
    accelerator: object
    choice: object  # the precision chosen (lib.train.precision.Choice: name, reason)
    started: float  # time.perf_counter() at the process's start: the budget counts from it
    manifest: dict = None  # the token shards' manifest
    train_data: object = None  # lib.data.batches training blocks or documents
    boundary: object = None  # where documents meet (position ids restart), or None
    held_out: object = None  # the held-out sample every evaluation scores
    model: object = None  # the built model (before Accelerate)
    prepared: object = None  # the model Accelerate prepared: what checkpoints save
    call: object = None  # the model each step calls: prepared or compiled (lib.train.compile_choice)
    optimizer: object = None
    fused: object = None  # the fused output layer (lib.model.fused_loss.FusedHead) or None
    objective: object = None  # the training loss (lib.model.loss.TokenLoss)
    base_sha: str = None  # LoRA: the sha256 of the frozen base's weights, which checkpoints name
    n_params: int = 0
    flops_per_token: float = 0.0
    run_dir: Path = None
    resume_from: Path = None
    sampler: object = None
    loop: object = None  # lib.train.loop_state.LoopState: what a checkpoint restores
    metrics: object = None  # metrics.jsonl writer (main process only)
    tracker: object = None  # the MLflow mirror (main process only)
    system: object = None  # CPU, memory, GPU figures (main process only)
    periodic: object = None  # lib.train.actions.Periodic: evaluations, checkpoints, plugins' actions
    stopped_early: bool = False

    @property
    def uses_lora(self) -> bool:
        from lib.model import lora

        return lora.enabled(self.cfg.lora)

    @property
    def say(self):
        return self.accelerator.print

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.prepared)

    @property
    def tokens_dir(self) -> Path:
        from lib.data.batches import tokens_dir

        return tokens_dir(self.cfg.data.dir)


def loss_sum(run, model, batch, labels):
    """The training objective of one micro-batch: (sum of its per-token losses, its target
    tokens), from the loss --loss.name names (lib/model/loss.py LOSSES: cross-entropy, or a plugin's).
    The loop divides by the step's target tokens over all micro-batches and processes, so every
    token weighs the same."""
    inputs = batch.model_inputs(labels.device)
    if run.fused is not None:  # output layer and loss in cache-sized chunks, no full logits
        return run.fused.loss_sum(model, inputs, labels, run.objective)
    return run.objective.loss_sum(model(**inputs).logits, labels)


class NonFiniteStep(Exception):
    """The loss or gradient norm of a step was not finite; the weights are untouched."""


def optimizer_step(run, batches, lr: float):
    """One optimizer step at learning rate `lr` over the step's micro-batches (grad_accum_steps of
    them, each process its own): forward, backward, clip, step. Returns (this process's loss sum,
    target tokens of all processes, gradient norm, what was non-finite: [] when the update was
    applied).
    A non-finite loss or gradient norm raises NonFiniteStep before the update, or with
    --on_nonfinite skip drops the update and counts it."""
    import torch

    cfg, accelerator, loop, optimizer = run.cfg, run.accelerator, run.loop, run.optimizer
    device, world = accelerator.device, accelerator.num_processes
    if cfg.debug_stall and [int(x) for x in cfg.debug_stall.split(":")[:2]] == [accelerator.process_index,
                                                                                 loop.step + 1]:
        time.sleep(float(cfg.debug_stall.split(":")[2]))
    # every token of the step, all processes, weighs 1/step_tokens, however the rows are padded
    step_tokens = int(accelerator.reduce(torch.tensor(sum(b.n_targets for b in batches), device=device), "sum"))
    step_loss = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        labels = torch.from_numpy(batch.labels).to(device)
        with accelerator.accumulate(run.prepared):  # gradients are all-reduced on the last micro-batch only
            loss, _ = loss_sum(run, run.call.model, batch, labels)
            if cfg.debug_nan_step == loop.step + 1 and i == 0 and accelerator.is_main_process:
                loss = loss * float("nan")
            accelerator.backward(step_scaled_loss(loss, step_tokens, world, cfg.grad_accum_steps))
            step_loss += loss.detach()
    # the norm is always computed (clipping at infinity changes nothing), so that a non-finite
    # gradient is caught before it reaches the weights
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = accelerator.clip_grad_norm_(run.call.model.parameters(), clip)
    total_loss = accelerator.reduce(step_loss.clone(), reduction="sum")
    # fp16: an overflowing gradient is the loss scaler's business (it skips the update itself)
    bad = [what for what, value in (("loss", total_loss), ("gradient norm", grad_norm))
           if not torch.isfinite(value) and not (what == "gradient norm" and accelerator.mixed_precision == "fp16")]
    if bad and cfg.on_nonfinite == "stop":
        raise NonFiniteStep(" and ".join(bad))
    if bad:
        loop.skipped_steps += 1
        accelerator.print(f"step {loop.step + 1}: non-finite {' and '.join(bad)}; update skipped "
                          f"({loop.skipped_steps} so far)")
    else:
        set_lr(optimizer, lr)
        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
        optimizer.step()  # fp16: the scaler skips it when a gradient overflowed, then lowers its scale
        # (Accelerate's optimizer_step_was_skipped misses skips inside a fused AdamW kernel)
        loop.overflow_steps += scale is not None and accelerator.scaler.get_scale() < scale
    optimizer.zero_grad(set_to_none=True)
    return step_loss, step_tokens, float(grad_norm), bad


@ACTIONS.register("eval", every="eval_every", replace=True,
                  estimate=lambda run: run.held_out.estimate_seconds(
                      run.unwrapped, run.cfg.micro_batch_size, run.device, run.accelerator.autocast, run.boundary,
                      world=run.world))
def evaluate(run) -> dict:
    """Score the held-out sample (every eval_every steps, and after the last step), each process
    a share of its windows, the sums added over processes."""
    import torch

    loop, t, accelerator = run.loop, time.perf_counter(), run.accelerator

    def add_up(values: list) -> list:
        return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=run.device), "sum").tolist()

    res = run.held_out.evaluate(run.unwrapped, run.cfg.micro_batch_size, run.device, accelerator.autocast,
                                run.boundary, shard=(accelerator.process_index, run.world, add_up))
    loop.last_eval.update(step=loop.step, loss=res["loss"], seconds=time.perf_counter() - t)
    run.say(f"eval step {loop.step}: val_loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
            f"bits/byte {res['bits_per_byte']:.4f} | acc {res['accuracy']:.3f} ({run.held_out.description}, "
            f"{loop.last_eval['seconds']:.1f} s)")
    if run.metrics:
        run.metrics.write({"type": "eval", "step": loop.step, "tokens_seen": loop.tokens_seen,
                           "elapsed_s": loop.elapsed_s(), **{f"val_{k}": v for k, v in res.items()}})
        run.metrics.refresh_tables()
    return res


def checkpoint_bytes(run) -> int:
    """A checkpoint's expected size: the trained weights and the optimizer's state (float32)."""
    from lib.train.optim import state_numel

    weights = sum(p.numel() * p.element_size() for p in run.prepared.parameters() if p.requires_grad)
    return weights + 4 * state_numel(run.unwrapped, run.cfg.optim)


@ACTIONS.register("checkpoint", every="checkpoint_every", replace=True,
                  estimate=lambda run: max(0.1, checkpoint_bytes(run) / 2e8))  # ~200 MB/s before one is timed
def save_checkpoint(run) -> None:
    """Write a checkpoint (every checkpoint_every steps, after the last step, and on a stop request)."""
    from accelerate.utils import gather_object

    from lib.records import checkpoint as ckpt

    cfg, loop = run.cfg, run.loop
    ckpt.assert_finite(run.unwrapped, loop.step)
    ckpt.save(run.accelerator, run.run_dir, loop.step, cfg.keep_last_n,
              {**loop.state_dict(gather_object), "sampler": run.sampler.state_dict(),
               "data_content_hash": run.manifest["content_hash"],
               **({"lora_base_sha256": run.base_sha} if run.uses_lora else {})}, keep_best=cfg.keep_best,
              expect_bytes=checkpoint_bytes(run), say=run.say)
    if run.metrics:  # a run stopped here has tables that match its checkpoint
        run.metrics.refresh_tables()


@exit_on_user_error
def main() -> None:
    # a time budget is the command's wall time: start-up counts in it, the interpreter's and the
    # imports' too when this file is the program (not when a test calls main() in its own process)
    started = time.perf_counter() - (process_age_s() if __name__ == "__main__" else 0.0)
    cfg = parse_config()
    run = start(cfg, started)
    load_data(run)
    build(run)
    open_run(run)
    train(run)
    finish(run)


def process_age_s() -> float:
    """Seconds since this process started (0 where psutil cannot tell)."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # noqa: BLE001 -- no psutil, or no process table: count from here
        return 0.0


def parse_config() -> TrainConfig:
    """The command line over its preset, after the plugins it names are loaded (their names and
    options are accepted then), checked before anything is read or written."""
    loaded = plugins.load(plugins.from_command_line(sys.argv[1:]))  # before parsing: they add options
    if os.environ.get("RANK", "0") == "0":
        plugins.warn_failures(loaded)
    cfg = config_lib.parse(plugins.extend_config(TrainConfig, SECTIONS), description=__doc__,
                           expand={"model.size": registry.size})
    check_options(cfg)
    if cfg.model.init_from:  # a name or a folder -> the folder, as config.yaml then records it
        cfg.model.init_from = str(registry.resolve(cfg.model.init_from, cfg.model.allow_download))
    return cfg


def start(cfg, started: float) -> Run:
    """Processes, threads and precision: the model is sized to the budget first (lib/train/sizing.py),
    since the precision probe times the model's own matrix products."""
    runtime.prepare_environment(cfg.deterministic)  # read when MKL and cuBLAS start: before torch
    from lib.records import tracking
    from lib.data.corpus import read_manifest
    from lib.data.batches import tokens_dir
    from lib.files import ensure_writable
    from lib.model.build import matmul_dims
    from lib.train.precision import model_matmul_shapes, recorded as recorded_precision
    from lib.train.sizing import size_run

    manifest = read_manifest(tokens_dir(cfg.data.dir), "tokens")
    sized = []

    def shapes(state):  # the model sized to the budget first (lib/train/sizing.py), then its products
        sized.append(size_run(cfg, sys.argv[1:], state))
        return model_matmul_shapes(*matmul_dims(cfg.model, manifest["vocab_size"]),
                                   cfg.micro_batch_size * cfg.data.seq_len)

    # a resumed run keeps the precision it chose at its start: a probe never switches it midway
    kept = recorded_precision(cfg.runs_dir / cfg.run_name, "chose at its start") if cfg.resume else None
    accelerator, choice = runtime.start(cfg.precision, shapes, grad_accum_steps=cfg.grad_accum_steps,
                                        fp16_init_scale=cfg.fp16_init_scale, threads=cfg.threads,
                                        deterministic=cfg.deterministic, keep_freed_memory=cfg.keep_freed_memory,
                                        timeout_minutes=cfg.dist_timeout_minutes, kept=kept)
    run = Run(cfg, accelerator, choice, started, manifest=manifest)
    if sized[0]:
        run.say(sized[0])
    if run.is_main:
        tracking.preload(cfg.tracking)  # MLflow's import overlaps the set-up below, not the first steps
    if cfg.keep_best and (not cfg.eval_every or not cfg.checkpoint_every or cfg.checkpoint_every % cfg.eval_every):
        run.say(f"warning: --keep_best compares checkpoints written at evaluation steps; with checkpoint_every "
                f"{cfg.checkpoint_every} and eval_every {cfg.eval_every} only the final checkpoint has a held-out loss")
    ensure_writable(cfg.runs_dir, "--runs_dir")
    return run


def load_data(run) -> None:
    """Training blocks, and a held-out sample that is the same at every evaluation."""
    import numpy as np

    from lib.data.batches import DocBoundary, build_train_data, load_masks, load_split
    from lib.model.evaluate import held_out_sample, token_byte_lengths
    from lib.data.tokenizer import has_tokenizer

    cfg, tok_dir = run.cfg, run.tokens_dir
    verify_shards_on_main(run)
    val_tokens, val_docs = load_split(tok_dir, "val")
    tokenizer = (tok_dir / run.manifest["tokenizer_dir"]).resolve()
    val_masks = load_masks(tok_dir, "val")  # conversations: the assistant's tokens alone are scored
    run.held_out = held_out_sample(val_tokens, val_docs, cfg.data.seq_len, cfg.eval_tokens,
                                   token_byte_lengths(tokenizer) if has_tokenizer(tokenizer) else None, seed=0,
                                   mask=None if val_masks is None else np.concatenate(val_masks))
    run.train_data = build_train_data(tok_dir, cfg.data, run.manifest["special_ids"])
    run.boundary = DocBoundary.of(run.manifest["special_ids"]) if cfg.data.doc_mask else None
    if cfg.data.doc_mask and run.boundary is None:
        run.say("note: the tokenizer has neither bos nor eos, so nothing marks where documents meet: attention "
                "spans them")
    if val_masks is not None:
        long = too_long_conversations(tok_dir, run.manifest, cfg.data.seq_len)
        if long:
            limit, whole = model_positions(cfg), long[3] - 1
            advice = (f"--data.seq_len {whole} keeps every one whole" if limit is None or whole <= limit else
                      f"keeping every one whole needs {whole} positions, more than the model's {limit}: fine-tune a "
                      f"model with more positions, or shorten those conversations"
                      + (f" (--data.seq_len {limit}, the most it takes, cuts fewer)" if cfg.data.seq_len < limit else ""))
            run.say(f"warning: {long[0]} conversation(s) are longer than --data.seq_len {cfg.data.seq_len} + 1 tokens "
                    f"(the first: {long[1]}, {long[2]} tokens). They are cut into blocks like any document: their "
                    f"later answer tokens are trained without the conversation's start in view; {advice}")


def verify_shards_on_main(run) -> None:
    """Every file of the training and held-out splits against the manifest, before any is used (a
    flipped byte, a truncated file, an id past the vocabulary, a path out of the folder): checked
    on the main process, its verdict given to every process."""
    from lib.data.batches import verify_shards
    from lib.train.distributed import broadcast_from_main

    problem = None
    if run.is_main:
        try:
            verify_shards(run.tokens_dir, run.manifest, ("train", "val"), say=run.say)
        except UserError as exc:
            problem = str(exc)
    problem = broadcast_from_main(problem, run.accelerator)
    if problem:
        raise UserError(problem)


def model_positions(cfg) -> int | None:
    """The positions of the model this run trains: --model.init_from's config, else
    --model.max_seq_len (None where the config names none)."""
    from lib.model.build import folder_positions

    return folder_positions(cfg.model.init_from) if cfg.model.init_from else cfg.model.max_seq_len


def too_long_conversations(tok_dir, manifest: dict, seq_len: int) -> tuple | None:
    """(how many training conversations exceed seq_len + 1 tokens, the first one's file:line, its
    length, the longest length), or None when none does."""
    import numpy as np

    from lib.data.batches import load_doc_tables
    from lib.data.corpus import iter_records

    lengths = np.concatenate(load_doc_tables(tok_dir, "train"))[:, 0]
    long = np.nonzero(lengths > seq_len + 1)[0]
    if not len(long):
        return None
    first = next(r for i, r in enumerate(iter_records(tok_dir / manifest["corpus_dir"], "train")) if i == long[0])
    return len(long), f"{first['source']}:{first.get('line', '?')}", int(lengths[long[0]]), int(lengths.max())


def open_run(run) -> None:
    """The run folder, now that every input has been read (this job's, continued or fresh), and
    the loop's state: fresh, or restored from a checkpoint with the sampler, weights, optimizer and
    random states; then provenance, the metrics sinks and the periodic actions."""
    from lib.records import checkpoint as ckpt
    from lib.model import lora
    from lib.records import run_folder, tracking
    from lib.train.actions import Periodic
    from lib.data.batches import BlockSampler
    from lib.files import write_json
    from lib.train.budget import ClockSchedule
    from lib.train.loop_state import LoopState
    from lib.records.metrics import METRICS, MetricsSink, parse_formats, truncate_after_step
    from lib.records.monitor import SystemMonitor
    from lib.records.provenance import provenance

    cfg, accelerator = run.cfg, run.accelerator
    run.run_dir = cfg.runs_dir / cfg.run_name
    errors.writing_to(run.run_dir)  # named by a disk-full error whose file is not known
    run.resume_from = run_folder.claim(accelerator, run.run_dir, cfg.resume, cfg.overwrite)
    if run.is_main:
        config_lib.save(cfg, run.run_dir / "config.yaml")
    run.sampler = BlockSampler(len(run.train_data), cfg.micro_batch_size, cfg.seed, accelerator.process_index,
                               run.world)
    on_clock = bool(cfg.max_minutes and (cfg.fit_schedule if cfg.fit_schedule is not None else not cfg.deterministic))
    run.loop = loop = LoopState(horizon=cfg.max_steps, device=run.device,
                                clock=ClockSchedule(60 * cfg.max_minutes, cfg.max_steps) if on_clock else None)
    where_am_i(lambda: f"process {accelerator.process_index} of {run.world}, at step {loop.step + 1}")
    if run.resume_from is not None:
        vet = (lambda st: lora.check_checkpoint(run.resume_from, st, run.unwrapped, run.base_sha,
                                                cfg.model.init_from)) if run.uses_lora else None
        state = ckpt.load(accelerator, run.resume_from, run.manifest["content_hash"], cfg.allow_data_change,
                          strict=not run.uses_lora, check=vet)
        run.sampler.load_state_dict(state["sampler"], cfg.allow_data_change)
        loop.load_state_dict(state, accelerator.process_index)
        run.say(f"resumed from {run.resume_from} at step {loop.step}")
    if run.is_main:
        write_json(run.run_dir / "provenance.json",
                   provenance(cfg, run.manifest, accelerator, run.n_params, run.resume_from,
                              tracking.effective_uri(cfg.tracking, cfg.runs_dir)))
        # resuming a finished run (its last checkpoint) redoes its final evaluation and records; a
        # run stopped early (--stop_at_step, a budget) drops the final record and the evaluation
        # the stop added, so the resumed log holds the rows a straight run would
        regular_eval = cfg.eval_every and loop.step % cfg.eval_every == 0
        again = ("eval", "final") if loop.done or not regular_eval else ("final",)
        dropped = (truncate_after_step(run.run_dir / METRICS, loop.step, again)
                   if run.resume_from is not None else 0)
        if dropped:
            run.say(f"metrics.jsonl: dropped {dropped} record(s) logged after step {loop.step}; they are logged again")
    describe_run(run)
    if run.is_main:  # MLflow mirrors what metrics.jsonl records, from a thread: local unless --tracking.uri
        run.tracker = tracking.start(cfg.tracking, run.run_dir, config_lib.to_dict(cfg), {"precision": run.choice.name},
                                     resumed=run.resume_from is not None, say=run.say, artifacts=RUN_FILES)
        run.metrics = MetricsSink(run.run_dir / METRICS, parse_formats(cfg.metrics_out), mirror=run.tracker)
        if run.resume_from is not None:
            run.metrics.refresh_tables()  # a kill may have left tables with rows past the checkpoint
        run.system = SystemMonitor(run.device) if cfg.monitor.every else None  # CPU, memory, GPU figures
        run.say(f"system metrics: {run.system.describe() if run.system else 'off (--monitor.every 0)'}"
                + (f", every {cfg.monitor.every * cfg.log_every} steps" if cfg.monitor.every > 1 else ""))
    run.periodic = Periodic(cfg)


def train(run) -> None:
    """The loop: one iteration = one optimizer step, then the periodic actions due after it; the
    last step (the schedule's end, a spent budget, --stop_at_step) runs the final evaluation and
    checkpoint through the same actions. A stop request (SIGTERM, Ctrl-C) finishes the step,
    checkpoints and exits."""
    from lib.train import budget
    from lib.train.compile_choice import CompileChoice
    from lib.train.flops import MfuMeter
    from lib.train.preemption import StopRequests
    from lib.progress import progress

    cfg, loop = run.cfg, run.loop
    stops = StopRequests()  # SIGTERM, Ctrl-C: finish the step, checkpoint, exit (a second one: at once)
    run.prepared.train()
    bar = progress(total=loop.horizon, initial=loop.step, disable=not run.is_main, desc="train", unit="step")
    mfu = MfuMeter(run.device, run.flops_per_token, run.world, enabled=cfg.mfu and run.is_main, say=run.say)
    clock = budget.StepClock()
    # with a budget, compiling is measured against eager steps and kept only where it pays (one
    # process: several would have to agree on a decision each takes from its own clock)
    run.call = CompileChoice(run.prepared, run.call, *compile_key(run), say=run.say,
                             probe=bool(cfg.compile and cfg.max_minutes and not cfg.deterministic and run.world == 1))
    window = {"tokens": loop.tokens_seen, "t": time.perf_counter()}  # what the next log line's rate counts from
    # a resumed run with no step left (it redoes the final evaluation) adds no time to the run's
    loop.started_at = run.started if not loop.done else time.perf_counter()
    last = loop.done
    if last:  # a resumed run that had finished: its last step's actions again (the final evaluation)
        bar.close()
        loop.stop_timing()
        run.periodic.run(run, loop.step, last=True)
    while not last:
        lr, last = next_learning_rate(run, clock)  # last: the schedule's end, by its steps or its clock
        bar.total = loop.horizon
        clock.start()
        grad_norm = one_step(run, lr)
        bar.update(1)
        clock.stop()
        if run.call.after_step(clock.last_s, seconds_left(run, clock), clock):
            clock = budget.StepClock()  # the next step compiles, or the pace changed: time afresh
        if loop.step % cfg.log_every == 0 or last:
            log_step(run, bar, window, mfu, grad_norm, lr)
        last = last or stop_reason(run, lr)
        if last:
            bar.close()
            loop.stop_timing()
            run.call.finish()
        run.periodic.run(run, loop.step, last, pace=clock.steady)
        signalled = stops.agreed(run.accelerator) if not last else None  # the same on every process
        if signalled:
            stop_and_exit(run, bar, signalled)


def one_step(run, lr: float) -> float:
    """Draw the step's batches, take the optimizer step at learning rate `lr`, count it; the
    gradient norm."""
    from lib.records import checkpoint as ckpt

    cfg, loop = run.cfg, run.loop
    sample_ids = [run.sampler.next_batch() for _ in range(cfg.grad_accum_steps)]
    batches = [run.train_data.make_batch(ids, run.boundary) for ids in sample_ids]
    try:
        step_loss, step_tokens, grad_norm, bad = optimizer_step(run, batches, lr)
    except NonFiniteStep as exc:
        found = ckpt.complete_checkpoints(run.run_dir)
        raise UserError(
            f"step {loop.step + 1}: non-finite {exc}; stopped before the optimizer step. Samples (block "
            f"indices) of this step on rank {run.accelerator.process_index}: "
            f"{[j for ids in sample_ids for j in ids]}. Weights are untouched; newest checkpoint: "
            f"{found[-1] if found else 'none'}. Lower optim.lr, check those samples, or pass --on_nonfinite skip"
        ) from None
    loop.step += 1
    loop.tokens_seen += step_tokens
    loop.window.slots += sum(b.input_ids.size for b in batches)
    loop.window.pad += sum(b.n_padding for b in batches)
    if not bad:  # a skipped step's loss would make the whole logging window non-finite
        loop.window.loss += step_loss
        loop.window.tokens += step_tokens
    return grad_norm


def next_learning_rate(run, clock) -> tuple[float, bool]:
    """The learning rate of the step about to run, and whether it is the schedule's last: by the
    step count (lib.train.optim.lr_at), or on a time budget's clock (lib/train/budget.py), where
    the main process's clock decides for every process."""
    from lib.train.distributed import broadcast_from_main

    cfg, loop = run.cfg, run.loop
    if loop.clock is None:
        return lr_at(loop.step, loop.horizon, cfg.optim), loop.step + 1 >= loop.horizon
    schedule = loop.clock
    if schedule.warm_end is None and cfg.optim.warmup_fraction is None and loop.step >= cfg.optim.warmup_steps:
        schedule.warm_end = schedule.progress
    final_s = final_work_seconds(run, clock.steady)
    last = schedule.advance(loop.step, loop.elapsed_s(), clock.pace, final_s,
                            between_s=run.periodic.due_seconds(run, loop.step + 1, clock.steady), worst_s=clock.worst)
    if run.world > 1:
        schedule.start_s, schedule.progress, schedule.warm_end, last = broadcast_from_main(
            (schedule.start_s, schedule.progress, schedule.warm_end, last), run.accelerator)
    loop.horizon = loop.step + 1 if last else schedule.projected_steps(loop.step, loop.elapsed_s(), final_s)
    return lr_at_progress(loop.step, schedule.progress, cfg.optim, schedule.warm_end), last


def final_work_seconds(run, pace: float) -> float:
    """What follows the last step, at the step time `pace`: the actions due then (the final
    evaluation and checkpoint, plugins'), and the exported model, which costs about a checkpoint's
    writing again for the weights and once more for checking them, plus half a second for the
    plot and the report."""
    return run.periodic.final_seconds(run, pace) + 2 * run.periodic["checkpoint"].cost(run, pace) + 0.5


def seconds_left(run, clock) -> float:
    """Seconds of the budget left for steps (0 without a budget)."""
    from lib.train import budget

    if not run.cfg.max_minutes:
        return 0.0
    return 60 * run.cfg.max_minutes * (1 - budget.MARGIN) - final_work_seconds(run, clock.steady) - run.loop.elapsed_s()


def stop_reason(run, lr: float) -> bool:
    """Whether the run stops before its schedule's end (a spent budget, --stop_at_step), saying why."""
    cfg, loop = run.cfg, run.loop
    if cfg.max_minutes and loop.elapsed_s() > 60 * cfg.max_minutes:
        run.say(f"stopping at step {loop.step} of {loop.horizon} (lr {lr:.2e}): the {cfg.max_minutes:g} minute "
                "budget is spent")
    elif cfg.stop_at_step is not None and cfg.stop_at_step <= loop.step:
        run.say(f"stopping at step {loop.step} (--stop_at_step); --resume auto continues from here")
    else:
        return False
    run.stopped_early = True
    return True


def stop_and_exit(run, bar, signalled: str) -> None:
    """A stop request: checkpoint this step and exit with EXIT_STOPPED (--resume auto continues)."""
    from lib.records import checkpoint as ckpt
    from lib.train.preemption import EXIT_STOPPED

    bar.close()
    save_checkpoint(run)
    run.say(f"stopped by {signalled} after step {run.loop.step}: checkpoint {ckpt.step_dir(run.run_dir, run.loop.step)} "
            f"written; --resume auto continues from there")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    sys.exit(EXIT_STOPPED)


def finish(run) -> None:
    """After the last step's actions: the replicas' agreement, the final record, the exported
    model, the plot and the report."""
    from lib.records import checkpoint as ckpt
    from lib.model import export
    from lib.model.build import build_model
    from lib.records.monitor import peak_memory_gib
    from lib.records.report import plot_metrics, write_run_report

    cfg, loop, accelerator = run.cfg, run.loop, run.accelerator
    in_sync = runtime.replicas_identical(accelerator, run.unwrapped)
    if run.world > 1 and in_sync is not None:
        run.say(f"weights identical on all {run.world} processes: {in_sync}")
    if run.metrics:
        run.metrics.write({"type": "final", "step": loop.step, "world_size": run.world, "replicas_identical": in_sync,
                           "skipped_steps": loop.skipped_steps, "tokens_seen": loop.tokens_seen,
                           **fp16_state(run)})
    train_peak = peak_memory_gib(run.device)[0]  # the export below may hold a second copy of the model
    vocab, special = run.manifest["vocab_size"], run.manifest["special_ids"]
    export.final_model(accelerator, run.prepared, run.run_dir / "final", run.tokens_dir, run.fused,
                       cfg.lora if run.uses_lora else None, rebuild=lambda: build_model(cfg.model, vocab, special),
                       base_dir=cfg.model.init_from, probe_ids=run.held_out.inputs[:2],
                       trained_len=None if cfg.model.init_from else cfg.data.seq_len)
    if run.is_main:
        best = ckpt.best_checkpoint(run.run_dir) if cfg.keep_best else None
        if best is not None:
            run.say(f"best checkpoint by held-out loss: {best}")
        run.metrics.close()
        plot_metrics(run.run_dir)
        fitted = f", the learning rate on a {cfg.max_minutes:g} minute budget's clock" if loop.clock else ""
        write_run_report(run.run_dir, cfg.run_name, [
            f"model: {cfg.model.arch}, {run.n_params / 1e6:.2f}M parameters, seq_len {cfg.data.seq_len}",
            f"precision: {run.choice.name} ({run.choice.reason})",
            f"steps: {loop.step} of {loop.horizon}{' (stopped early)' if run.stopped_early else ''}{fitted}, "
            f"{loop.tokens_seen:,} tokens in {loop.elapsed_s() / 60:.1f} min of training (all parts of the run), "
            f"{loop.tokens_seen / max(loop.elapsed_s(), 1e-9):,.0f} tokens/s"],
            run.periodic["eval"].last_result, run.held_out.description)
        peak, of_what = peak_memory_gib(run.device)
        run.say(f"done: {loop.step} steps in {loop.elapsed_s() / 60:.1f} min of training, peak memory {train_peak:.2f} "
                f"GiB ({of_what}, main process; {peak:.2f} with the export); final model in {run.run_dir / 'final'}")
        if cfg.max_minutes:
            wall, budget_s = loop.elapsed_before_s + time.perf_counter() - loop.started_at, 60 * cfg.max_minutes
            run.say(f"budget: {wall:.1f} s of {budget_s:g} s ({wall / budget_s:.1%}), of which "
                    f"{time.perf_counter() - loop.stopped_at:.1f} s after the last step (its evaluation, checkpoint "
                    f"and the export" + (f"; {loop.clock.kept_s:.1f} s were kept for them)" if loop.clock else ")"))
    # every process tears its process group down together: a rank that destroyed its gloo group
    # while the main one was still writing the final model once died with SIGABRT (FSDP2 on CPU)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def build(run) -> None:
    """The model (built from config or loaded from init_from, LoRA applied), its loss and
    optimizer, both prepared by Accelerate, and the model the loop calls: compiled or not. The same
    seed in every process: identical initial weights."""
    import torch
    from accelerate.utils import set_seed

    from lib.model import lora
    from lib.model.fused_loss import FusedHead
    from lib.model.loss import build_loss
    from lib.model.build import build_model, check_data_fits, count_params, flops_per_token
    from lib.train.optim import build_optimizer

    cfg, accelerator, say = run.cfg, run.accelerator, run.say
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    if cfg.model.init_from:  # the data must be in the model's tokens, in sequences it has positions for
        check_data_fits(cfg.model.init_from, run.manifest, cfg.data.seq_len)
    elif cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.lora.quantize == "4bit":  # QLoRA: the frozen base in 4 bits, quantized as it loads
        lora.check_quantize(cfg.lora, cfg.model.init_from or "")
        if runtime.is_sharded(accelerator):
            raise UserError("--lora.quantize 4bit does not combine with FSDP here: launch with DDP or one process")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        model = lora.load_4bit_base(cfg.model.init_from, dtype, accelerator.device)
        say(f"base held in 4-bit NF4 (bitsandbytes), computing in {dtype}")
    else:
        model = build_model(cfg.model, run.manifest["vocab_size"], run.manifest["special_ids"])
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        say("activation checkpointing: on (activations recomputed in the backward pass)")
    attention = cfg.attention if cfg.attention != "auto" else (
        "eager" if cfg.compile and accelerator.device.type == "cpu" else "sdpa")
    if attention != model.config._attn_implementation:
        model.set_attn_implementation(attention)
    run.n_params = count_params(model)
    if lora.enabled(cfg.lora):
        model = lora.apply(model, cfg.lora)
        n_train = count_params(model, trainable_only=True)
        say(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {', '.join(lora.adapted_modules(model))}: {n_train:,} "
            f"trainable of {run.n_params + n_train:,} parameters ({n_train / (run.n_params + n_train):.2%}); "
            f"checkpoints hold {'every weight, sharded (FSDP)' if runtime.is_sharded(accelerator) else 'the adapters only'}")
        run.base_sha = lora.base_fingerprint(cfg.model.init_from)  # checkpoints name their base
    run.flops_per_token = flops_per_token(model, cfg.data.seq_len)  # after LoRA: a frozen weight costs no gradient
    run.objective = build_loss(cfg.loss)
    fused_ok = cfg.fused_loss and accelerator.mixed_precision != "fp16"
    run.fused = FusedHead.attach(model, compiled=cfg.compile) if fused_ok and run.objective.fused else None
    if fused_ok and not run.objective.fused:
        say(f"note: loss {cfg.loss.name} needs the full logits: the fused output layer is not used")
    say(f"forward: {'torch.compile' if cfg.compile else 'eager'}, attention {attention}, loss "
        f"{'fused with the output layer' if run.fused is not None else 'over full logits'}"
        + (f" ({cfg.loss.name})" if cfg.loss.name != "cross_entropy" else ""))
    if cfg.optim.name == "muon" and runtime.is_sharded(accelerator):
        raise UserError("--optim.name muon does not combine with FSDP here (its update needs whole matrices): "
                        "launch with DDP or one process, or use --optim.name adamw")
    run.model = model
    run.prepared, run.optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optim))
    if lora.enabled(cfg.lora):
        lora.save_trainable_only(accelerator, run.prepared)
    run.call = torch.compile(run.prepared) if cfg.compile else run.prepared
    if cfg.fit_micro_batch:
        fit_micro_batch(run)


def compile_key(run) -> tuple[str, str]:
    """What the cost and gain of compiling this run's model depend on, as lib.train.compile_choice's
    (cache key, machine): the model (class, parameter counts), batch and precision; the machine
    (device or CPU, processes, threads, oneDNN's instruction limit, torch)."""
    import torch

    from lib.train.compile_choice import model_key
    from lib.train.flops import cpu_model
    from lib.model.build import count_params

    cfg, accelerator, model = run.cfg, run.accelerator, run.unwrapped
    machine = model_key({"device": accelerator.device.type if accelerator.device.type != "cpu" else cpu_model(),
                         "processes": accelerator.num_processes, "threads": torch.get_num_threads(),
                         "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "all"),
                         "torch": torch.__version__})
    return model_key({"model": type(model).__name__, "params": count_params(model),
                      "trained": count_params(model, trainable_only=True), "rows": cfg.micro_batch_size,
                      "seq": cfg.data.seq_len, "precision": run.choice.name, "fused": cfg.fused_loss,
                      "attention": model.config._attn_implementation}) + " " + machine, machine


def check_options(cfg: TrainConfig) -> None:
    """Values no run can use, refused before anything is read or written (a UserError naming the
    option)."""
    from lib.train.optim import SCHEDULES
    from lib.records.metrics import parse_formats
    from lib.records.run_folder import check_name, refuse_unless_run
    from lib.records.tracking import effective_uri

    rules = [("max_steps", cfg.max_steps >= 1, "at least 1"), ("micro_batch_size", cfg.micro_batch_size >= 1,
             "at least 1"), ("grad_accum_steps", cfg.grad_accum_steps >= 1, "at least 1"),
             ("keep_last_n", cfg.keep_last_n >= 1, "at least 1"), ("optim.lr", cfg.optim.lr >= 0, "0 or more"),
             ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "0 or more"),
             ("optim.warmup_fraction", cfg.optim.warmup_fraction is None or 0 <= cfg.optim.warmup_fraction < 1,
              "from 0 up to (not including) 1, or None"),
             ("max_minutes", cfg.max_minutes is None or cfg.max_minutes > 0, "more than 0"),
             ("eval_tokens", cfg.eval_tokens is None or cfg.eval_tokens >= 1, "at least 1, or None"),
             ("data.seq_len", cfg.data.seq_len >= 2, "at least 2"),
             ("dist_timeout_minutes", cfg.dist_timeout_minutes > 0, "more than 0")]
    rules += [(name, getattr(cfg, name) >= 0, "0 or more (0: never)")
              for name in ("eval_every", "checkpoint_every")]
    rules += [("log_every", cfg.log_every >= 1, "at least 1"), ("monitor.every", cfg.monitor.every >= 0, "0 or more")]
    for name, ok, need in rules:
        if not ok:
            value = cfg
            for part in name.split("."):
                value = getattr(value, part)
            raise UserError(f"--{name} {value}: must be {need}")
    parse_formats(cfg.metrics_out)
    check_name(cfg.run_name)  # one folder name inside runs_dir: nothing else can be written or removed
    refuse_unless_run(cfg.runs_dir / cfg.run_name)  # a file, or a folder no run wrote: refused before any work
    effective_uri(cfg.tracking, cfg.runs_dir)  # --tracking.uri env without MLFLOW_TRACKING_URI: refused now
    SCHEDULES.get(cfg.optim.schedule, "--optim.schedule")  # a name no built-in or loaded plugin provides
    OPTIMIZERS.get(cfg.optim.name, "--optim.name")
    LOSSES.get(cfg.loss.name, "--loss.name")


def fp16_state(run) -> dict:
    """fp16: the loss scaler's scale now, and the updates it has dropped so far ({} otherwise)."""
    if run.accelerator.scaler is None:
        return {}
    return {"loss_scale": run.accelerator.scaler.get_scale(), "overflow_steps": run.loop.overflow_steps}


def log_step(run, bar, window: dict, mfu, grad_norm: float, lr: float) -> None:
    """One log line and metrics record: the mean loss over every target token of every process
    since the last one (the window is then emptied), throughput and MFU, padding, fp16's scale,
    and in the record the loss's own figures and the system's (lib.records.monitor.SystemMonitor).
    `window`: the tokens seen and the time at the last line (updated here)."""
    from lib.records.monitor import peak_memory_gib
    from lib.progress import write

    cfg, loop, accelerator = run.cfg, run.loop, run.accelerator
    now = time.perf_counter()
    tps = (loop.tokens_seen - window["tokens"]) / max(now - window["t"], 1e-9)
    window.update(tokens=loop.tokens_seen, t=now)
    loss = float(accelerator.reduce(loop.window.loss, reduction="sum")) / max(loop.window.tokens, 1)
    pad_frac = loop.window.pad / max(loop.window.slots, 1)
    loop.window.reset()
    extra = run.objective.take_logged()
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)  # shown at its next redraw
    if run.is_main:
        fp16 = fp16_state(run)
        utilization = mfu(tps)
        sampled = run.system is not None and (loop.step // cfg.log_every) % cfg.monitor.every == 0
        padding = f" | padding {pad_frac:.1%}" if cfg.data.packing != "pack" else ""
        scaling = f" | loss scale {fp16['loss_scale']:g}, {fp16['overflow_steps']} overflow step(s)" if fp16 else ""
        write(bar, f"step {loop.step:>6}/{loop.horizon} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {grad_norm:.3f} | "
                   f"{tps:,.0f} tok/s | {tps * mfu.flops_per_token / 1e9:.1f} GFLOP/s"
                   f"{f' | MFU {utilization:.1%}' if utilization else ''}{padding}{scaling}")
        run.metrics.write({"type": "train", "step": loop.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "horizon": loop.horizon, "tokens_seen": loop.tokens_seen, "tokens_per_s": tps,
                           "padding": pad_frac, "mfu": utilization, "skipped_steps": loop.skipped_steps,
                           "elapsed_s": loop.elapsed_s(), "peak_memory_gib": peak_memory_gib(run.device)[0],
                           **extra, **fp16, **(run.system.sample() if sampled else {})})
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} at step {loop.step}; lower optim.lr or check the data")


def describe_run(run) -> None:
    """The start-up line: model, data layout, processes, batch and schedule."""
    cfg, train_data, boundary, horizon = run.cfg, run.train_data, run.boundary, run.loop.horizon
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * run.world
    if cfg.data.packing == "pack":
        layout = f"{len(train_data):,} packed blocks of {cfg.data.seq_len}" + (
            "" if boundary is None else
            f", attention within documents ({'from each bos' if boundary.begins else 'restarting after each eos'})")
    else:
        pad = train_data.padding_fraction(run.sampler.epoch_order(0), cfg.micro_batch_size)
        layout = f"{len(train_data):,} documents (pieces) padded ({cfg.data.packing}): {pad:.1%} padding"
    what = f"{cfg.model.init_from} (from it)" if cfg.model.init_from else f"{cfg.model.arch} (new)"
    run.say(f"model: {what} {run.n_params / 1e6:.2f}M params | data: {train_data.n_tokens:,} train tokens, "
            f"{layout} | {run.world} process(es), precision {run.choice.name} | "
            f"{rows_per_step} sequences of <= {cfg.data.seq_len} tokens per optimizer step, "
            f"{horizon} steps ({rows_per_step * horizon / len(train_data):.2f} epochs)"
            + (" at most: the learning rate follows the budget's clock, at its floor when the training time is "
               "spent" if run.loop.clock else ""))
    if cfg.max_minutes and not run.loop.clock and run.resume_from is None:
        run.say(f"the schedule spans {horizon} steps; the {cfg.max_minutes:g} minute budget only stops the run"
                + (" (--deterministic: a learning rate on the clock would differ between runs; "
                   "--fit_schedule True to follow the clock anyway)" if cfg.deterministic and cfg.fit_schedule is None
                   else ""))


def fit_micro_batch(run) -> None:
    """--fit_micro_batch: halve cfg.micro_batch_size (doubling grad_accum_steps) until a step fits."""
    import torch

    from lib.train.memory import fit_micro_batch as fit

    cfg, accelerator = run.cfg, run.accelerator

    def trial(n: int) -> None:  # one forward+backward on n sequences; nothing is applied
        batch = run.train_data.make_batch(list(range(min(n, len(run.train_data)))), run.boundary)
        labels = torch.from_numpy(batch.labels).to(accelerator.device)
        accelerator.backward(loss_sum(run, run.call, batch, labels)[0] * 0)
        run.optimizer.zero_grad(set_to_none=True)

    fitted = fit(trial, cfg.micro_batch_size, cfg.grad_accum_steps, accelerator.device, say=accelerator.print)
    if fitted != (cfg.micro_batch_size, cfg.grad_accum_steps):
        accelerator.print(f"micro_batch_size {cfg.micro_batch_size} -> {fitted[0]}, grad_accum_steps "
                          f"{cfg.grad_accum_steps} -> {fitted[1]} (the same sequences per optimizer step)")
    cfg.micro_batch_size, cfg.grad_accum_steps = fitted
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps


if __name__ == "__main__":
    main()
