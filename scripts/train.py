#!/usr/bin/env python
"""Train a causal language model with Accelerate: the whole loop, top to bottom, in this file.

    python scripts/train.py --config configs/train/default.yaml
    accelerate launch --config_file configs/accelerate/cpu.yaml scripts/train.py --config ...

Writes runs/<run_name>/: config.yaml (resolved), provenance.json, metrics.jsonl, checkpoints/
(resumable with --resume auto), final/ (a Hugging Face model and tokenizer), loss.png, report.md,
and samples.txt with --sample_every. On a folder of preference pairs (tokenize.py on chosen/rejected
records) it tunes --model.init_from with --preference.name (dpo, ipo, simpo) against that starting
model, and writes reference_logps.npz too.
"""
from __future__ import annotations

import os
import sys

# Python puts this file's folder first on sys.path, where scripts/tokenize.py would shadow the
# standard library's `tokenize` for everything imported after it: use the repo root instead.
_here = os.path.dirname(os.path.realpath(__file__))
_root = _here
while not os.path.isfile(os.path.join(_root, "lib", "__init__.py")) and _root != os.path.dirname(_root):
    _root = os.path.dirname(_root)
sys.path[:] = [_root] + [p for p in sys.path if os.path.realpath(p or os.curdir) != _here]

# torch, accelerate and transformers are imported inside the functions that use them: the
# environment --deterministic sets must be in place before torch starts (runtime.prepare_environment),
# and --help stays fast. Nothing imported at the top imports them.
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Literal, Optional  # noqa: E402

import numpy as np  # noqa: E402

from lib import config as config_lib  # noqa: E402
from lib import errors, plugins  # noqa: E402
from lib.data.batches import Batch, BlockSampler, DataConfig, DocBoundary, PaddedDocs, TokenBlocks  # noqa: E402
from lib.data.batches import build_train_data, load_doc_tables, load_masks, load_split, tokens_dir  # noqa: E402
from lib.data.batches import verify_shards  # noqa: E402
from lib.data import mixture  # noqa: E402
from lib.data.mixture import MixedBlocks, MixtureSampler, Source  # noqa: E402
from lib.data.corpus import iter_records, read_manifest  # noqa: E402
from lib.data.pairs import PairBatch, PairRows  # noqa: E402
from lib.data.tokenizer import TextTokenizer, has_tokenizer, load_hf_tokenizer  # noqa: E402
from lib.errors import UserError, exit_on_user_error, where_am_i  # noqa: E402
from lib.files import atomic_file, atomic_text, ensure_writable, write_json  # noqa: E402
from lib.model import export, lora, registry, tasks  # noqa: E402
from lib.model.build import ModelConfig, build_model, check_data_fits, count_params, flops_per_token  # noqa: E402
from lib.model.build import folder_positions, matmul_dims  # noqa: E402
from lib.model.evaluate import HeldOutSample, held_out_sample, token_byte_lengths  # noqa: E402
from lib.model.generate import greedy_continuations  # noqa: E402
from lib.model.lora import LoraOptions  # noqa: E402
from lib.model.loss import LOSSES, LossConfig, TokenLoss, build_loss, step_scaled_loss  # noqa: E402
from lib.model.preference import PREFERENCE_LOSSES, PairObjective, PreferenceOptions  # noqa: E402
from lib.model.preference import batch_scores, reference_logps, rows_summary  # noqa: E402
from lib.progress import progress, write as write_line  # noqa: E402
from lib.records import checkpoint as ckpt  # noqa: E402
from lib.records import run_folder, tracking  # noqa: E402
from lib.records.metrics import METRICS, MetricsSink, parse_formats, read_jsonl, truncate_after_step  # noqa: E402
from lib.records.monitor import MonitorConfig, SystemMonitor, peak_memory_gib  # noqa: E402
from lib.records.provenance import provenance  # noqa: E402
from lib.records.report import plot_metrics, write_run_report  # noqa: E402
from lib.records.tracking import Tracker, TrackingConfig  # noqa: E402
from lib.train import budget, memory, runtime  # noqa: E402
from lib.train.actions import ACTIONS, ActionsConfig, Periodic  # noqa: E402
from lib.train.distributed import broadcast_from_main  # noqa: E402
from lib.train.faults import Faults  # noqa: E402
from lib.train.flops import MfuMeter  # noqa: E402
from lib.train.loop_state import LoopState  # noqa: E402
from lib.train.optim import OPTIMIZERS, SCHEDULES, OptimConfig, build_optimizer, lr_at, lr_at_progress  # noqa: E402
from lib.train.optim import set_lr, state_numel  # noqa: E402
from lib.train.precision import Choice, model_matmul_shapes, recorded as recorded_precision  # noqa: E402
from lib.train.preemption import EXIT_STOPPED, StopRequests  # noqa: E402
from lib.train.sizing import size_run  # noqa: E402

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lib.model.fused_loss import FusedHead

RUN_FILES = ("config.yaml", "provenance.json", "metrics.jsonl", "loss.png", "report.md", "samples.txt")  # to MLflow


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
    preference: PreferenceOptions = field(default_factory=PreferenceOptions)
    """The objective on a folder of preference pairs (data.dir), which tunes model.init_from: each
    pair counts once in a step's loss, micro_batch_size counts pairs (two rows each), and the
    reference is the starting model (lib/model/preference.py)."""
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
    sample_every: int = 0
    """Every this many optimizer steps, and after the last one, continue the sample prompts greedily:
    the continuations go to the log, the run's samples.txt (every step's, oldest first) and
    metrics.jsonl (records of type "sample"; samples.txt goes to MLflow at the end). 0: never."""
    sample_prompts: tuple[str, ...] = ()
    """What the samples continue; default: the first tokens of the first three held-out documents
    (of a conversation, its prompt: what comes before the first answer)."""
    sample_tokens: int = 48
    """Tokens each sample continues its prompt by, at most (it ends at the end-of-text token)."""
    tasks: tuple[str, ...] = ()
    """lm-evaluation-harness tasks to run on the model after the last step, and every tasks_every
    steps: one record per task (type "task", its figures as task_<task>_<metric>) in metrics.jsonl,
    MLflow and loss.png. The main process runs them; not with FSDP. `make lm-eval` installs the
    harness."""
    tasks_dir: Optional[Path] = None
    """A folder of task YAML files for --tasks, with local data files (as eval.py --tasks_dir)."""
    tasks_every: int = 0
    """Run --tasks every this many optimizer steps too (0: after the last step only). With a time
    budget their time is measured at each run and kept for the one at the end; run only at the end,
    it is not known beforehand, and the budget can overrun by that much."""
    allow_task_code: bool = False
    """Let the task YAML files of --tasks_dir run the Python code they name (`!function`)."""
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
    """torch.compile the model each step calls: the first steps compile (tens of seconds on a CPU,
    and again after a resume; inside a time budget, which the schedule follows), then steps run
    faster. Evaluations and samples run the model uncompiled."""
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
    RETIRED = ("debug_stall", "debug_nan_step")  # options since removed, read from older config.yaml files


SECTIONS = {"loss": LOSSES, "optim": (OPTIMIZERS, SCHEDULES), "actions": ACTIONS}  # sections plugins add options to


@dataclass
class Data:
    """The tokenized data the run reads (load_data)."""
    manifest: dict  # the token shards' manifest.json (of the first source of a mixture)
    tokens_dir: Path
    train: TokenBlocks | PaddedDocs | MixedBlocks | PairRows  # packed blocks, documents padded into rows
    # (--data.packing), a mixture's blocks, or preference pairs
    boundary: Optional[DocBoundary]  # where documents meet (position ids restart there), or None
    held_out: HeldOutSample | PairRows  # what every evaluation scores: held-out windows (the first source's, of
    # a mixture), or every held-out preference pair
    sample_prompts: list[list[int]]  # token ids the samples continue (--sample_every)
    tokenizer: Path  # the folder of the tokenizer the data was encoded with
    content_hash: str  # what checkpoints name the data by: the manifest's, or the mixture's (lib/data/mixture.py)
    sources: list[Source] = field(default_factory=list)  # --data.mix: its sources; empty for one dataset
    held_out_by_source: dict = field(default_factory=dict)  # --data.mix: each source's name -> its HeldOutSample

    @property
    def pairs(self) -> bool:
        return isinstance(self.train, PairRows)


