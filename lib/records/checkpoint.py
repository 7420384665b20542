"""Resumable checkpoints: Accelerate state plus our counters, written so a crash never leaves a
folder that looks complete.

Each checkpoint is saved to `checkpoints/step_NNNNNNN.tmp`, every file is flushed to disk
(fsync), `trainer_state.json` (step, tokens seen, data cursor, data hash, sha256 of every file)
is written last, and the folder is renamed into place. Only folders with that record count as
checkpoints. Old ones are pruned after the new one is complete, by first renaming them to
`*.deleting` (atomic), so that a crash in the middle of a deletion never leaves a half-deleted
folder that still looks complete. Leftover `.tmp` and `.deleting` folders are cleared on the
next save.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path

from lib.records.checkpoint_record import (PREFIX, RANDOM_STATE, REQUIRED, SHARDS, STATE, _step_of,  # noqa: F401
                                   complete_checkpoints,
                                   step_dir, verify)
from lib.files import fresh_folder, publish_folder, tmp_folder, sha256_file, write_json
from lib.errors import UserError


def _not_the_tied_weights_note(record) -> bool:
    """Accelerate warns at every save of a model with tied input and output embeddings that it
    dropped the output copy ("Removed shared tensor ... while saving"): expected, since the tie
    is rebuilt on load (the resume tests check every weight bitwise), so the line is dropped."""
    return "Removed shared tensor" not in record.getMessage()


logging.getLogger("accelerate.utils.other").addFilter(_not_the_tied_weights_note)

TEST_PAUSE = "LM_TEST_PAUSE_IN_SAVE_S"  # seconds each save waits, files written but not its record

__all__ = ["save", "load", "find_resume", "complete_checkpoints", "best_checkpoint", "assert_finite",
           "is_sharded", "tensor_names"]


def is_sharded(path: Path) -> bool:
    """True for a checkpoint written by an FSDP job (one shard of the weights per process)."""
    return (Path(path) / SHARDS / ".metadata").is_file()


def tensor_names(path: Path) -> set[str]:
    """Names of the model tensors a checkpoint holds, plain (model.safetensors) or sharded."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    if is_sharded(path):
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(path / SHARDS)).read_metadata().state_dict_metadata
        return {k[len("model."):] for k in keys if k.startswith("model.")}
    raise UserError(f"{path} holds no model weights (neither model.safetensors nor {SHARDS}/)")


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint to `<name>.corrupt` (`.corrupt-2`, ... if taken): no longer a
    checkpoint, so its step is written anew when reached again, and kept for a person to look at
    (never deleted by pruning)."""
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.replace(path, target)
    return target


def archived_checkpoints(run_dir: str | Path) -> list[Path]:
    """Packed checkpoints of a run (`checkpoints/step_NNNNNNN.tar.gz`, scripts/audit.py pack),
    oldest first."""
    from lib.records.archive import SUFFIX

    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*{SUFFIX}")
             if p.is_file() and p.name[len(PREFIX):-len(SUFFIX)].isdigit()]
    return sorted(found, key=_step_of)


def find_resume(run_dir: str | Path, resume: str, say=print) -> Path | None:
    """The checkpoint to resume from: 'auto' = the newest that verifies, a complete folder or a
    packed archive (unpacked into checkpoints/ first; a folder is tried before an archive of the
    same step), falling back past corrupt ones, each reported (a folder is set aside as
    `.corrupt`, an archive left as it is); None if the run has none. Else the given folder (or a
    `.tar.gz` archive of one, unpacked into the run's checkpoints/ first), which must exist and
    verify. Call it on one process (it renames corrupt folders)."""
    from lib.records import archive

    if resume == "auto":
        found = [(_step_of(p), 1, p) for p in complete_checkpoints(run_dir)]
        found += [(_step_of(p), 0, p) for p in archived_checkpoints(run_dir)]
        for _, is_folder, path in sorted(found, reverse=True):
            try:
                if is_folder:
                    verify(path)
                    return path
                target = archive.unpack(path, Path(run_dir) / "checkpoints")
                say(f"unpacked {path} into {target}")
                return target
            except UserError as exc:
                if is_folder:
                    say(f"warning: skipping {path}: {exc}; moved aside to {set_aside(path)}")
                else:
                    say(f"warning: skipping {path}: {exc} (left as it is)")
        return None
    path = Path(resume)
    if archive.is_archive(path):  # a packed checkpoint (scripts/audit.py pack): into this run's checkpoints/
        target = archive.unpack(path, Path(run_dir) / "checkpoints")
        say(f"unpacked {path} into {target}")
        return target
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint folder (or {archive.SUFFIX} archive)")
    verify(path)
    return path


def _clear_leftovers(root: Path) -> None:
    """Remove what an interrupted save or prune left: step_*.tmp and *.deleting folders."""
    for p in root.glob(f"{PREFIX}*"):
        if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".deleting")):
            shutil.rmtree(p, ignore_errors=True)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the lowest recorded held-out loss (None if none has one)."""
    scored = []
    for path in complete_checkpoints(run_dir):
        try:
            loss = json.loads((path / STATE).read_text(encoding="utf-8")).get("val_loss")
        except (OSError, ValueError):
            continue
        if isinstance(loss, (int, float)) and loss == loss and abs(loss) != float("inf"):
            scored.append((loss, path))
    return min(scored, key=lambda x: x[0])[1] if scored else None  # the earliest of equals


def _delete(checkpoint: Path) -> None:
    """Delete a checkpoint folder: renamed to `*.deleting` first (atomic), so that it is no longer
    a checkpoint from that instant on and an interrupted deletion leaves nothing that looks whole."""
    doomed = checkpoint.with_name(checkpoint.name + ".deleting")
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed)


