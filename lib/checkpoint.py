"""Resumable checkpoints: Accelerate state plus our counters, written so a crash never leaves a
folder that looks complete.

Each checkpoint is saved to `checkpoints/step_NNNNNNN.tmp`, then `trainer_state.json` (step,
tokens seen, data cursor, data hash, sha256 of every file) is written last, and the folder is
renamed into place. Only folders with that record count as checkpoints; old ones are pruned
after the new one is complete.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lib.corpus import sha256_file, write_json
from lib.errors import UserError

STATE = "trainer_state.json"
PREFIX = "step_"

__all__ = ["save", "load", "find_resume", "complete_checkpoints", "remove_run", "write_json"]


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()
             and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def verify(path: Path) -> dict:
    """Read a checkpoint's record and check every file's sha256; a UserError names a bad file."""
    state_file = path / STATE
    if not state_file.is_file():
        raise UserError(f"{path} is not a complete checkpoint (no {STATE})")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    for name, digest in state.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise UserError(f"checkpoint {path}: file {name} is missing")
        if sha256_file(f) != digest:
            raise UserError(f"checkpoint {path}: file {name} is corrupt (sha256 mismatch)")
    return state


def find_resume(run_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint to resume from: 'auto' = newest complete one (None if the run has none),
    else the given folder, which must exist."""
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder")
    return path


def save(accelerator, run_dir: str | Path, step: int, keep_last_n: int, state: dict) -> Path:
    """Save a checkpoint of `step` (all ranks call this), then prune to `keep_last_n`.

    A complete checkpoint of the same step is left as it is.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f"{PREFIX}{step:07d}.tmp"
    if (final / STATE).is_file():
        # already saved (a run resumed at its last step): the state is the same, and replacing
        # it would briefly leave no complete checkpoint behind
        return final
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / STATE, {**state, "files": files})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep_last_n]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, data_content_hash: str, allow_data_change: bool = False) -> dict:
    """Verify and restore a checkpoint into the prepared objects; return its trainer state.

    Resuming on data other than the checkpoint's (by token-shard content hash) is refused
    unless `allow_data_change`, in which case it is only reported.
    """
    state = verify(path)
    if state.get("data_content_hash") != data_content_hash:
        msg = (f"checkpoint {path} was trained on other data (token content hash "
               f"{str(state.get('data_content_hash'))[:12]}, this run's data {data_content_hash[:12]})")
        if not allow_data_change:
            raise UserError(msg + "; pass --allow_data_change to resume on the new data anyway")
        accelerator.print(f"warning: {msg}; resuming anyway (--allow_data_change)")
    accelerator.load_state(str(path))
    return state


def remove_run(run_dir: str | Path) -> None:
    """Delete a run folder (only called with an explicit --overwrite)."""
    shutil.rmtree(run_dir)