@dataclass
class Model:
    """The model and what trains it (build)."""
    prepared: torch.nn.Module  # the model as Accelerate prepared it: what checkpoints save
    forward: torch.nn.Module  # what each step calls: `prepared`, or torch.compile of it (--compile)
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper of --optim.name's optimizer
    objective: TokenLoss | PairObjective  # the training loss, --loss.name (lib/model/loss.py LOSSES), or on
    # preference pairs --preference.name (lib/model/preference.py)
    fused: Optional[FusedHead]  # the output layer computed with the loss in chunks (--fused_loss), or None
    n_params: int  # of the model before LoRA
    flops_per_token: float  # of a training step (forward and backward), for MFU
    base_sha: Optional[str]  # LoRA: the sha256 of the frozen base's weights, which checkpoints name


@dataclass
class Run:
    """What the loop works on, built once set-up is done (open_run); a periodic action's function
    gets it (lib/train/actions.py)."""
    cfg: TrainConfig
    accelerator: Accelerator
    precision: Choice  # the precision chosen, and why
    started: float  # time.perf_counter() at the process's start: the budget counts from it
    data: Data
    model: Model
    run_dir: Path
    resume_from: Optional[Path]  # the checkpoint this part of the run started from
    sampler: BlockSampler  # which blocks each step draws: seeded, resumable
    loop: LoopState  # step, tokens, the schedule's progress, the logging window: what a checkpoint restores
    jobs: Periodic  # the periodic jobs' measured costs (the budget charges them), and plugins' actions
    metrics: Optional[MetricsSink]  # metrics.jsonl and its tables (main process only)
    tracker: Optional[Tracker]  # the MLflow mirror (main process, tracking on)
    system: Optional[SystemMonitor]  # CPU, memory and GPU figures (main process, --monitor.every)
    faults: Faults  # what tests inject (lib/train/faults.py); nothing otherwise
    stopped_early: bool = False  # a spent budget or --stop_at_step ended it before the schedule's end

    @property
    def say(self):
        return self.accelerator.print

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The trained model without Accelerate's wrappers (evaluation, samples, the export)."""
        return self.accelerator.unwrap_model(self.model.prepared)

    @property
    def uses_lora(self) -> bool:
        return lora.enabled(self.cfg.lora)


@exit_on_user_error
def main() -> None:
    # a time budget is the command's wall time: start-up counts in it, the interpreter's and the
    # imports' too when this file is the program (not when a test calls main() in its own process)
    started = time.perf_counter() - (process_age_s() if __name__ == "__main__" else 0.0)
    cfg = parse_config()
    accelerator, precision = start(cfg)
    data = load_data(cfg, accelerator)
    model = build(cfg, accelerator, data)
    run = open_run(cfg, accelerator, precision, started, data, model)
    if data.pairs:
        attach_reference(run)
    train(run)
    finish(run)


# ---- options -------------------------------------------------------------------------------------

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


def check_options(cfg: TrainConfig) -> None:
    """Values no run can use, refused before anything is read or written (a UserError naming the
    option)."""
    rules = [("max_steps", cfg.max_steps >= 1, "at least 1"), ("micro_batch_size", cfg.micro_batch_size >= 1,
             "at least 1"), ("grad_accum_steps", cfg.grad_accum_steps >= 1, "at least 1"),
             ("keep_last_n", cfg.keep_last_n >= 1, "at least 1"), ("optim.lr", cfg.optim.lr >= 0, "0 or more"),
             ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "0 or more"),
             ("optim.warmup_fraction", cfg.optim.warmup_fraction is None or 0 <= cfg.optim.warmup_fraction < 1,
              "from 0 up to (not including) 1, or None"),
             ("max_minutes", cfg.max_minutes is None or cfg.max_minutes > 0, "more than 0"),
             ("eval_tokens", cfg.eval_tokens is None or cfg.eval_tokens >= 1, "at least 1, or None"),
             ("data.seq_len", cfg.data.seq_len >= 2, "at least 2"),
             ("dist_timeout_minutes", cfg.dist_timeout_minutes > 0, "more than 0"),
             ("sample_tokens", cfg.sample_tokens >= 1, "at least 1")]
    rules += [(name, getattr(cfg, name) >= 0, "0 or more (0: never)")
              for name in ("eval_every", "checkpoint_every", "sample_every", "tasks_every")]
    rules += [("log_every", cfg.log_every >= 1, "at least 1"), ("monitor.every", cfg.monitor.every >= 0, "0 or more")]
    for name, ok, need in rules:
        if not ok:
            value = cfg
            for part in name.split("."):
                value = getattr(value, part)
            raise UserError(f"--{name} {value}: must be {need}")
    if cfg.tasks_every and not cfg.tasks:
        raise UserError(f"--tasks_every {cfg.tasks_every}: name the tasks to run with --tasks")
    if cfg.data.mix:  # each source a tokenized dataset, all in one tokenizer: data.dir is the first
        sources = mixture.parse_mix(cfg.data.mix)
        given = config_lib.flag_value(sys.argv[1:], "data.dir")
        if given is not None and Path(given) != sources[0].dir:
            raise UserError(f"--data.dir {given} with --data.mix: the mixture names every source; leave --data.dir out")
        if cfg.data.packing != "pack":
            raise UserError(f"--data.mix trains on packed blocks, not --data.packing {cfg.data.packing}: drop the option")
        mixture.check_sources(sources)
        cfg.data.dir = str(sources[0].dir)
    if cfg.tasks:  # the harness installed, each task found and readable offline: before any training

        task_manager(cfg.tasks, cfg.tasks_dir, cfg.allow_task_code)
    parse_formats(cfg.metrics_out)
    run_folder.check_name(cfg.run_name)  # one folder name inside runs_dir: nothing else can be written or removed
    run_folder.refuse_unless_run(cfg.runs_dir / cfg.run_name)  # a file, or a folder no run wrote: refused before any work
    tracking.effective_uri(cfg.tracking, cfg.runs_dir)  # --tracking.uri env without MLFLOW_TRACKING_URI: refused now
    SCHEDULES.get(cfg.optim.schedule, "--optim.schedule")  # a name no built-in or loaded plugin provides
    OPTIMIZERS.get(cfg.optim.name, "--optim.name")
    LOSSES.get(cfg.loss.name, "--loss.name")
    PREFERENCE_LOSSES.get(cfg.preference.name, "--preference.name")


# ---- set-up: processes, data, model, run folder ---------------------------------------------------

def start(cfg: TrainConfig) -> tuple[Accelerator, Choice]:
    """Processes, threads and precision. With --size_to_budget the model is sized first
    (lib/train/sizing.py), since the precision probe times the model's own matrix products."""
    runtime.prepare_environment(cfg.deterministic)  # read when MKL and cuBLAS start: before torch

    manifest = read_manifest(tokens_dir(cfg.data.dir), "tokens")
    sized = []

    def shapes(state):  # the model sized to the budget first, then its products
        sized.append(size_run(cfg, sys.argv[1:], state))
        return model_matmul_shapes(*matmul_dims(cfg.model, manifest["vocab_size"]),
                                   cfg.micro_batch_size * cfg.data.seq_len)

    # a resumed run keeps the precision it chose at its start: a probe never switches it midway
    kept = recorded_precision(cfg.runs_dir / cfg.run_name, "chose at its start") if cfg.resume else None
    accelerator, precision = runtime.start(cfg.precision, shapes, grad_accum_steps=cfg.grad_accum_steps,
                                           fp16_init_scale=cfg.fp16_init_scale, threads=cfg.threads,
                                           deterministic=cfg.deterministic, keep_freed_memory=cfg.keep_freed_memory,
                                           timeout_minutes=cfg.dist_timeout_minutes, kept=kept)
    if sized[0]:
        accelerator.print(sized[0])
    if accelerator.is_main_process:
        tracking.preload(cfg.tracking)  # MLflow's import overlaps the set-up below, not the first steps
    if cfg.keep_best and (not cfg.eval_every or not cfg.checkpoint_every or cfg.checkpoint_every % cfg.eval_every):
        accelerator.print(f"warning: --keep_best compares checkpoints written at evaluation steps; with checkpoint_every "
                          f"{cfg.checkpoint_every} and eval_every {cfg.eval_every} only the final checkpoint has a "
                          "held-out loss")
    if cfg.tasks and cfg.max_minutes and not cfg.tasks_every:
        accelerator.print("warning: --tasks run only after the last step: the budget cannot keep time for them "
                          "before it has measured them once (--tasks_every N measures them during the run)")
    ensure_writable(cfg.runs_dir, "--runs_dir")
    return accelerator, precision


