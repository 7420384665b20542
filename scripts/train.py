#!/usr/bin/env python
"""Train a causal language model with Accelerate: the whole loop, top to bottom, in this file.

    python scripts/train.py --config configs/train/default.yaml
    accelerate launch --config_file configs/accelerate/cpu.yaml scripts/train.py --config ...

Writes runs/<run_name>/: config.yaml (resolved), provenance.json, metrics.jsonl, checkpoints/
(resumable with --resume auto), final/ (a Hugging Face model and tokenizer), loss.png, report.md.
"""
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
from lib.data import DataConfig  # noqa: E402
from lib.errors import UserError, exit_on_user_error  # noqa: E402
from lib.lora import LoraOptions  # noqa: E402
from lib.model import ModelConfig  # noqa: E402
from lib.optim import OptimConfig  # noqa: E402


@dataclass
class TrainConfig:
    """Pretrain from scratch or fine-tune a local model."""

    config: Optional[Path] = None
    """YAML preset applied before these flags."""
    print_config: bool = False
    """Print the resolved config as YAML and exit."""
    run_name: str = "default"
    runs_dir: Path = Path("runs")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraOptions = field(default_factory=LoraOptions)
    seed: int = 0
    max_steps: int = 1000
    """Optimizer steps at most; without a time budget the learning-rate schedule spans exactly these."""
    max_minutes: Optional[float] = None
    """Time budget of the training loop (all resumed parts together). With fit_schedule, the
    schedule is fitted to it; in any case the run stops (saving everything) once it is spent."""
    fit_schedule: Optional[bool] = None
    """With max_minutes: after warmup, measure the step time and end the schedule (its decay
    included) at the last step that fits the budget, never past max_steps. The horizon is then
    kept in checkpoints, so a resumed run continues the same schedule. Default: on, except with
    --deterministic (a horizon measured from time differs between runs); off: the schedule spans
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
    checkpoint_every: int = 500
    keep_last_n: int = 2
    """Complete checkpoints to keep; older ones are deleted after a new one is written."""
    keep_best: bool = False
    """Also keep the checkpoint with the lowest held-out loss (of those written at an evaluation
    step: make checkpoint_every a multiple of eval_every)."""
    resume: Optional[str] = None
    """'auto' (newest checkpoint of this run) or a checkpoint folder."""
    allow_data_change: bool = False
    """Resume even though the data's content hash differs from the checkpoint's."""
    overwrite: bool = False
    """Delete an existing run folder of the same name instead of refusing to start."""
    fused_loss: bool = True
    """Compute the output layer and the loss together in row chunks that stay in cache, never
    holding the full logits (and skipping padded rows): the same loss and gradients, the head's
    time and memory roughly halved. Off: plain logits then cross-entropy. Not used for fp16 or a
    LoRA-wrapped output layer."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel while training (saved models load with the library default either way).
    auto: eager, plain matmuls and softmax that torch.compile fuses, when compiling on CPU (12%
    faster default-preset steps than sdpa's CPU flash kernel, measured here), else sdpa."""
    compile: bool = False
    """torch.compile the model: a slower start (about 40 s on 2 CPU cores), faster steps."""
    keep_freed_memory: bool = True
    """Let glibc malloc keep freed memory for reuse (1.4-1.5x faster CPU steps measured here;
    the process holds its peak memory)."""
    threads: Optional[int] = None
    """torch intra-op threads on CPU (default: torch's choice)."""
    deterministic: bool = False
    """Same results in every process on this machine, for bitwise resume: one intra-op thread on
    CPU unless --threads says otherwise (with 2 threads, 8 of 60 identical fresh processes here
    got last-bit different step-1 gradients; none of 24 with one), MKL's reproducible mode
    (MKL_CBWR=AUTO,STRICT), oneDNN kept off AMX (whose bf16 results varied between processes
    here), and torch's deterministic algorithms (on CUDA also CUBLAS_WORKSPACE_CONFIG)."""
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
    debug_nan_step: Optional[int] = None
    """Testing aid: make the loss NaN in this optimizer step (1-based) to exercise on_nonfinite."""


@exit_on_user_error
def main() -> None:
    cfg = config_lib.parse(TrainConfig, description=__doc__)
    if cfg.keep_last_n < 1:
        raise UserError("--keep_last_n must be at least 1")
    if cfg.deterministic:  # read when MKL and cuBLAS start, so set before torch is imported
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradScalerKwargs, set_seed

    from lib import checkpoint as ckpt
    from lib import lora
    from lib.distributed import allow_fsdp_on_cpu, fsdp_requested
    from lib import budget
    from lib import precision as precision_lib
    from lib.data import BlockSampler, build_train_data, load_split, tokens_dir
    from lib.corpus import read_manifest
    from lib.evaluate import evaluate_blocks, held_out_sample, summarize, token_byte_lengths
    from lib.fused_loss import FusedHead
    from lib.loss import step_scaled_loss, token_loss_sum
    from lib.metrics import JsonlWriter
    from lib.model import build_model, count_params, cpu_only, flops_per_token, fp16_on_cpu, matmul_dims
    from lib.optim import build_optimizer, lr_at, set_lr
    from lib.provenance import provenance
    from lib.progress import progress, write
    from lib.report import write_final, plot_metrics

    # set even to torch's own default: torch then also turns off MKL's dynamic thread count,
    # which could otherwise split a matrix product differently from one call to the next
    threads = cfg.threads or (1 if cfg.deterministic and cpu_only() else torch.get_num_threads())
    torch.set_num_threads(threads)
    if cfg.keep_freed_memory:
        from lib.cpu import keep_freed_memory

        keep_freed_memory()
    on_cpu = cpu_only()
    cpu_fsdp = on_cpu and allow_fsdp_on_cpu()  # an FSDP launcher config on CPU: FSDP, not DDP
    from accelerate import PartialState

    processes = PartialState(cpu=on_cpu)  # set up before the Accelerator: they agree on its precision
    tok_dir = tokens_dir(cfg.data.dir)
    manifest = read_manifest(tok_dir, "tokens")
    shapes = precision_lib.model_matmul_shapes(*matmul_dims(cfg.model, manifest["vocab_size"]),
                                               cfg.micro_batch_size * cfg.data.seq_len)
    choice = precision_lib.resolve_on_main(cfg.precision, shapes, processes)
    accelerator = Accelerator(mixed_precision=choice.mixed_precision, cpu=on_cpu,
                              gradient_accumulation_steps=cfg.grad_accum_steps,
                              kwargs_handlers=[GradScalerKwargs(init_scale=cfg.fp16_init_scale)])
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    sharded = accelerator.distributed_type == DistributedType.FSDP  # one shard of every weight per process
    say = accelerator.print
    say(f"precision {choice.name}: {choice.reason}")
    if accelerator.mixed_precision == "fp16" and on_cpu:
        if cpu_fsdp:
            raise UserError("--precision fp16 on CPU does not combine with FSDP; use bf16 or fp32 there")
        fp16_on_cpu(accelerator, cfg.fp16_init_scale)
        say("fp16 on CPU: float16 autocast and a loss scaler, as on a GPU (slow here: it is for trying that path)")
    if fsdp_requested() and not sharded:
        how = "one process" if world == 1 else f"{world} processes, {accelerator.distributed_type.value}"
        say(f"warning: the launcher config asks for FSDP, but this job runs without it ({how}): nothing is sharded")
    elif cpu_fsdp:
        say(f"FSDP{accelerator.state.fsdp_plugin.fsdp_version} on CPU over gloo ({world} process(es)): parameters, "
            "gradients and optimizer state sharded")
    if cfg.keep_best and (not cfg.eval_every or not cfg.checkpoint_every or cfg.checkpoint_every % cfg.eval_every):
        say(f"warning: --keep_best compares checkpoints written at evaluation steps; with checkpoint_every "
            f"{cfg.checkpoint_every} and eval_every {cfg.eval_every} only the final checkpoint has a held-out loss")
    if cfg.deterministic:
        say(f"deterministic: {threads} CPU thread(s), MKL_CBWR=AUTO,STRICT, oneDNN without AMX, "
            "torch deterministic algorithms")

    # ---- run folder: never clobber an existing run by accident
    run_dir = cfg.runs_dir / cfg.run_name
    resume_from = ckpt.find_resume(run_dir, cfg.resume, say=say) if cfg.resume else None
    has_checkpoints = bool(ckpt.complete_checkpoints(run_dir))
    if cfg.resume == "auto" and resume_from is None and has_checkpoints and not cfg.overwrite:
        raise UserError(f"no checkpoint of {run_dir} passes its sha256 check (see the warnings above); "
                        "pass --overwrite to start the run over")
    started_only = (cfg.resume == "auto" and resume_from is None and run_dir.is_dir()
                    and not (run_dir / "final").exists() and not has_checkpoints)
    if started_only and any(run_dir.iterdir()):
        # stopped before its first checkpoint: nothing to continue, and nothing of value to keep
        say(f"{run_dir} has no complete checkpoint to resume: starting it over")
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        if not (cfg.overwrite or started_only):
            raise UserError(f"run folder {run_dir} already exists: pass --resume auto to continue it, "
                            "--overwrite to replace it, or another --run_name")
        if is_main:
            ckpt.remove_run(run_dir)
    accelerator.wait_for_everyone()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, run_dir / "config.yaml")

    # ---- data (the held-out sample is the same at every evaluation and in every process)
    val_tokens, val_docs = load_split(tok_dir, "val")
    sp_model = tok_dir / ".." / "tokenizer" / "sp.model"
    held_out = held_out_sample(val_tokens, val_docs, cfg.data.seq_len, cfg.eval_tokens,
                               token_byte_lengths(sp_model) if sp_model.is_file() else None, seed=0)
    train_data = build_train_data(tok_dir, cfg.data, manifest["special_ids"])
    bos_id = manifest["special_ids"]["bos"] if cfg.data.doc_mask else None

    # ---- model and optimizer (same seed on every rank: identical initial weights)
    set_seed(cfg.seed, deterministic=cfg.deterministic)
    if cfg.data.seq_len > cfg.model.max_seq_len and not cfg.model.init_from:
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    model = build_model(cfg.model, manifest["vocab_size"], manifest["special_ids"])
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        say("activation checkpointing: on (activations recomputed in the backward pass)")
    attention = cfg.attention if cfg.attention != "auto" else (
        "eager" if cfg.compile and accelerator.device.type == "cpu" else "sdpa")
    if attention != model.config._attn_implementation:
        model.set_attn_implementation(attention)
    n_params, fpt = count_params(model), flops_per_token(model, cfg.data.seq_len)
    use_lora = lora.enabled(cfg.lora)
    base_sha = lora.base_fingerprint(cfg.model.init_from) if use_lora else None
    if use_lora:
        model = lora.apply(model, cfg.lora)
        n_train = count_params(model, trainable_only=True)
        say(f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} on {cfg.lora.target_modules}: {n_train:,} trainable "
            f"parameters ({n_train / n_params:.2%} of the base); checkpoints hold "
            f"{'every weight, sharded (FSDP)' if sharded else 'the adapters only'}")
    fused = (FusedHead.attach(model, compiled=cfg.compile)
             if cfg.fused_loss and accelerator.mixed_precision != "fp16" else None)
    say(f"forward: {'torch.compile' if cfg.compile else 'eager'}, attention {attention}, loss "
        f"{'fused with the output layer' if fused is not None else 'over full logits'}")

    def forward_loss(batch, labels):
        """(sum of token losses, target tokens) of one micro-batch (the prepared model's forward
        runs under Accelerate's autocast, the fused head included)."""
        inputs = batch.model_inputs(accelerator.device)
        if fused is not None:
            return fused.loss_sum(model, inputs, labels)
        return token_loss_sum(model(**inputs).logits, labels)

    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    prepared = model  # what Accelerate saves and loads (torch.compile below wraps it again)
    if use_lora:
        lora.save_trainable_only(accelerator, prepared)
    if cfg.compile:
        model = torch.compile(model)
    if cfg.fit_micro_batch:
        from lib.memory import fit_micro_batch

        def trial(n: int) -> None:  # one forward+backward on n sequences; nothing is applied
            batch = train_data.make_batch(list(range(min(n, len(train_data)))), bos_id)
            labels = torch.from_numpy(batch.labels).to(accelerator.device)
            accelerator.backward(forward_loss(batch, labels)[0] * 0)
            optimizer.zero_grad(set_to_none=True)

        fitted = fit_micro_batch(trial, cfg.micro_batch_size, cfg.grad_accum_steps, accelerator.device, say=say)
        if fitted != (cfg.micro_batch_size, cfg.grad_accum_steps):
            say(f"micro_batch_size {cfg.micro_batch_size} -> {fitted[0]}, grad_accum_steps "
                f"{cfg.grad_accum_steps} -> {fitted[1]} (the same sequences per optimizer step)")
        cfg.micro_batch_size, cfg.grad_accum_steps = fitted
        accelerator.gradient_accumulation_steps = cfg.grad_accum_steps
    sampler = BlockSampler(len(train_data), cfg.micro_batch_size, cfg.seed, accelerator.process_index, world)

    step, tokens_seen = 0, 0
    horizon, elapsed_before = cfg.max_steps, 0.0  # the schedule's last step; budget spent by earlier parts
    fit_minutes = None  # the budget the horizon was fitted to, once it is
    fit = cfg.fit_schedule if cfg.fit_schedule is not None else not cfg.deterministic
    fit = bool(fit and cfg.max_minutes)
    if resume_from is not None:
        vet = (lambda st: lora.check_checkpoint(resume_from, st, accelerator.unwrap_model(prepared), base_sha,
                                                cfg.model.init_from)) if use_lora else None
        state = ckpt.load(accelerator, resume_from, manifest["content_hash"], cfg.allow_data_change,
                          strict=not use_lora, check=vet)
        sampler.load_state_dict(state["sampler"], cfg.allow_data_change)
        step, tokens_seen = state["step"], state["tokens_seen"]
        window = state.get("log_window", {})
        elapsed_before = state.get("elapsed_s", 0.0)
        if state.get("fitted_horizon"):  # fitted to the budget before the stop: the same schedule
            horizon, fit, fit_minutes = state["fitted_horizon"], False, state["fitted_to_minutes"]
        say(f"resumed from {resume_from} at step {step}")
    if is_main:
        ckpt.write_json(run_dir / "provenance.json",
                        provenance(cfg, manifest, accelerator, n_params, resumed_from=resume_from))

    rows_per_step = cfg.micro_batch_size * cfg.grad_accum_steps * world
    epochs = rows_per_step * horizon / len(train_data)
    if cfg.data.packing == "pack":
        layout = f"{len(train_data):,} packed blocks of {cfg.data.seq_len}" + (
            ", attention within documents" if cfg.data.doc_mask else "")
    else:
        pad = train_data.padding_fraction(sampler.epoch_order(0), cfg.micro_batch_size)
        layout = f"{len(train_data):,} documents (pieces) padded ({cfg.data.packing}): {pad:.1%} padding"
    say(f"model: {cfg.model.arch} {n_params / 1e6:.2f}M params | data: {train_data.n_tokens:,} train tokens, "
        f"{layout} | {world} process(es), precision {choice.name} | "
        f"{rows_per_step} sequences of <= {cfg.data.seq_len} tokens per optimizer step, "
        f"{horizon} steps ({epochs:.2f} epochs)" + (" at most: the schedule is fitted to the budget after warmup"
                                                   if fit else ""))
    if cfg.max_minutes and not fit and resume_from is None:
        say(f"the schedule spans {horizon} steps; the {cfg.max_minutes:g} minute budget only stops the run"
            + (" (--deterministic: a horizon measured from time would differ between runs; "
               "--fit_schedule True to fit it anyway)" if cfg.deterministic and cfg.fit_schedule is None else ""))

    if is_main and resume_from is not None:
        from lib.metrics import truncate_after_step

        dropped = truncate_after_step(run_dir / "metrics.jsonl", step)
        if dropped:
            say(f"metrics.jsonl: dropped {dropped} record(s) logged after step {step}; they are logged again")
    metrics = JsonlWriter(run_dir / "metrics.jsonl") if is_main else None
    device = accelerator.device
    peak, reprobed = None, False
    if cfg.mfu and is_main:  # the figure is logged by the main process only; one probe, not one per rank
        from lib.flops import device_peak

        peak, _, peak_source = device_peak(device)
        say(f"MFU against {peak / 1e12:.2f} TFLOP/s, the {peak_source}" if peak else f"MFU: {peak_source}")

    last_eval = {"step": None, "loss": None}  # recorded in a checkpoint of the same step (--keep_best)

    def fp16_state() -> dict:
        """fp16: the loss scaler's scale now, and the updates it has dropped so far."""
        if accelerator.scaler is None:
            return {}
        return {"loss_scale": accelerator.scaler.get_scale(), "overflow_steps": overflow_steps}

    def run_eval() -> dict:
        t = time.perf_counter()
        sums = evaluate_blocks(accelerator.unwrap_model(prepared), held_out.inputs, held_out.targets,
                               cfg.micro_batch_size, device, accelerator.autocast, bos_id=bos_id)
        res = summarize(sums, held_out.text_bytes)
        last_eval.update(step=step, loss=res["loss"], seconds=time.perf_counter() - t)
        say(f"eval step {step}: val_loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
            f"bits/byte {res['bits_per_byte']:.4f} | acc {res['accuracy']:.3f} ({held_out.description}, "
            f"{last_eval['seconds']:.1f} s)")
        if metrics:
            metrics.write({"type": "eval", "step": step, "tokens_seen": tokens_seen,
                           **{f"val_{k}": v for k, v in res.items()}})
        return res

    def time_eval_batches() -> float:
        """Seconds one evaluation takes: the faster of its second and third batch, timed (the
        first ones pay one-off kernel set-up), times its number of batches."""
        n = cfg.micro_batch_size
        batches = -(-len(held_out.inputs) // n)
        times = []
        for k in range(min(3, batches)):
            t = time.perf_counter()
            evaluate_blocks(accelerator.unwrap_model(prepared), held_out.inputs[k * n:(k + 1) * n],
                            held_out.targets[k * n:(k + 1) * n], n, device, accelerator.autocast, bos_id=bos_id)
            times.append(time.perf_counter() - t)
        return min(times[1:] or times) * batches

    def save_checkpoint():
        t = time.perf_counter()
        bad = [n for n, p in accelerator.unwrap_model(prepared).named_parameters()
               if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]  # FSDP2: the local shard
        if bad:
            raise UserError(f"step {step}: parameter {bad[0]} holds non-finite values; not writing a checkpoint "
                            f"(the newest complete one is kept)")
        ckpt.save(accelerator, run_dir, step, cfg.keep_last_n,
                  {"step": step, "tokens_seen": tokens_seen, "sampler": sampler.state_dict(),
                   # the partial logging window, so the next logged loss is the one an
                   # uninterrupted run logs (this rank's sums; the loss is a float64 sum as text)
                   "log_window": {"loss": window_loss.double().item(), "tokens": window_tokens,
                                  "slots": window_slots, "pad": window_pad, "skipped": skipped_steps,
                                  "overflow": overflow_steps},
                   "fitted_horizon": horizon if fit_minutes else None, "fitted_to_minutes": fit_minutes,
                   "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                   "data_content_hash": manifest["content_hash"],
                   "val_loss": last_eval["loss"] if last_eval["step"] == step else None,
                   **({"lora_base_sha256": base_sha} if use_lora else {})}, keep_best=cfg.keep_best)
        checkpoint_seconds.append(time.perf_counter() - t)

    # ---- the loop: one iteration = one optimizer step of grad_accum_steps micro-batches
    model.train()
    bar = progress(total=horizon, initial=step, disable=not is_main, desc="train", unit="step")
    clock, checkpoint_seconds = budget.StepClock(), []
    fit_after = max(cfg.optim.warmup_steps, step)  # the horizon is fixed at the first timed step after warmup
    t_start = t_log = time.perf_counter()
    tokens_at_log, tokens_at_start, stopped_early = tokens_seen, tokens_seen, False
    window_loss, window_tokens = torch.zeros((), device=device), 0  # since the last log line
    window_slots = window_pad = 0  # input positions and padded ones, this rank, since the last log line
    skipped_steps = overflow_steps = 0  # updates dropped: by --on_nonfinite skip / by fp16's loss scaler
    if resume_from is not None:
        window_loss += window.get("loss", 0.0)
        window_tokens, window_slots = window.get("tokens", 0), window.get("slots", 0)
        window_pad, skipped_steps = window.get("pad", 0), window.get("skipped", 0)
        overflow_steps = window.get("overflow", 0)
    while step < horizon:
        clock.start()
        sample_ids = [sampler.next_batch() for _ in range(cfg.grad_accum_steps)]
        batches = [train_data.make_batch(ids, bos_id) for ids in sample_ids]
        # The step's target tokens over all ranks: each token's loss is weighted by its inverse,
        # whatever the padding of each micro-batch (see lib/loss.py).
        local_tokens = torch.tensor(sum(b.n_targets for b in batches), device=device)
        step_tokens = int(accelerator.reduce(local_tokens, reduction="sum"))
        window_slots += sum(b.input_ids.size for b in batches)
        window_pad += sum(b.n_padding for b in batches)
        step_loss = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            labels = torch.from_numpy(batch.labels).to(device)
            with accelerator.accumulate(prepared):
                loss_sum, _ = forward_loss(batch, labels)
                if cfg.debug_nan_step == step + 1 and i == 0 and is_main:
                    loss_sum = loss_sum * float("nan")
                accelerator.backward(step_scaled_loss(loss_sum, step_tokens, world, cfg.grad_accum_steps))
                step_loss += loss_sum.detach()
                if accelerator.sync_gradients:
                    # the norm is always computed (clipping at infinity changes nothing) so that a
                    # non-finite gradient is caught before it reaches the weights
                    grad_norm = accelerator.clip_grad_norm_(
                        model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                    total_loss = accelerator.reduce(step_loss.clone(), reduction="sum")
                    lr = lr_at(step, horizon, cfg.optim)
                    # fp16: an overflowing gradient is the loss scaler's business (it skips the step)
                    bad = [what for what, value in (("loss", total_loss), ("gradient norm", grad_norm))
                           if not torch.isfinite(value) and not (what == "gradient norm" and
                                                                  accelerator.mixed_precision == "fp16")]
                    if bad and cfg.on_nonfinite == "stop":
                        found = ckpt.complete_checkpoints(run_dir)
                        raise UserError(
                            f"step {step + 1}: non-finite {' and '.join(bad)}; stopped before the optimizer step. "
                            f"Samples (block indices) of this step on rank {accelerator.process_index}: "
                            f"{[j for ids in sample_ids for j in ids]}. Weights are untouched; newest checkpoint: "
                            f"{found[-1] if found else 'none'}. Lower optim.lr, check those samples, or pass "
                            "--on_nonfinite skip")
                    if bad:
                        optimizer.zero_grad(set_to_none=True)
                        skipped_steps += 1
                        say(f"step {step + 1}: non-finite {' and '.join(bad)}; update skipped "
                            f"({skipped_steps} so far)")
                    else:
                        set_lr(optimizer, lr)
                        scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
                        optimizer.step()  # fp16: the scaler skips it if a gradient overflowed...
                        # ...and then lowers its scale. (Accelerate's optimizer_step_was_skipped
                        # misses skips made inside a fused AdamW kernel, ours on CPU and GPU.)
                        overflow_steps += scale is not None and accelerator.scaler.get_scale() < scale
                        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens
        if not bad:  # a skipped step's loss would make the whole logging window non-finite
            window_loss += step_loss
            window_tokens += step_tokens
        bar.update(1)
        clock.stop()
        if fit and fit_minutes is None and step >= fit_after and clock.ready:
            # every rank fixes the same horizon: the main process's figures, sent to all
            eval_s = last_eval.get("seconds") or time_eval_batches()
            ckpt_s = (sum(checkpoint_seconds) / len(checkpoint_seconds) if checkpoint_seconds
                      else max(0.1, n_params * 16 / 2e8))  # weights + Adam moments at ~200 MB/s
            plan = [budget.plan(step, cfg.max_steps, 60 * cfg.max_minutes,
                                elapsed_before + time.perf_counter() - t_start, clock.step_seconds,
                                eval_every=cfg.eval_every, eval_s=eval_s, checkpoint_every=cfg.checkpoint_every,
                                checkpoint_s=ckpt_s)]
            if world > 1:
                from accelerate.utils import broadcast_object_list

                broadcast_object_list(plan, from_process=0)
            horizon, why = plan[0]
            fit_minutes = cfg.max_minutes
            bar.total = horizon
            say(f"schedule fitted to the budget at step {step}: it ends at step {horizon} ({why})")

        if step % cfg.log_every == 0 or step == horizon:
            # mean over every target token since the last log line, all ranks
            loss = float(accelerator.reduce(window_loss, reduction="sum")) / max(window_tokens, 1)
            window_loss.zero_()
            window_tokens = 0
            now = time.perf_counter()
            tps = (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            t_log, tokens_at_log = now, tokens_seen
            gn = float(grad_norm)
            pad_frac = window_pad / max(window_slots, 1)
            window_slots = window_pad = 0
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)  # shown at its next redraw
            if is_main:
                padding = f" | padding {pad_frac:.1%}" if cfg.data.packing != "pack" else ""
                fp16 = fp16_state()
                scaling = (f" | loss scale {fp16['loss_scale']:g}, {fp16['overflow_steps']} overflow step(s)"
                           if fp16 else "")
                mfu = tps * fpt / (peak * world) if peak else None  # each process has its own device
                if mfu and mfu > 1 and not reprobed:  # above 100%: the peak was measured wrong (under load)
                    reprobed = True
                    old = peak
                    peak, _, peak_source = device_peak(device, refresh=True)
                    say(f"MFU {mfu:.0%} against {old / 1e12:.3f} TFLOP/s cannot be: measured the peak again: "
                        f"{peak / 1e12:.2f} TFLOP/s, the {peak_source}")
                    mfu = tps * fpt / (peak * world)
                write(bar, f"step {step:>6}/{horizon} | loss {loss:.4f} | lr {lr:.2e} | "
                          f"grad_norm {gn:.3f} | {tps:,.0f} tok/s | {tps * fpt / 1e9:.1f} GFLOP/s"
                          f"{f' | MFU {mfu:.1%}' if mfu else ''}{padding}{scaling}")
                metrics.write({"type": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": gn,
                               "horizon": horizon,
                               "tokens_seen": tokens_seen, "tokens_per_s": tps, "padding": pad_frac,
                               "mfu": mfu, "skipped_steps": skipped_steps, "elapsed_s": now - t_start,
                               **fp16})
            if not math.isfinite(loss):
                raise UserError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < horizon:
            run_eval()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < horizon:
            save_checkpoint()
        if (cfg.max_minutes and step < horizon
                and elapsed_before + time.perf_counter() - t_start > 60 * cfg.max_minutes):
            say(f"stopping at step {step} of {horizon} (lr {lr:.2e}): the {cfg.max_minutes:g} minute budget is spent")
            stopped_early = True
            break
        if cfg.stop_at_step is not None and step >= cfg.stop_at_step and step < horizon:
            say(f"stopping at step {step} (--stop_at_step); --resume auto continues from here")
            stopped_early = True
            break
    bar.close()
    train_secs = time.perf_counter() - t_start

    final_eval = run_eval()
    # Data-parallel replicas must hold the same weights: one job of world size N, not N jobs.
    # (FSDP holds one shard per process instead: nothing to compare.)
    in_sync = None
    if not sharded:
        params = accelerator.unwrap_model(prepared).parameters()
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum()
        sums = accelerator.gather(checksum.reshape(1).to(device)).tolist()
        in_sync = all(x == sums[0] for x in sums)
        if world > 1:
            say(f"weights identical on all {world} processes: {in_sync}")
    if metrics:
        metrics.write({"type": "final", "step": step, "world_size": world, "replicas_identical": in_sync,
                       "skipped_steps": skipped_steps, "tokens_seen": tokens_seen, **fp16_state()})
    save_checkpoint()
    # FSDP: every rank takes part in gathering the full weights
    full_state = accelerator.get_state_dict(prepared) if sharded or not use_lora else None
    if is_main:
        if fused is not None:
            fused.detach()  # a plain nn.Linear output layer again in what is saved
        final_model = accelerator.unwrap_model(prepared)
        if use_lora and sharded:  # peft saves and merges whole tensors: an unsharded copy, on this rank
            final_model = lora.apply(build_model(cfg.model, manifest["vocab_size"], manifest["special_ids"]), cfg.lora)
            final_model.load_state_dict(full_state)
            full_state = None
        if use_lora:  # the adapter alone, then the merged model that eval.py and generate load
            final_model.save_pretrained(str(run_dir / "final_adapter"), safe_serialization=True)
            final_model = final_model.merge_and_unload()
        write_final(final_model, tok_dir, run_dir / "final", full_state)
        best = ckpt.best_checkpoint(run_dir) if cfg.keep_best else None
        if best is not None:
            say(f"best checkpoint by held-out loss: {best}")
        metrics.close()
        plot_metrics(run_dir)
        (run_dir / "report.md").write_text(
            f"# Run {cfg.run_name}\n\n"
            f"- model: {cfg.model.arch}, {n_params / 1e6:.2f}M parameters, seq_len {cfg.data.seq_len}\n"
            f"- precision: {choice.name} ({choice.reason})\n"
            f"- steps: {step} of {horizon}{' (stopped early)' if stopped_early else ''}"
            f"{f', the schedule fitted to a {fit_minutes:g} minute budget' if fit_minutes else ''}"
            f", {tokens_seen:,} tokens; this process: {train_secs / 60:.1f} min, "
            f"{(tokens_seen - tokens_at_start) / max(train_secs, 1e-9):,.0f} tokens/s\n"
            f"- held-out, {held_out.description} ({final_eval['tokens']:,} tokens; the sample every "
            f"evaluation of the run scores): loss {final_eval['loss']:.4f}, "
            f"perplexity {final_eval['perplexity']:.2f}, bits/byte {final_eval['bits_per_byte']:.4f}, "
            f"next-token accuracy {final_eval['accuracy']:.3f}\n\n![loss](loss.png)\n",
            encoding="utf-8")
        say(f"done: {step} steps in {train_secs / 60:.1f} min; final model in {run_dir / 'final'}")
    # every process tears its process group down together: a rank that destroyed its gloo group
    # while the main one was still writing the final model once died with SIGABRT (FSDP2 on CPU)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