def prune(run_dir: str | Path, keep_last_n: int, keep_best: bool = False) -> list[Path]:
    """Delete all but the newest `keep_last_n` complete checkpoints (never the newest one) and,
    with `keep_best`, the one with the lowest held-out loss."""
    if keep_last_n < 1:
        raise UserError("keep_last_n must be at least 1")
    spared = best_checkpoint(run_dir) if keep_best else None
    removed = []
    for old in complete_checkpoints(run_dir)[:-keep_last_n]:
        if old == spared:
            continue
        _delete(old)
        removed.append(old)
    return removed


def assert_finite(model, step: int) -> None:
    """A UserError naming the first parameter of `model` (this process's shard, under FSDP) that
    holds a NaN or infinity: such weights are never written over a good checkpoint."""
    import torch

    for name, p in model.named_parameters():
        if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all():
            raise UserError(f"step {step}: parameter {name} holds non-finite values; not writing a checkpoint "
                            "(the newest complete one is kept)")


def folder_bytes(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _room_for(root: Path, need: int, keep_last_n: int = 1, has_checkpoint: bool = False) -> str | None:
    """None when the file system holding `root` has room for `need` bytes (and some to spare),
    else the UserError message saying it does not (suggesting --keep_last_n 1 only where it would
    free something: older checkpoints exist and more than one is kept)."""
    free = shutil.disk_usage(root).free
    if free >= _with_margin(need):
        return None
    fewer = (" (older runs, or pass --keep_last_n 1: older checkpoints are then deleted to make room before a new "
             "one is written)") if has_checkpoint and keep_last_n > 1 else " (older runs, other files)"
    return (f"disk full: {free / 1e6:.1f} MB free on the file system of {root}, and a checkpoint of this run takes "
            f"about {_with_margin(need) / 1e6:.1f} MB with its margin; free some space there{fewer}, then run "
            "again with --resume auto (nothing written so far is lost)")


def _with_margin(need: int) -> int:
    return int(need * 1.05) + (1 << 20)


def _make_room(run_dir: Path, need: int, keep_last_n: int, keep_best: bool, say) -> None:
    """Before a save the disk has no room for: delete, oldest first, the checkpoints that pruning
    would delete once the new one is complete anyway, as few as make room; nothing when even all
    of them would not (the UserError of `save` follows). With keep_last_n 1 this may delete the
    only checkpoint before its successor is written: the price of a disk with room for one."""
    root = Path(run_dir) / "checkpoints"
    free = shutil.disk_usage(root).free
    if free >= _with_margin(need):
        return
    spared = best_checkpoint(run_dir) if keep_best else None
    existing = complete_checkpoints(run_dir)
    doomed = [p for p in existing[:len(existing) - (keep_last_n - 1)] if p != spared]
    sizes = [folder_bytes(p) for p in doomed]
    if free + sum(sizes) < _with_margin(need):
        return
    for path, size in zip(doomed, sizes):
        _delete(path)
        say(f"disk nearly full ({free / 1e6:.1f} MB free): deleted {path} now, not after the next checkpoint is "
            f"written (--keep_last_n {keep_last_n}), to make room for it")
        free += size
        if free >= _with_margin(need):
            return


def save(accelerator, run_dir: str | Path, step: int, keep_last_n: int, state: dict,
         keep_best: bool = False, expect_bytes: int = 0, say=print) -> Path:
    """Save a checkpoint of `step` (all ranks call this), then prune to `keep_last_n` (and the
    best by `state["val_loss"]` with `keep_best`). `state` is the trainer record (written by the
    main process), saved as trainer_state.json with the sha256 of every file.

    A complete checkpoint of the same step is left as it is. Out of space: checked first, against
    the size of the newest checkpoint (`expect_bytes` before there is one); where the checkpoints
    this save would prune anyway free enough, they are deleted first (`_make_room`, saying so),
    else a UserError on every process says the disk is full and where, the complete checkpoints
    untouched. A save that fails anyway is removed, with the same error.
    """
    from lib.train.distributed import broadcast_from_main

    root = Path(run_dir) / "checkpoints"
    final = step_dir(run_dir, step)
    tmp = tmp_folder(final)  # made by fresh_folder on the main process, written by every process
    if (final / STATE).is_file():
        # already saved (a run resumed at its last step): the state is the same, and replacing
        # it would briefly leave no complete checkpoint behind
        return final
    full, newest = None, complete_checkpoints(run_dir)
    need = folder_bytes(newest[-1]) if newest else expect_bytes
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(root)
        _make_room(Path(run_dir), need, keep_last_n, keep_best, say)
        full = _room_for(root, need, keep_last_n, bool(newest))
        if full is None:
            fresh_folder(final)  # = tmp
    full = broadcast_from_main(full, accelerator)
    if full:
        raise UserError(full)
    try:
        accelerator.save_state(str(tmp))
        if os.environ.get(TEST_PAUSE):  # tests: hold the unfinished save open, so a kill surely lands in it
            time.sleep(float(os.environ[TEST_PAUSE]))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / STATE, {**state, "files": files})  # the completion record, last
            # (an incomplete folder of the final name, without a record, is no checkpoint: replaced)
            publish_folder(tmp, final, durable=True)
    except (OSError, RuntimeError) as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        full = _room_for(root, need, keep_last_n, bool(newest))
        if full is None and not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)):
            raise
        raise UserError(f"writing checkpoint {final} failed: {full or str(exc)}") from None
    if accelerator.is_main_process:
        prune(run_dir, keep_last_n, keep_best)
    accelerator.wait_for_everyone()
    return final