def load_data(cfg: TrainConfig, accelerator: Accelerator) -> Data:
    """Training blocks, a held-out sample that is the same at every evaluation, and the prompts
    the samples continue; every shard verified first. With --data.mix, each source's blocks and
    held-out sample, the blocks drawn as one mixture."""
    sources = mixture.parse_mix(cfg.data.mix) if cfg.data.mix else []
    if not sources and read_manifest(tokens_dir(cfg.data.dir), "tokens").get("pairs"):
        return load_pairs(cfg, accelerator)
    if given := [a for a in sys.argv[1:] if a.startswith("--preference.")]:
        raise UserError(f"{given[0]}: applies to preference pairs, and {cfg.data.dir} holds none (tokenize.py makes a "
                        "pairs folder from chosen/rejected records)")
    parts = [load_source(cfg, Path(s.dir), accelerator) for s in sources] or [load_source(cfg, Path(cfg.data.dir), accelerator)]
    manifest, tok_dir, train, held_out, val = parts[0]
    tokenizer = (tok_dir / manifest["tokenizer_dir"]).resolve()
    boundary = DocBoundary.of(manifest["special_ids"]) if cfg.data.doc_mask else None
    if cfg.data.doc_mask and boundary is None:
        accelerator.print("note: the tokenizer has neither bos nor eos, so nothing marks where documents meet: "
                          "attention spans them")
    prompts = sample_prompts(cfg, tokenizer, manifest, *val) if cfg.sample_every else []
    if not sources:
        return Data(manifest, tok_dir, train, boundary, held_out, prompts, tokenizer, manifest["content_hash"])
    return Data(manifest, tok_dir, MixedBlocks([p[2] for p in parts]), boundary, held_out, prompts, tokenizer,
                mixture.mixture_hash(sources, [p[0] for p in parts]), sources,
                {s.name: p[3] for s, p in zip(sources, parts)})


def load_source(cfg: TrainConfig, data_dir: Path, accelerator: Accelerator):
    """One dataset folder: (its manifest, its tokens folder, its training blocks, its held-out
    sample, (its held-out tokens, documents, loss mask))."""
    tok_dir = tokens_dir(data_dir)
    manifest = read_manifest(tok_dir, "tokens")
    if manifest.get("pairs"):  # trained as documents, its rejected answers would be learned too
        raise UserError(f"{data_dir} holds preference pairs (chosen and rejected answers), which do not mix with text: "
                        "train on it alone (--data.dir), or tokenize the chosen conversations as messages")
    verify_shards_on_main(tok_dir, manifest, accelerator)
    val_tokens, val_docs = load_split(tok_dir, "val")
    tokenizer = (tok_dir / manifest["tokenizer_dir"]).resolve()
    val_masks = load_masks(tok_dir, "val")  # conversations: the assistant's tokens alone are scored
    mask = None if val_masks is None else np.concatenate(val_masks)
    held_out = held_out_sample(val_tokens, val_docs, cfg.data.seq_len, cfg.eval_tokens,
                               token_byte_lengths(tokenizer) if has_tokenizer(tokenizer) else None, seed=0, mask=mask)
    if val_masks is not None:
        warn_long_conversations(cfg, tok_dir, manifest, accelerator.print)
    return (manifest, tok_dir, build_train_data(tok_dir, cfg.data, manifest["special_ids"]), held_out,
            (val_tokens, val_docs, mask))


def load_pairs(cfg: TrainConfig, accelerator: Accelerator) -> Data:
    """A folder of preference pairs (lib/data/pairs.py): the training pairs and every held-out pair,
    each row its first seq_len tokens, verified first; the samples continue held-out prompts."""
    tok_dir = tokens_dir(cfg.data.dir)
    manifest = read_manifest(tok_dir, "tokens")
    if cfg.loss.name != "cross_entropy":
        raise UserError(f"--loss.name {cfg.loss.name}: {cfg.data.dir} holds preference pairs, which train with "
                        "--preference.name (dpo, ipo, simpo); drop --loss.name")
    verify_shards_on_main(tok_dir, manifest, accelerator)
    special = manifest["special_ids"]
    pad = special["pad"] if special.get("pad") is not None else special["eos"]
    train, held_out = (PairRows(tok_dir, split, cfg.data.seq_len, pad) for split in ("train", "val"))
    if train.cut:
        accelerator.print(f"warning: {train.cut} training pair(s) left out: a response starts past --data.seq_len "
                          f"{cfg.data.seq_len} (rows keep their first seq_len tokens); raise it to train on them")
    tokenizer = (tok_dir / manifest["tokenizer_dir"]).resolve()
    prompts = []
    if cfg.sample_every:  # the chosen rows' prompts (documents 0, 2, 4: each pair is two)
        val_tokens, val_docs = load_split(tok_dir, "val")
        mask = np.concatenate(load_masks(tok_dir, "val"))
        prompts = sample_prompts(cfg, tokenizer, manifest, val_tokens, val_docs, mask, every=2)
    return Data(manifest, tok_dir, train, None, held_out, prompts, tokenizer, manifest["content_hash"])


def build(cfg: TrainConfig, accelerator: Accelerator, data: Data) -> Model:
    """The model (built from config or loaded from init_from, LoRA applied), its loss and
    optimizer, both prepared by Accelerate, and what each step calls: compiled or not. The same
    seed in every process: identical initial weights."""
    import torch
    from accelerate.utils import set_seed

    from lib.model.fused_loss import FusedHead

    say, sharded = accelerator.print, runtime.is_sharded(accelerator)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    if cfg.model.init_from:  # the data must be in the model's tokens, in sequences it has positions for
        check_data_fits(cfg.model.init_from, data.manifest, cfg.data.seq_len)
    elif data.pairs:
        raise UserError(f"{cfg.data.dir} holds preference pairs, which tune a model: name it with --model.init_from "
                        "(an instruction-tuned one, such as make sft's runs/sft/final)")
    elif cfg.data.seq_len > cfg.model.max_seq_len:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if OPTIMIZERS.meta(cfg.optim.name, "whole_matrices", False) and sharded:
        raise UserError(f"--optim.name {cfg.optim.name} does not combine with FSDP here (its update needs whole "
                        "matrices, which FSDP shards): launch with DDP or one process, or use --optim.name adamw")
    if cfg.tasks and sharded:
        raise UserError("--tasks during training does not combine with FSDP here (the harness runs the model in one "
                        "process): launch with DDP, or run eval.py --tasks on the final model")
    if cfg.lora.quantize == "4bit":  # QLoRA: the frozen base in 4 bits, quantized as it loads
        lora.check_quantize(cfg.lora, cfg.model.init_from or "")
        if sharded:
            raise UserError("--lora.quantize 4bit does not combine with FSDP here: launch with DDP or one process")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        model = lora.load_4bit_base(cfg.model.init_from, dtype, accelerator.device)
        say(f"base held in 4-bit NF4 (bitsandbytes), computing in {dtype}")
    else:
        model = build_model(cfg.model, data.manifest["vocab_size"], data.manifest["special_ids"])
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        say("activation checkpointing: on (activations recomputed in the backward pass)")
    attention = cfg.attention if cfg.attention != "auto" else (
        "eager" if cfg.compile and accelerator.device.type == "cpu" else "sdpa")
    if hasattr(model, "set_attention"):  # the project's own model (lib/model/gpt.py, or --model.file's copy)
        model.set_attention(attention)
    elif attention != model.config._attn_implementation:
        model.set_attn_implementation(attention)
    n_params, base_sha = count_params(model), None
    if lora.enabled(cfg.lora):
        model = lora.apply(model, cfg.lora)
        n_train = count_params(model, trainable_only=True)
        say(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {', '.join(lora.adapted_modules(model))}: {n_train:,} "
            f"trainable of {n_params + n_train:,} parameters ({n_train / (n_params + n_train):.2%}); "
            f"checkpoints hold {'every weight, sharded (FSDP)' if sharded else 'the adapters only'}")
        base_sha = lora.base_fingerprint(cfg.model.init_from)  # checkpoints name their base
    objective = PairObjective(cfg.preference) if data.pairs else build_loss(cfg.loss)
    fused_ok = cfg.fused_loss and accelerator.mixed_precision != "fp16"
    fused = FusedHead.attach(model, compiled=cfg.compile) if fused_ok and objective.fused else None
    if fused_ok and not objective.fused and not data.pairs:
        say(f"note: loss {cfg.loss.name} needs the full logits: the fused output layer is not used")
    pref = cfg.preference
    say(f"forward: {'torch.compile' if cfg.compile else 'eager'}, attention {attention}, loss "
        f"{'fused with the output layer' if fused is not None else 'over full logits'}"
        + (f" ({cfg.loss.name})" if cfg.loss.name != "cross_entropy" else "")
        + (f"; preference objective {pref.name}, beta {pref.beta:g}" + (f", gamma {pref.gamma:g}" if pref.name ==
           "simpo" else "") + ("" if objective.uses_reference else ", no reference") if data.pairs else ""))
    flops = flops_per_token(model, cfg.data.seq_len)  # after LoRA: a frozen weight costs no gradient
    prepared, optimizer = accelerator.prepare(model, build_optimizer(model, cfg.optim))
    if lora.enabled(cfg.lora):
        lora.save_trainable_only(accelerator, prepared)
    built = Model(prepared, torch.compile(prepared) if cfg.compile else prepared, optimizer, objective, fused,
                  n_params, flops, base_sha)
    if cfg.fit_micro_batch:
        fit_micro_batch(cfg, accelerator, data, built)
    return built


