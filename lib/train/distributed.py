"""FSDP on CPU: run a launcher's FSDP config over gloo, to try sharding before paying for GPUs.

torch's FSDP2 (`fully_shard`) runs on CPU tensors over gloo, but Accelerate applies FSDP only when
its launch looks like a GPU one: given `distributed_type: FSDP` with `use_cpu: true` it quietly
makes the job plain CPU DDP. `allow_fsdp_on_cpu()`, called before the Accelerator is built, lets
Accelerate take its FSDP path on CPU as well: sharded parameters, gradients and optimizer state,
sharded checkpoints, gathered final weights -- the code paths an FSDP job on GPUs runs.

    accelerate launch --config_file configs/accelerate/cpu_fsdp2.yaml scripts/train.py ...
"""
from __future__ import annotations

import os


def fsdp_requested() -> bool:
    """True when the launcher was given an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def allow_fsdp_on_cpu() -> bool:
    """Before `Accelerator(cpu=True)`: when an FSDP config launched several CPU processes, make
    Accelerate apply FSDP instead of falling back to DDP. True if it did.

    Accelerate promotes a multi-process GPU-type state to FSDP; its CPU state (gloo) is set up
    first, as usual, then relabelled so that the promotion happens. Device and backend stay CPU
    and gloo.
    """
    if not fsdp_requested():
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False  # a single process (nothing to shard), or already a GPU-type launch
    state.distributed_type = DistributedType.MULTI_GPU
    return True


def broadcast_from_main(value, state):
    """The main process's `value` (any picklable object) on every process of `state` (an
    Accelerator or PartialState); every process must call this, the others' `value` is ignored."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
