"""Which run folder a training job writes, and whether it continues or starts over.

A run folder is never replaced by accident: starting a run whose folder holds anything needs
--resume auto (continue from its newest intact checkpoint) or --overwrite (delete it). One
exception, because nothing of value can be lost: `--resume auto` on a run that stopped before
its first checkpoint (and has no final model) starts it over.
"""
from __future__ import annotations

from pathlib import Path

from lib import checkpoint as ckpt
from lib.errors import UserError


def claim(accelerator, run_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Make `run_dir` ready for this job (every process calls this); return the checkpoint to
    resume from, or None for a fresh start (an existing folder then deleted, by the main process,
    only where allowed as above). A UserError says what to pass when the folder is in use."""
    run_dir = Path(run_dir)
    say = accelerator.print
    resume_from = ckpt.find_resume(run_dir, resume, say=say) if resume else None
    has_checkpoints = bool(ckpt.complete_checkpoints(run_dir))
    if resume == "auto" and resume_from is None and has_checkpoints and not overwrite:
        raise UserError(f"no checkpoint of {run_dir} passes its sha256 check (see the warnings above); "
                        "pass --overwrite to start the run over")
    started_only = (resume == "auto" and resume_from is None and run_dir.is_dir()
                    and not (run_dir / "final").exists() and not has_checkpoints)
    if started_only and any(run_dir.iterdir()):
        say(f"{run_dir} has no complete checkpoint to resume: starting it over")
    if resume_from is None and run_dir.exists() and any(run_dir.iterdir()):
        if not (overwrite or started_only):
            raise UserError(f"run folder {run_dir} already exists: pass --resume auto to continue it, "
                            "--overwrite to replace it, or another --run_name")
        if accelerator.is_main_process:
            ckpt.remove_run(run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    return resume_from