def open_run(cfg: TrainConfig, accelerator: Accelerator, precision: Choice, started: float, data: Data,
             model: Model) -> Run:
    """The run folder, now that every input has been read (this job's, continued or fresh), and
    the loop's state: fresh, or restored from a checkpoint with the sampler, weights, optimizer and
    random states; then provenance, the metrics sinks and the periodic jobs."""
    say, is_main, world = accelerator.print, accelerator.is_main_process, accelerator.num_processes
    run_dir = cfg.runs_dir / cfg.run_name
    errors.writing_to(run_dir)  # named by a disk-full error whose file is not known
    resume_from = run_folder.claim(accelerator, run_dir, cfg.resume, cfg.overwrite)
    if is_main:
        config_lib.save(cfg, run_dir / "config.yaml", describe_mixture(cfg, data, world) if data.sources else ())
    if data.sources:  # each row from the source furthest behind its share
        sampler = MixtureSampler([len(p) for p in data.train.parts], [s.weight for s in data.sources],
                                 cfg.micro_batch_size, cfg.seed, accelerator.process_index, world)
    else:
        sampler = BlockSampler(len(data.train), cfg.micro_batch_size, cfg.seed, accelerator.process_index, world)
    on_clock = bool(cfg.max_minutes and (cfg.fit_schedule if cfg.fit_schedule is not None else not cfg.deterministic))
    loop = LoopState(horizon=cfg.max_steps, device=accelerator.device,
                     clock=budget.ClockSchedule(60 * cfg.max_minutes, cfg.max_steps) if on_clock else None)
    where_am_i(lambda: f"process {accelerator.process_index} of {world}, at step {loop.step + 1}")
    if resume_from is not None:
        unwrapped = accelerator.unwrap_model(model.prepared)
        vet = (lambda st: lora.check_checkpoint(resume_from, st, unwrapped, model.base_sha,
                                                cfg.model.init_from)) if lora.enabled(cfg.lora) else None
        state = ckpt.load(accelerator, resume_from, data.content_hash, cfg.allow_data_change,
                          strict=not lora.enabled(cfg.lora), check=vet)
        sampler.load_state_dict(state["sampler"], cfg.allow_data_change)
        loop.load_state_dict(state, accelerator.process_index)
        windows = state.get("objective_windows") or []  # the objective's figures not yet logged
        if accelerator.process_index < len(windows):
            model.objective.load_window(windows[accelerator.process_index], accelerator.device)
        say(f"resumed from {resume_from} at step {loop.step}")
    metrics = tracker = system = None
    if is_main:
        record = provenance(cfg, data.manifest, accelerator, model.n_params, resume_from,
                            tracking.effective_uri(cfg.tracking, cfg.runs_dir))
        if data.sources:
            record["data"]["mix"] = [{"name": s.name, "dir": str(s.dir.resolve()), "weight": s.weight,
                                      "tokens_content_hash": read_manifest(tokens_dir(s.dir), "tokens")["content_hash"]}
                                     for s in data.sources]
            record["data"]["mixture_content_hash"] = data.content_hash
        write_json(run_dir / "provenance.json", record)
        if resume_from is not None:
            drop_records_logged_again(cfg, run_dir, loop, say)
        # MLflow mirrors what metrics.jsonl records, from a thread: local unless --tracking.uri
        tracker = tracking.start(cfg.tracking, run_dir, config_lib.to_dict(cfg), {"precision": precision.name},
                                 resumed=resume_from is not None, say=say, artifacts=RUN_FILES)
        metrics = MetricsSink(run_dir / METRICS, parse_formats(cfg.metrics_out), mirror=tracker)
        if resume_from is not None:
            metrics.refresh_tables()  # a kill may have left tables with rows past the checkpoint
            write_samples_file(run_dir)  # as metrics.jsonl now holds them
        system = SystemMonitor(accelerator.device) if cfg.monitor.every else None  # CPU, memory, GPU figures
        say(f"system metrics: {system.describe() if system else 'off (--monitor.every 0)'}"
            + (f", every {cfg.monitor.every * cfg.log_every} steps" if cfg.monitor.every > 1 else ""))
    jobs = Periodic(cfg, {  # the loop's own jobs: (interval, after the last step too, estimate before one is timed)
        "eval": (cfg.eval_every, True, estimate_evaluation),
        "samples": (cfg.sample_every, bool(cfg.sample_every), estimate_samples),
        "tasks": (cfg.tasks_every, bool(cfg.tasks), None),
        "checkpoint": (cfg.checkpoint_every, True, lambda run: max(0.1, checkpoint_bytes(run) / 2e8)),  # ~200 MB/s
    })
    run = Run(cfg, accelerator, precision, started, data, model, run_dir, resume_from, sampler, loop, jobs,
              metrics, tracker, system, Faults.from_env())
    describe_run(run)
    return run


REFERENCE = "reference_logps.npz"  # in the run folder: the preference pairs' scores under the reference


def attach_reference(run: Run) -> None:
    """Preference pairs: each pair's (chosen, rejected) log-probabilities under the reference, the
    starting model (a LoRA run's base, its adapter switched off), computed once at the run's first
    start in eval mode and kept in the run folder (16 bytes a pair, on disk and in memory), so no
    second model is held, a full fine-tune can resume (its trained weights are no longer the
    reference), and every process trains on the main process's figures. Every process scores all
    pairs (a sharded model's forward is collective). A reference-free objective (simpo) needs none."""
    cfg, data, accelerator = run.cfg, run.data, run.accelerator
    if not run.model.objective.uses_reference:
        return
    path = run.run_dir / REFERENCE
    key = {"data_content_hash": data.content_hash, "seq_len": cfg.data.seq_len, "reference": cfg.model.init_from,
           "reference_sha256": run.model.base_sha or lora.base_fingerprint(cfg.model.init_from)}
    if run.resume_from is None:
        t = time.perf_counter()
        found = {split: reference_logps(run.unwrapped, rows, cfg.micro_batch_size, run.device, accelerator.autocast)
                 for split, rows in (("train", data.train), ("val", data.held_out))}
        if run.is_main:
            with atomic_file(path, "wb") as f:
                np.savez(f, key=np.array(json.dumps(key, sort_keys=True)), **found)
        accelerator.wait_for_everyone()
        run.say(f"reference: {len(data.train) + len(data.held_out):,} pairs scored under {cfg.model.init_from} in "
                f"{time.perf_counter() - t:.1f} s -> {path} (what every later step compares with)")
    elif not path.is_file():
        raise UserError(f"{path} is missing: the pairs' reference log-probabilities, scored when the run began, are "
                        "gone, and a resumed model is no longer the reference; start over with --overwrite")
    with np.load(path) as stored:
        if str(stored["key"]) != json.dumps(key, sort_keys=True):
            raise UserError(f"{path} was scored for other data or another starting model than this run's "
                            f"({stored['key']}); start over with --overwrite")
        data.train.reference, data.held_out.reference = stored["train"], stored["val"]


# ---- the loop ------------------------------------------------------------------------------------

