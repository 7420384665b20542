"""A checkpoint as one compressed file, and back.

    pack(checkpoints/step_0000400)        -> checkpoints/step_0000400.tar.gz
    unpack(step_0000400.tar.gz, run/checkpoints) -> run/checkpoints/step_0000400 (verified)

The archive holds the checkpoint folder as it is, its trainer_state.json included, which records
the sha256 of every file: a checkpoint is verified before it is packed, the archive is read back
and checked against those hashes before `pack` returns (and before it deletes anything), and an
unpacked checkpoint is verified before it is put in place. The gzip stream is read to its end,
so its trailer (CRC and length) is checked as well. `train.py --resume ARCHIVE` unpacks into the run's checkpoints/ first.
"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import tarfile
import zlib
from pathlib import Path

from lib.records.checkpoint_record import STATE, verify as verify_folder
from lib.errors import UserError
from lib.files import check_sha256

SUFFIX = ".tar.gz"


def is_archive(path: str | Path) -> bool:
    return Path(path).name.endswith(SUFFIX) and Path(path).is_file()


def _check_members(archive: Path) -> tuple[str, dict[str, str]]:
    """(the checkpoint folder's name inside, sha256 of every file), read from the archive itself and
    checked against the sha256 its trainer_state.json records: a UserError names a damaged file."""
    import json

    try:
        # streamed through gzip and read to its very end: the trailer's CRC and length are checked
        # too (tarfile alone stops at the tar's end marker, before the gzip trailer)
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            digests, top, record = {}, None, None
            for member in tar:
                parts = Path(member.name).parts
                if not parts or member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise UserError(f"{archive}: unexpected entry {member.name!r}; not a checkpoint archive")
                top = top or parts[0]
                if member.isfile():
                    name, data = Path(*parts[1:]).as_posix(), tar.extractfile(member).read()
                    digests[name] = hashlib.sha256(data).hexdigest()
                    record = data if name == STATE else record
            while gz.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{archive} is damaged or not a {SUFFIX} archive ({exc})") from None
    if top is None or record is None:
        raise UserError(f"{archive} holds no checkpoint ({STATE} missing)")
    try:
        recorded = json.loads(record)["files"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{archive} is damaged: its {STATE} cannot be read") from None
    check_sha256(recorded, digests.get, f"{archive} is damaged: {{name}}")
    return top, digests


def verify(archive: str | Path) -> dict[str, str]:
    """Check a packed checkpoint without unpacking it: every file against its trainer_state.json
    record, gzip's trailer included; returns file -> sha256, or a UserError naming the damage."""
    return _check_members(Path(archive))[1]


def pack(checkpoint: str | Path, out: str | Path | None = None, remove: bool = False,
         compresslevel: int = 6) -> Path:
    """Write `checkpoint` (a verified checkpoint folder) as one gzip-compressed tar, `out` or
    `<folder>.tar.gz` beside it, then read it back and check every file's sha256; with `remove`,
    only then delete the folder. Returns the archive's path."""
    from lib.files import atomic_file

    checkpoint = Path(checkpoint)
    verify_folder(checkpoint)  # a UserError names a missing or changed file
    out = Path(out) if out else checkpoint.with_name(checkpoint.name + SUFFIX)
    with atomic_file(out, "wb") as f:
        with tarfile.open(fileobj=f, mode="w:gz", compresslevel=compresslevel) as tar:
            tar.add(checkpoint, arcname=checkpoint.name, recursive=True)
    try:
        _check_members(out)  # read back: every file against the record verified above
    except UserError as exc:
        out.unlink()
        raise UserError(f"{exc}; written from {checkpoint}, which is left as it was") from None
    if remove:
        shutil.rmtree(checkpoint)
    return out


def unpack(archive: str | Path, checkpoints_dir: str | Path) -> Path:
    """Put the checkpoint of `archive` into `checkpoints_dir` (under its own name), verified; an
    existing complete checkpoint of that name is used as it is. Returns its folder."""
    from lib.files import fresh_folder, publish_folder

    archive, checkpoints_dir = Path(archive), Path(checkpoints_dir)
    top, _ = _check_members(archive)
    target = checkpoints_dir / top
    if (target / STATE).is_file():
        verify_folder(target)
        return target
    tmp = fresh_folder(target)  # extracted and verified there; the checkpoint appears whole or not at all
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")
        verify_folder(tmp / top)
        publish_folder(tmp / top, target, durable=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
