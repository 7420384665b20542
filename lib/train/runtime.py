"""The processes, device and precision a training job runs with, set up in one call.

    runtime.prepare_environment(deterministic)     # before torch is imported
    accelerator, choice = runtime.start(precision, shapes, ...)

What it hides from the loop: CPU threads and malloc settings, a multi-process CPU launch made one
DDP job (not N independent ones), FSDP on CPU over gloo, precision decided on the main process by
measurement and shared with every rank (lib/train/precision.py), fp16 with a loss scaler on CPU, and
the reproducibility settings of --deterministic.
"""
from __future__ import annotations

import os


def prepare_environment(deterministic: bool) -> None:
    """Environment that MKL, oneDNN and cuBLAS read when they start: call before importing torch.
    Deterministic: MKL's reproducible mode, oneDNN kept off AMX (whose bf16 results varied between
    identical processes), a fixed cuBLAS workspace. A value the user set is kept."""
    if deterministic:
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def start(precision: str, shapes, *, grad_accum_steps: int, fp16_init_scale: float, threads: int | None,
          deterministic: bool, keep_freed_memory: bool, timeout_minutes: float = 10.0, say=None, kept=None):
    """(accelerator, precision Choice) for this process, every process of the launch calling it.

    `precision`: auto | fp32 | bf16 | fp16 (see lib/precision.resolve); `shapes`: the model's
    matrix products (m, k, n) that auto times on a CPU, or a function of the PartialState that
    returns them (called on every process once the process group exists). `threads`: torch intra-op threads (None:
    torch's choice; one under `deterministic` on a CPU). Prints, from the main process, what was
    chosen and why, and warns when a launcher's FSDP config cannot shard this job.
    `timeout_minutes`: the longest any collective (the process group's start included) waits for
    the other processes; past it, the collective fails (lib/errors turns that into one line naming
    the process and, where the script said, the step). `kept`: a resumed run's own precision
    choice, which auto takes instead of measuring (a run never changes precision midway).
    """
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradScalerKwargs

    from datetime import timedelta

    from lib import errors
    from lib.train import precision as precision_lib
    from lib.train.distributed import allow_fsdp_on_cpu, fsdp_requested
    from lib.errors import UserError
    from lib.model.build import cpu_only, fp16_on_cpu

    on_cpu = cpu_only()
    # set even to torch's own default: torch then also turns off MKL's dynamic thread count, which
    # could otherwise split a matrix product differently from one call to the next
    threads = threads or (1 if deterministic and on_cpu else torch.get_num_threads())
    torch.set_num_threads(threads)
    if keep_freed_memory:
        from lib.train.cpu import keep_freed_memory as keep

        keep()
    # the process group first (so that every rank uses the main process's precision choice), with
    # the time any process may wait for the others
    state = PartialState(cpu=on_cpu, timeout=timedelta(minutes=timeout_minutes))
    errors.collective_timeout_minutes = timeout_minutes
    cpu_fsdp = on_cpu and allow_fsdp_on_cpu()  # an FSDP launcher config on CPU: FSDP, not DDP
    if callable(shapes):  # decided once the processes exist (train.py sizes the model here)
        shapes = shapes(state)
    choice = precision_lib.resolve_on_main(precision, shapes, state, kept)
    accelerator = Accelerator(mixed_precision=choice.mixed_precision, cpu=on_cpu,
                              gradient_accumulation_steps=grad_accum_steps,
                              kwargs_handlers=[GradScalerKwargs(init_scale=fp16_init_scale)])
    say = say or accelerator.print
    from lib.progress import quiet_library_bars

    quiet_library_bars()
    world = accelerator.num_processes
    say(f"precision {choice.name}: {choice.reason}")
    if accelerator.mixed_precision == "fp16" and on_cpu:
        if cpu_fsdp:
            raise UserError("--precision fp16 on CPU does not combine with FSDP; use bf16 or fp32 there")
        fp16_on_cpu(accelerator, fp16_init_scale)
        say("fp16 on CPU: float16 autocast and a loss scaler, as on a GPU (slow on most CPUs: it is "
            "for trying that path)")
    if fsdp_requested() and not is_sharded(accelerator):
        how = "one process" if world == 1 else f"{world} processes, {accelerator.distributed_type.value}"
        say(f"warning: the launcher config asks for FSDP, but this job runs without it ({how}): nothing is sharded")
    elif cpu_fsdp:
        say(f"FSDP{accelerator.state.fsdp_plugin.fsdp_version} on CPU over gloo ({world} process(es)): parameters, "
            "gradients and optimizer state sharded")
    if deterministic:
        say(f"deterministic: {threads} CPU thread(s), MKL_CBWR=AUTO,STRICT, oneDNN without AMX, "
            "torch deterministic algorithms")
    return accelerator, choice


def is_sharded(accelerator) -> bool:
    """True when every process holds one shard of each weight (FSDP), not a whole replica."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def replicas_identical(accelerator, model) -> bool | None:
    """Data-parallel replicas must hold the same weights (one job of N processes, not N jobs):
    True when every process's weights sum to the same float64 checksum; None under FSDP (each
    process holds other shards: nothing to compare). Every process must call this."""
    if is_sharded(accelerator):
        return None
    import torch

    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    return all(x == sums[0] for x in sums)