def train(run: Run) -> None:
    """One iteration is one optimizer step, then the periodic jobs due after it. The last step (the
    schedule's end, a spent budget, --stop_at_step) runs the final evaluation, samples, tasks and
    checkpoint. A stop request (SIGTERM, Ctrl-C) finishes the step, checkpoints and exits."""
    import torch

    cfg, loop, model, accelerator = run.cfg, run.loop, run.model, run.accelerator
    stops = StopRequests()  # SIGTERM, Ctrl-C: finish the step, checkpoint, exit (a second one: at once)
    bar = progress(total=loop.horizon, initial=loop.step, disable=not run.is_main, desc="train", unit="step")
    mfu = MfuMeter(run.device, model.flops_per_token, run.world, enabled=cfg.mfu and run.is_main, say=run.say)
    clock = budget.StepClock()  # optimizer steps' seconds: the budget's pace
    window = {"tokens": loop.tokens_seen, "t": time.perf_counter()}  # what the next log line's rate counts from
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")  # the norm is always computed
    # a resumed run that had ended takes no step: it redoes its final jobs (its evaluation), in no
    # time of the run's
    last = loop.done
    loop.started_at = run.started if not last else time.perf_counter()

    def due(every: int) -> bool:  # a periodic job after this step: on its interval, and after the last step
        return last or (every > 0 and loop.step % every == 0)

    model.prepared.train()
    while True:
        if not last:
            lr, last = next_learning_rate(run, clock)  # last: the schedule's end, by its steps or its clock
            clock.start()
            sample_ids = [run.sampler.next_batch() for _ in range(cfg.grad_accum_steps)]
            batches = [run.data.train.make_batch(ids, run.data.boundary) for ids in sample_ids]
            # the step's loss is a mean over all processes' micro-batches: every target token (every
            # preference pair) weighs 1/step_weight, however the step is split
            step_weight, step_tokens = (int(n) for n in accelerator.reduce(
                torch.tensor([[b.weight, b.n_targets] for b in batches], device=run.device).sum(0), "sum"))
            step_loss = torch.zeros((), device=run.device)
            for batch in batches:
                with accelerator.accumulate(model.prepared):  # gradients are all-reduced on the last micro-batch
                    loss = loss_sum(run, batch)
                    accelerator.backward(step_scaled_loss(loss, step_weight, run.world, cfg.grad_accum_steps))
                step_loss += loss.detach()
            grad_norm = float(accelerator.clip_grad_norm_(model.forward.parameters(), clip))
            bad = non_finite(run, step_loss, grad_norm, sample_ids)  # stops the run, or names what skips the update
            if not bad:
                set_lr(model.optimizer, lr)
                scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
                model.optimizer.step()  # fp16: the scaler skips it when a gradient overflowed, then lowers its scale
                # (Accelerate's optimizer_step_was_skipped misses skips inside a fused AdamW kernel)
                loop.overflow_steps += scale is not None and accelerator.scaler.get_scale() < scale
            model.optimizer.zero_grad(set_to_none=True)
            loop.count_step(step_tokens, batches, None if bad else step_loss, weight=step_weight)
            clock.stop()
            bar.total = loop.horizon
            bar.update(1)
            if loop.step % cfg.log_every == 0 or last:
                log_step(run, bar, window, mfu, grad_norm, lr)
            last = last or stop_reason(run, lr)
        if last:
            bar.close()
            loop.stop_timing()
        # the periodic jobs, each timed: the budget keeps time for those due after the next step and at the end
        pace = clock.steady
        if due(cfg.eval_every):
            with run.jobs.timed("eval", pace):
                evaluate(run)
        if cfg.sample_every and due(cfg.sample_every):
            with run.jobs.timed("samples", pace):
                write_samples(run)
        if cfg.tasks and due(cfg.tasks_every):
            with run.jobs.timed("tasks", pace):
                run_tasks(run)
        if due(cfg.checkpoint_every):
            with run.jobs.timed("checkpoint", pace):
                save_checkpoint(run)
        run.jobs.run_actions(run, loop.step, last, pace)  # what plugins registered (lib/train/actions.py)
        if last:
            break
        signalled = stops.agreed(accelerator)  # the same answer on every process
        if signalled:
            stop_and_exit(run, bar, signalled)


def finish(run: Run) -> None:
    """After the last step's jobs: the replicas' agreement, the final record, the exported model,
    the plot and the report."""
    cfg, loop, accelerator, manifest = run.cfg, run.loop, run.accelerator, run.data.manifest
    in_sync = runtime.replicas_identical(accelerator, run.unwrapped)
    if run.world > 1 and in_sync is not None:
        run.say(f"weights identical on all {run.world} processes: {in_sync}")
    drawn = {}  # a mixture: each source's share of the rows drawn (so of the tokens), counted by the sampler
    if run.data.sources:
        drawn = {s.name: (share, passes) for s, share, passes in
                 zip(run.data.sources, run.sampler.shares(), run.sampler.passes())}
        run.say("training tokens by source, as drawn: " + ", ".join(
            f"{name} {share:.2%} (weight {s.weight:.2%}, {passes:.2f} passes)"
            for s, (name, (share, passes)) in zip(run.data.sources, drawn.items())))
        for s, (share, passes) in zip(run.data.sources, drawn.values()):
            if passes > mixture.MANY_PASSES:
                run.say(f"warning: {s.dir} was repeated {passes:.0f} times: past about {mixture.MANY_PASSES} passes "
                        "repeated tokens teach little; add text to it or lower its weight")
    if run.metrics:
        run.metrics.write({"type": "final", "step": loop.step, "world_size": run.world, "replicas_identical": in_sync,
                           "skipped_steps": loop.skipped_steps, "tokens_seen": loop.tokens_seen,
                           **fp16_state(run), **{f"mix_share_{n}": v[0] for n, v in drawn.items()},
                           **{f"mix_passes_{n}": v[1] for n, v in drawn.items()}})
    train_peak = peak_memory_gib(run.device)[0]  # the export below may hold a second copy of the model
    export.final_model(accelerator, run.model.prepared, run.run_dir / "final", run.data.tokens_dir, run.model.fused,
                       cfg.lora if run.uses_lora else None,
                       rebuild=lambda: build_model(cfg.model, manifest["vocab_size"], manifest["special_ids"]),
                       base_dir=cfg.model.init_from, probe_ids=(run.data.held_out.make_batch([0]).input_ids if
                                                                run.data.pairs else run.data.held_out.inputs[:2]),
                       trained_len=None if cfg.model.init_from else cfg.data.seq_len)
    if run.is_main:
        best = ckpt.best_checkpoint(run.run_dir) if cfg.keep_best else None
        if best is not None:
            run.say(f"best checkpoint by held-out loss: {best}")
        run.metrics.close()
        plot_metrics(run.run_dir)
        fitted = f", the learning rate on a {cfg.max_minutes:g} minute budget's clock" if loop.clock else ""
        write_run_report(run.run_dir, cfg.run_name, [
            f"model: {cfg.model.arch}, {run.model.n_params / 1e6:.2f}M parameters, seq_len {cfg.data.seq_len}",
            f"precision: {run.precision.name} ({run.precision.reason})",
            f"steps: {loop.step} of {loop.horizon}{' (stopped early)' if run.stopped_early else ''}{fitted}, "
            f"{loop.tokens_seen:,} tokens in {loop.elapsed_s() / 60:.1f} min of training (all parts of the run), "
            f"{loop.tokens_seen / max(loop.elapsed_s(), 1e-9):,.0f} tokens/s", *mixture_facts(run, drawn)],
            loop.last_eval["figures"], "the mixture by its weights" if drawn else run.data.held_out.description)
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


def mixture_facts(run: Run, drawn: dict) -> list[str]:
    """report.md's lines on a mixture: each source's weight, share drawn and last held-out figures."""
    last = run.loop.last_eval.get("by_source") or {}
    return [f"source {s.name} ({s.dir}): weight {s.weight:.2%}, drawn {share:.2%} of the training tokens, "
            f"{passes:.2f} passes" + (f"; held-out bits/byte {last[s.name]['bits_per_byte']:.4f}, loss "
                                      f"{last[s.name]['loss']:.4f}" if "bits_per_byte" in last.get(s.name, {}) else "")
            for s, (share, passes) in zip(run.data.sources, drawn.values())]


# ---- what the loop calls, in the order it first calls it -------------------------------------------