def restorable_random_state(path: Path, process_index: int) -> None:
    """A UserError unless this process's random state in checkpoint `path` can be read: Accelerate
    resumes without it and only logs so at info level, and the resumed run then draws other
    dropout masks and batches than the straight one would have."""
    from accelerate.utils import load as load_pickle

    name = RANDOM_STATE.format(process_index)
    if not (path / name).is_file():
        written = len(list(path.glob(RANDOM_STATE.format("*"))))
        raise UserError(f"checkpoint {path} has no {name}: it was written by a job of {written} process(es) and this "
                        f"one has more, so process {process_index} has no random state to continue; resume with "
                        f"{written} process(es)")
    try:
        states = load_pickle(path / name)
        if not isinstance(states, dict) or "torch_manual_seed" not in states:
            raise ValueError("no torch random state in it")
    except Exception as exc:  # noqa: BLE001 -- whatever torch.load raises: unusable either way
        raise UserError(f"checkpoint {path}: its random state {name} cannot be restored ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''}), so a resume could not be exact; "
                        "resume from an earlier checkpoint (--resume checkpoints/step_...)") from None


def load(accelerator, path: Path, data_content_hash: str, allow_data_change: bool = False,
         strict: bool = True, check=None) -> dict:
    """Verify and restore a checkpoint into the prepared objects; return its trainer state.

    Resuming on data other than the checkpoint's (by token-shard content hash) is refused
    unless `allow_data_change`, in which case it is only reported. `check(state)`, if given,
    runs after the files are verified and before anything is restored. `strict=False` loads a
    checkpoint holding only some of the model's tensors (LoRA adapters, which `check` vets).
    """
    state = verify(path)
    if check is not None:
        check(state)
    if state.get("data_content_hash") != data_content_hash:
        msg = (f"checkpoint {path} was trained on other data (token content hash "
               f"{str(state.get('data_content_hash'))[:12]}, this run's data {data_content_hash[:12]})")
        if not allow_data_change:
            raise UserError(msg + "; pass --allow_data_change to resume on the new data anyway")
        accelerator.print(f"warning: {msg}; resuming anyway (--allow_data_change)")
    from accelerate.utils import DistributedType

    fsdp, shards = accelerator.distributed_type == DistributedType.FSDP, is_sharded(path)
    if shards != fsdp:
        raise UserError(f"checkpoint {path} was written by {'an FSDP' if shards else 'a non-FSDP'} job "
                        f"and this one {'uses' if fsdp else 'does not use'} FSDP; resume with the launcher config "
                        "it was written with (its provenance.json names the distributed type)")
    restorable_random_state(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path), strict=strict)
    except RuntimeError as exc:  # torch: "Error(s) in loading state_dict ... size mismatch for ..."
        detail = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if not any("state_dict" in line or "size mismatch" in line for line in detail):
            raise
        raise UserError(f"checkpoint {path} does not fit this model ({detail[-1][:300]}); resume with the "
                        "model and --lora options the run started with (see its config.yaml)") from None
    return state