def next_learning_rate(run: Run, clock: budget.StepClock) -> tuple[float, bool]:
    """The learning rate of the step about to run, and whether it is the schedule's last: by the
    step count (lib.train.optim.lr_at), or on a time budget's clock (lib/train/budget.py), where
    the main process's clock decides for every process."""
    cfg, loop = run.cfg, run.loop
    if loop.clock is None:
        return lr_at(loop.step, loop.horizon, cfg.optim), loop.step + 1 >= loop.horizon
    schedule = loop.clock
    if schedule.warm_end is None and cfg.optim.warmup_fraction is None and loop.step >= cfg.optim.warmup_steps:
        schedule.warm_end = schedule.progress
    final_s = final_work_seconds(run, clock.steady)
    last = schedule.advance(loop.step, loop.elapsed_s(), clock.pace, final_s,
                            between_s=run.jobs.due_seconds(run, loop.step + 1, clock.steady), worst_s=clock.worst)
    if run.world > 1:
        schedule.start_s, schedule.progress, schedule.warm_end, last = broadcast_from_main(
            (schedule.start_s, schedule.progress, schedule.warm_end, last), run.accelerator)
    loop.horizon = loop.step + 1 if last else schedule.projected_steps(loop.step, loop.elapsed_s(), final_s)
    return lr_at_progress(loop.step, schedule.progress, cfg.optim, schedule.warm_end), last


def final_work_seconds(run: Run, pace: float) -> float:
    """What follows the last step, at the step time `pace`: the jobs due then (the final
    evaluation and checkpoint, plugins' actions), and the exported model, which costs about a
    checkpoint's writing again for the weights and once more for checking them, plus half a second
    for the plot and the report."""
    return run.jobs.final_seconds(run, pace) + 2 * run.jobs["checkpoint"].cost(run, pace) + 0.5


def loss_sum(run: Run, batch: Batch) -> torch.Tensor:
    """The training objective of one micro-batch: the sum of its per-token losses (the loop
    divides by the step's target tokens over all micro-batches and processes, so every token
    weighs the same), with the faults a test injects (lib/train/faults.py)."""
    loss = forward_loss(run.model, batch, run.device)
    return run.faults.on_loss(loss, run.loop.step + 1, run.accelerator.process_index)


def forward_loss(model: Model, batch: Batch, device) -> torch.Tensor:
    """One forward pass of `batch` and its summed loss, from the loss --loss.name names
    (lib/model/loss.py LOSSES): with the output layer fused with it in cache-sized chunks where
    there is one (no full logits), else over the logits."""
    import torch

    if isinstance(batch, PairBatch):  # preference pairs: whole responses scored against the reference
        return model.objective.loss_sum(model.forward, batch, device)
    inputs, labels = batch.model_inputs(device), torch.from_numpy(batch.labels).to(device)
    if model.fused is not None:
        return model.fused.loss_sum(model.forward, inputs, labels, model.objective)[0]
    return model.objective.loss_sum(model.forward(**inputs).logits, labels)[0]


def non_finite(run: Run, step_loss: torch.Tensor, grad_norm: float, sample_ids: list[list[int]]) -> list[str]:
    """What in this step was not finite: the loss (summed over processes), the gradient norm (not
    under fp16, whose loss scaler skips an overflowing update itself). With --on_nonfinite stop, a
    UserError before the update names the step, its samples and the newest checkpoint; with skip,
    the update is dropped and counted. Every process calls this (the loss is summed over them)."""
    import torch

    accelerator, loop = run.accelerator, run.loop
    total_loss = accelerator.reduce(step_loss.clone(), reduction="sum")
    bad = [what for what, ok in (("loss", bool(torch.isfinite(total_loss))),
                                 ("gradient norm", math.isfinite(grad_norm) or accelerator.mixed_precision == "fp16"))
           if not ok]
    if bad and run.cfg.on_nonfinite == "stop":
        found = ckpt.complete_checkpoints(run.run_dir)
        raise UserError(
            f"step {loop.step + 1}: non-finite {' and '.join(bad)}; stopped before the optimizer step. Samples (block "
            f"indices) of this step on rank {accelerator.process_index}: {[j for ids in sample_ids for j in ids]}. "
            f"Weights are untouched; newest checkpoint: {found[-1] if found else 'none'}. Lower optim.lr, check those "
            "samples, or pass --on_nonfinite skip")
    if bad:
        loop.skipped_steps += 1
        run.say(f"step {loop.step + 1}: non-finite {' and '.join(bad)}; update skipped ({loop.skipped_steps} so far)")
    return bad


def log_step(run: Run, bar, window: dict, mfu, grad_norm: float, lr: float) -> None:
    """One log line and metrics record: the mean loss over every target token of every process
    since the last one (the window is then emptied), throughput and MFU, padding, fp16's scale,
    and in the record the loss's own figures and the system's (lib.records.monitor.SystemMonitor).
    `window`: the tokens seen and the time at the last line (updated here)."""
    cfg, loop, accelerator = run.cfg, run.loop, run.accelerator
    now = time.perf_counter()
    tps = (loop.tokens_seen - window["tokens"]) / max(now - window["t"], 1e-9)
    window.update(tokens=loop.tokens_seen, t=now)
    loss = float(accelerator.reduce(loop.window.loss, reduction="sum")) / max(loop.window.tokens, 1)
    pad_frac = loop.window.pad / max(loop.window.slots, 1)
    loop.window.reset()
    extra = run.model.objective.take_logged(lambda t: accelerator.reduce(t.to(run.device), "sum"))
    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)  # shown at its next redraw
    if run.is_main:
        fp16 = fp16_state(run)
        utilization = mfu(tps)
        sampled = run.system is not None and (loop.step // cfg.log_every) % cfg.monitor.every == 0
        padding = f" | padding {pad_frac:.1%}" if cfg.data.packing != "pack" else ""
        scaling = f" | loss scale {fp16['loss_scale']:g}, {fp16['overflow_steps']} overflow step(s)" if fp16 else ""
        ranked = (f" | reward acc {extra['reward_accuracy']:.3f}, margin {extra['reward_margin']:.3f}"
                  if "reward_accuracy" in extra else "")
        write_line(bar, f"step {loop.step:>6}/{loop.horizon} | loss {loss:.4f}{ranked} | lr {lr:.2e} | grad_norm "
                   f"{grad_norm:.3f} | {tps:,.0f} tok/s | {tps * mfu.flops_per_token / 1e9:.1f} GFLOP/s"
                   f"{f' | MFU {utilization:.1%}' if utilization else ''}{padding}{scaling}")
        run.metrics.write({"type": "train", "step": loop.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "horizon": loop.horizon, "tokens_seen": loop.tokens_seen, "tokens_per_s": tps,
                           "padding": pad_frac, "mfu": utilization, "skipped_steps": loop.skipped_steps,
                           "elapsed_s": loop.elapsed_s(), "peak_memory_gib": peak_memory_gib(run.device)[0],
                           **extra, **fp16, **(run.system.sample() if sampled else {})})
    if not math.isfinite(loss):
        raise UserError(f"loss became {loss} at step {loop.step}; lower optim.lr or check the data")


def fp16_state(run: Run) -> dict:
    """fp16: the loss scaler's scale now, and the updates it has dropped so far ({} otherwise)."""
    if run.accelerator.scaler is None:
        return {}
    return {"loss_scale": run.accelerator.scaler.get_scale(), "overflow_steps": run.loop.overflow_steps}


def stop_reason(run: Run, lr: float) -> bool:
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


def evaluate(run: Run) -> dict:
    """Score the held-out sample (of a mixture: each source's, and the mixture from them), each
    process a share of its windows, the sums added over processes: the log line and a metrics record."""
    import torch

    if run.data.pairs:
        return evaluate_pairs(run)
    loop, t, accelerator = run.loop, time.perf_counter(), run.accelerator

    def add_up(values: list) -> list:
        return accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=run.device), "sum").tolist()

    def score(held_out: HeldOutSample) -> dict:
        return held_out.evaluate(run.unwrapped, run.cfg.micro_batch_size, run.device, accelerator.autocast,
                                 run.data.boundary, shard=(accelerator.process_index, run.world, add_up))

    by_source = {name: score(sample) for name, sample in run.data.held_out_by_source.items()}
    res = mixture.mixture_figures(by_source, {s.name: s.weight for s in run.data.sources}) if by_source else \
        score(run.data.held_out)
    loop.last_eval.update(step=loop.step, loss=res["loss"], seconds=time.perf_counter() - t, figures=res,
                          by_source=by_source)
    what = run.data.held_out.description if not by_source else "the mixture, by its weights: " + ", ".join(
        f"{name} {r['bits_per_byte']:.4f}" if "bits_per_byte" in r else f"{name} loss {r['loss']:.4f}"
        for name, r in by_source.items())
    run.say(f"eval step {loop.step}: val_loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
            f"bits/byte {res.get('bits_per_byte', float('nan')):.4f} | acc {res['accuracy']:.3f} ({what}, "
            f"{loop.last_eval['seconds']:.1f} s)")
    if run.metrics:
        run.metrics.write({"type": "eval", "step": loop.step, "tokens_seen": loop.tokens_seen,
                           "elapsed_s": loop.elapsed_s(), **{f"val_{k}": v for k, v in res.items()},
                           **mixture.per_source_fields(by_source)})
        run.metrics.refresh_tables()
    return res


def evaluate_pairs(run: Run) -> dict:
    """Score every held-out preference pair: the objective's loss, reward accuracy and margin, the
    rewards and log-probabilities (lib/model/preference.py summary), in the log line and a metrics
    record. Every process scores all of them (a sharded model's forward is collective)."""
    loop, rows, objective, t = run.loop, run.data.held_out, run.model.objective, time.perf_counter()
    res = rows_summary(run.unwrapped, rows, rows.reference if objective.uses_reference else None, objective.fn,
                       objective.opt, run.cfg.micro_batch_size, run.device, run.accelerator.autocast)
    loop.last_eval.update(step=loop.step, loss=res["loss"], seconds=time.perf_counter() - t, figures=res, by_source={})
    run.say(f"eval step {loop.step}: val_loss {res['loss']:.4f} | reward accuracy {res['reward_accuracy']:.3f} | "
            f"margin {res['reward_margin']:.4f} | rewards chosen {res['reward_chosen']:.4f}, rejected "
            f"{res['reward_rejected']:.4f} | log-prob accuracy {res['logp_accuracy']:.3f} ({rows.description}, "
            f"{loop.last_eval['seconds']:.1f} s)")
    if run.metrics:
        run.metrics.write({"type": "eval", "step": loop.step, "tokens_seen": loop.tokens_seen,
                           "elapsed_s": loop.elapsed_s(), "val_pairs": len(rows),
                           **{f"val_{k}": v for k, v in res.items()}})
        run.metrics.refresh_tables()
    return res


def estimate_evaluation(run: Run) -> float:
    """Seconds of one evaluation, before one is timed: a few of its batches, timed."""
    if run.data.pairs:  # one batch of held-out pairs, timed, times the batches
        import torch

        rows, n = run.data.held_out, min(len(run.data.held_out), run.cfg.micro_batch_size)
        t = time.perf_counter()
        with torch.no_grad(), run.accelerator.autocast():
            batch_scores(run.unwrapped, rows.make_batch(list(range(n))), run.device)
        return (time.perf_counter() - t) * math.ceil(len(rows) / n)
    return sum(sample.estimate_seconds(run.unwrapped, run.cfg.micro_batch_size, run.device, run.accelerator.autocast,
                                       run.data.boundary, world=run.world)
               for sample in (run.data.held_out_by_source or {"": run.data.held_out}).values())


def write_samples(run: Run) -> None:
    """The model's greedy continuations of the sample prompts: in the log, as metrics records
    (type "sample") and in samples.txt. Every process generates (a sharded model's forward is
    collective); the main one writes."""
    tok = TextTokenizer(run.data.tokenizer)
    new = greedy_continuations(run.unwrapped, run.data.sample_prompts, run.cfg.sample_tokens, run.device,
                               run.accelerator.autocast, eos=run.data.manifest["special_ids"].get("eos"))
    if not run.is_main:
        return
    for ids, continuation in zip(run.data.sample_prompts, new):
        prompt, text = tok.decode(ids), tok.decode(continuation)
        run.say(f"sample step {run.loop.step}: {prompt[-60:]!r} -> {text[:120]!r}")
        run.metrics.write({"type": "sample", "step": run.loop.step, "prompt": prompt, "text": text})
    write_samples_file(run.run_dir)


def estimate_samples(run: Run) -> float:
    """Seconds of writing the samples, before it is timed: eight tokens of the first prompt, timed,
    scaled to every prompt's sample_tokens."""
    t = time.perf_counter()
    greedy_continuations(run.unwrapped, run.data.sample_prompts[:1], 8, run.device, run.accelerator.autocast)
    return (time.perf_counter() - t) * len(run.data.sample_prompts) * run.cfg.sample_tokens / 8


def write_samples_file(run_dir: Path) -> None:
    """samples.txt: every sample metrics.jsonl holds, by step, oldest first (rebuilt from it, so a
    resumed run's file holds what its log does)."""
    samples = [r for r in read_jsonl(run_dir / METRICS) if r.get("type") == "sample"]
    if not samples:
        return
    with atomic_text(run_dir / "samples.txt") as f:
        for r in samples:
            f.write(f"--- step {r['step']}, greedy, prompt {r['prompt']!r}\n{r['prompt']}{r['text']}\n")


def run_tasks(run: Run) -> None:
    """The harness's tasks (--tasks) on the model now, on the main process (the others wait at
    the next collective): one metrics record per task and a log line."""
    if run.is_main:
        t = time.perf_counter()
        manager = task_manager(run.cfg.tasks, run.cfg.tasks_dir, run.cfg.allow_task_code)
        model = run.unwrapped
        was_training = model.training
        results = tasks.run_tasks(model.eval(), load_hf_tokenizer(run.data.tokenizer), run.cfg.tasks, manager,
                                  run.cfg.micro_batch_size, quiet=True)
        model.train(was_training)
        for task, found in results.items():
            figures = {k: v for k, v in found.items() if k != "documents"}
            run.say(f"task step {run.loop.step}: {task} " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items())
                    + f" ({found['documents']} documents, {time.perf_counter() - t:.1f} s)")
            run.metrics.write({"type": "task", "step": run.loop.step, "task": task, "documents": found["documents"],
                               **{f"task_{task}_{k}": v for k, v in figures.items()}})
    run.accelerator.wait_for_everyone()


@functools.lru_cache(maxsize=1)
def task_manager(names: tuple[str, ...], tasks_dir: Optional[Path], allow_code: bool):
    """The harness's task index for --tasks, checked once (check_options) and kept for every run of
    them: building it scans every task the harness knows."""
    return tasks.task_manager(names, tasks_dir, allow_code)


def save_checkpoint(run: Run) -> None:
    """Write a checkpoint (every checkpoint_every steps, after the last step, and on a stop request)."""
    from accelerate.utils import gather_object

    cfg, loop = run.cfg, run.loop
    ckpt.assert_finite(run.unwrapped, loop.step)
    ckpt.save(run.accelerator, run.run_dir, loop.step, cfg.keep_last_n,
              {**loop.state_dict(gather_object), "sampler": run.sampler.state_dict(),
               "objective_windows": gather_object([run.model.objective.window_state()]),
               "data_content_hash": run.data.content_hash,
               **({"lora_base_sha256": run.model.base_sha} if run.uses_lora else {})}, keep_best=cfg.keep_best,
              expect_bytes=checkpoint_bytes(run), say=run.say)
    if run.metrics:  # a run stopped here has tables that match its checkpoint
        run.metrics.refresh_tables()


def checkpoint_bytes(run: Run) -> int:
    """A checkpoint's expected size: the trained weights and the optimizer's state (float32)."""
    weights = sum(p.numel() * p.element_size() for p in run.model.prepared.parameters() if p.requires_grad)
    return weights + 4 * state_numel(run.unwrapped, run.cfg.optim)


def stop_and_exit(run: Run, bar, signalled: str) -> None:
    """A stop request: checkpoint this step and exit with EXIT_STOPPED (--resume auto continues)."""
    bar.close()
    save_checkpoint(run)
    run.say(f"stopped by {signalled} after step {run.loop.step}: checkpoint {ckpt.step_dir(run.run_dir, run.loop.step)} "
            f"written; --resume auto continues from there")
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    sys.exit(EXIT_STOPPED)


# ---- what set-up calls ---------------------------------------------------------------------------

def process_age_s() -> float:
    """Seconds since this process started (0 where psutil cannot tell)."""
    try:
        import psutil

        return max(time.time() - psutil.Process().create_time(), 0.0)
    except Exception:  # noqa: BLE001 -- no psutil, or no process table: count from here
        return 0.0


def verify_shards_on_main(tok_dir: Path, manifest: dict, accelerator: Accelerator) -> None:
    """Every file of the training and held-out splits against the manifest, before any is used (a
    flipped byte, a truncated file, an id past the vocabulary, a path out of the folder): checked
    on the main process, its verdict given to every process."""
    problem = None
    if accelerator.is_main_process:
        try:
            verify_shards(tok_dir, manifest, ("train", "val"), say=accelerator.print)
        except UserError as exc:
            problem = str(exc)
    problem = broadcast_from_main(problem, accelerator)
    if problem:
        raise UserError(problem)


def warn_long_conversations(cfg: TrainConfig, tok_dir: Path, manifest: dict, say) -> None:
    """A warning naming the training conversations longer than seq_len + 1 tokens, which are cut
    into blocks like any document, and what would keep them whole within the model's positions."""
    lengths = np.concatenate(load_doc_tables(tok_dir, "train"))[:, 0]
    long = np.nonzero(lengths > cfg.data.seq_len + 1)[0]
    if not len(long):
        return
    first = next(r for i, r in enumerate(iter_records(tok_dir / manifest["corpus_dir"], "train")) if i == long[0])
    limit = folder_positions(cfg.model.init_from) if cfg.model.init_from else cfg.model.max_seq_len
    whole = int(lengths.max()) - 1
    advice = (f"--data.seq_len {whole} keeps every one whole" if limit is None or whole <= limit else
              f"keeping every one whole needs {whole} positions, more than the model's {limit}: fine-tune a "
              f"model with more positions, or shorten those conversations"
              + (f" (--data.seq_len {limit}, the most it takes, cuts fewer)" if cfg.data.seq_len < limit else ""))
    say(f"warning: {len(long)} conversation(s) are longer than --data.seq_len {cfg.data.seq_len} + 1 tokens "
        f"(the first: {first['source']}:{first.get('line', '?')}, {int(lengths[long[0]])} tokens). They are cut into "
        f"blocks like any document: their later answer tokens are trained without the conversation's start in "
        f"view; {advice}")


def sample_prompts(cfg: TrainConfig, tokenizer: Path, manifest: dict, val_tokens: np.ndarray, val_docs: np.ndarray,
                   mask: Optional[np.ndarray], every: int = 1) -> list[list[int]]:
    """The token ids the samples continue: --sample_prompts encoded (after bos, as documents
    begin), else the openings of three held-out documents (the first, then each `every`-th): a
    conversation's tokens before its first answer token, a text's first 16 tokens (at most half of it)."""
    bos = manifest["special_ids"].get("bos")
    if cfg.sample_prompts:
        first = [bos] if bos is not None and len(val_tokens) and val_tokens[0] == bos else []
        return [first + ids for ids in TextTokenizer(tokenizer).encode(list(cfg.sample_prompts))]
    prompts = []
    starts = np.concatenate([[0], np.cumsum(val_docs[:, 0])])
    for start, length in zip(starts[:3 * every:every].tolist(), val_docs[:3 * every:every, 0].tolist()):
        if mask is not None:  # mask[j]: token j is an answer's
            answer = np.flatnonzero(np.asarray(mask[start:start + length]) == 1)
            n = int(answer[0]) if len(answer) and answer[0] > 0 else max(1, length // 2)
        else:
            n = min(16, max(1, length // 2))
        prompts.append(val_tokens[start:start + n].tolist())
    return prompts


def fit_micro_batch(cfg: TrainConfig, accelerator: Accelerator, data: Data, model: Model) -> None:
    """--fit_micro_batch: halve cfg.micro_batch_size (doubling grad_accum_steps) until a step fits."""

    def trial(n: int) -> None:  # one forward+backward on n sequences; nothing is applied
        batch = data.train.make_batch(list(range(min(n, len(data.train)))), data.boundary)
        if isinstance(batch, PairBatch):  # the reference is not scored yet; any figures cost the same
            batch.reference = np.zeros((batch.n_pairs, 2))
        accelerator.backward(forward_loss(model, batch, accelerator.device) * 0)
        model.optimizer.zero_grad(set_to_none=True)

    fitted = memory.fit_micro_batch(trial, cfg.micro_batch_size, cfg.grad_accum_steps, accelerator.device, say=accelerator.print)
    if fitted != (cfg.micro_batch_size, cfg.grad_accum_steps):
        accelerator.print(f"micro_batch_size {cfg.micro_batch_size} -> {fitted[0]}, grad_accum_steps "
                          f"{cfg.grad_accum_steps} -> {fitted[1]} (the same sequences per optimizer step)")
    cfg.micro_batch_size, cfg.grad_accum_steps = fitted
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps


def drop_records_logged_again(cfg: TrainConfig, run_dir: Path, loop: LoopState, say) -> None:
    """metrics.jsonl of a resumed run: the records after the checkpoint's step go (they are logged
    again), and so do those of that step which the continued run writes again: a finished run
    redoes its final jobs; a run stopped early (--stop_at_step, a budget) drops what the stop
    added off its jobs' intervals. The resumed log then holds the rows a straight run would."""
    def again(every: int) -> bool:
        return loop.done or not (every and loop.step % every == 0)

    types = ("final",) + tuple(kind for kind, every in (("eval", cfg.eval_every), ("sample", cfg.sample_every),
                                                        ("task", cfg.tasks_every)) if again(every))
    dropped = truncate_after_step(run_dir / METRICS, loop.step, types)
    if dropped:
        say(f"metrics.jsonl: dropped {dropped} record(s) logged after step {loop.step}; they are logged again")


def describe_mixture(cfg: TrainConfig, data: Data, world: int) -> list[str]:
    """The mixture's sources: weight, size, and passes over each in the planned steps (at most
    max_steps where the budget's clock sets the schedule); a warning for a source repeated often."""
    rows = cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum_steps * world
    lines = mixture.describe(data.sources, [p.n_tokens for p in data.train.parts], [len(p) for p in data.train.parts],
                             rows, at_most=bool(cfg.max_minutes))
    bound = "at most " if cfg.max_minutes else ""
    return [f"mixture of {len(data.sources)} sources, weights as shares of training tokens; passes in {bound}"
            f"{cfg.max_steps} steps:"] + ["  " + line for line in lines]


def describe_run(run: Run) -> None:
    """The start-up line: model, data layout, processes, batch and schedule."""
    cfg, train_data, boundary, horizon = run.cfg, run.data.train, run.data.boundary, run.loop.horizon
    rows_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * run.world
    if run.data.pairs:
        layout = (f"{len(train_data):,} preference pairs, each micro-batch's chosen and rejected rows padded to its "
                  "longest; the loss a mean over the step's pairs")
    elif cfg.data.packing == "pack":
        layout = f"{len(train_data):,} packed blocks of {cfg.data.seq_len}" + (
            "" if boundary is None else
            f", attention within documents ({'from each bos' if boundary.begins else 'restarting after each eos'})")
    else:
        pad = train_data.padding_fraction(run.sampler.epoch_order(0), cfg.micro_batch_size)
        layout = f"{len(train_data):,} documents (pieces) padded ({cfg.data.packing}): {pad:.1%} padding"
    what = f"{cfg.model.init_from} (from it)" if cfg.model.init_from else f"{cfg.model.arch} (new)"
    run.say(f"model: {what} {run.model.n_params / 1e6:.2f}M params | data: {train_data.n_tokens:,} train tokens, "
            f"{layout} | {run.world} process(es), precision {run.precision.name} | "
            f"{rows_per_step} {'pairs' if run.data.pairs else 'sequences'} of <= {cfg.data.seq_len} tokens per "
            "optimizer step, "
            f"{horizon} steps ({rows_per_step * horizon / len(train_data):.2f} epochs)"
            + (" at most: the learning rate follows the budget's clock, at its floor when the training time is "
               "spent" if run.loop.clock else ""))
    if run.data.sources:
        for line in describe_mixture(cfg, run.data, run.world):
            run.say(line)
    if cfg.max_minutes and not run.loop.clock and run.resume_from is None:
        run.say(f"the schedule spans {horizon} steps; the {cfg.max_minutes:g} minute budget only stops the run"
                + (" (--deterministic: a learning rate on the clock would differ between runs; "
                   "--fit_schedule True to follow the clock anyway)" if cfg.deterministic and cfg.fit_schedule is None
                   else ""))


if __name__ == "__main__":
    main()
