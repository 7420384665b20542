"""Files: content hashes, JSON, and writers that never leave a half-written file or folder.

Every stage (corpus, tokenizer, token shards, checkpoints, metrics, the final model) writes
through these: a file or folder is built under a temporary name beside its target and renamed
into place only once complete (a rename within a folder is atomic), so a crash leaves either the
old version or the new one, never a mixture. The temporary name of a file carries the process id
(two processes may write the same cache file at once); a temporary folder is `<name>.tmp`,
cleared by the next write of that folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from lib.errors import UserError

__all__ = ["sha256_file", "check_sha256", "sha256_mismatches", "folder_digest", "canonical_hash", "read_json", "write_json", "atomic_file", "atomic_text", "atomic_npy",
           "npy_header", "atomic_folder", "fresh_folder", "publish_folder", "fsync", "fsync_tree", "ensure_writable",
           "write_checksums", "verify_checksums", "CHECKSUMS", "tmp_folder"]

CHECKSUMS = "checksums.json"  # a folder's own record of its files' sha256 (exported models)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no whitespace): equal for equal content,
    whatever the key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_json(path: str | Path, what: str = "file"):
    """Parse a JSON file; a missing, unreadable or malformed one is a UserError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{what} {path} cannot be read as JSON ({str(exc).splitlines()[0][:200]})") from None


def fsync(path: str | Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under `root`, and the folders themselves, to disk."""
    root = Path(root)
    for p in sorted(root.rglob("*")) + [root]:
        fsync(p)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", durable: bool = False) -> Iterator:
    """Open `path` for writing ("w" text as UTF-8 with LF newlines, or "wb") under a temporary
    name; rename it into place only when the block finishes (flushed to disk first when
    `durable`), and delete the temporary file when the block raises: `path` is then untouched."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with (open(tmp, mode, encoding="utf-8", newline="\n") if "b" not in mode else open(tmp, mode)) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_text(path: str | Path) -> contextlib.AbstractContextManager:
    """`atomic_file(path, "w")`: a text file that appears complete or not at all."""
    return atomic_file(path, "w")


def write_json(path: str | Path, obj) -> None:
    """Write `obj` as indented JSON (sorted keys, UTF-8) atomically and flushed to disk."""
    with atomic_file(path, "w", durable=True) as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


class _NpyRows:
    """Raw rows appended to an open .npy file (see atomic_npy)."""

    def __init__(self, f, row_bytes: int):
        self.f, self.row_bytes, self.nbytes = f, row_bytes, 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.nbytes += len(data)


_NPY_HEADER_BYTES = 128  # room for any shape's digits; a multiple of 64, as the format asks


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly _NPY_HEADER_BYTES bytes (the format allows spaces
    before its final newline), so it can be written before the length is known and again after."""
    import numpy as np

    body = repr({"descr": np.dtype(dtype).str, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    room = _NPY_HEADER_BYTES - 10  # magic (6), version (2), header length (2)
    if len(body) >= room:
        raise ValueError(f"a .npy header for shape {shape} does not fit {_NPY_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + room.to_bytes(2, "little") + body.ljust(room - 1) + b"\n"


@contextlib.contextmanager
def atomic_npy(path: str | Path, dtype: str, row_shape: tuple[int, ...] = ()):
    """Stream a .npy array of unknown length: yields an appender taking raw bytes of `dtype`
    rows of `row_shape`. The real shape is written when the block finishes, then the file is
    renamed into place (as atomic_file). np.load (memory-mapped too) reads the result."""
    import numpy as np

    row_items = int(np.prod(row_shape, dtype=np.int64))
    with atomic_file(path, "wb") as f:
        f.write(npy_header(dtype, (0, *row_shape)))
        out = _NpyRows(f, row_items * np.dtype(dtype).itemsize)
        yield out
        rows, rest = divmod(out.nbytes, out.row_bytes)
        if rest:
            raise ValueError(f"{path}: {out.nbytes} bytes written, not whole rows of {out.row_bytes}")
        f.seek(0)
        f.write(npy_header(dtype, (rows, *row_shape)))


def tmp_folder(path: str | Path) -> Path:
    """Where a new version of folder `path` is built: `<path>.tmp` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def fresh_folder(path: str | Path) -> Path:
    """An empty `<path>.tmp` folder beside `path` (what an earlier, interrupted write left there
    is deleted) to build a new version of `path` in; publish it with publish_folder."""
    tmp = tmp_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: str | Path, path: str | Path, durable: bool = False) -> Path:
    """Put the finished folder `tmp` in place of `path`: an old `path` is first renamed aside
    (`<path>.old`) and deleted only after the new one is in place, so at every instant `path` is
    either the old version or the new one. `durable`: flush every file to disk first."""
    tmp, path = Path(tmp), Path(path)
    if durable:
        fsync_tree(tmp)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if durable:
        fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


class FolderWrite:
    """The folder being written by atomic_folder: `path` to write into; `discard()` to keep the
    existing folder after all (nothing new to publish)."""

    def __init__(self, path: Path):
        self.path, self.discarded = path, False

    def discard(self) -> None:
        self.discarded = True


@contextlib.contextmanager
def atomic_folder(path: str | Path, durable: bool = False) -> Iterator[FolderWrite]:
    """Build a new version of folder `path` in a temporary folder and publish it when the block
    finishes (unless discarded); when the block raises, the temporary folder is deleted and
    `path` is left exactly as it was."""
    write = FolderWrite(fresh_folder(path))
    try:
        yield write
        if not write.discarded:
            publish_folder(write.path, path, durable)
    finally:
        shutil.rmtree(write.path, ignore_errors=True)


def ensure_writable(folder: str | Path, option: str) -> Path:
    """Create `folder` if needed and check a file can be written in it, before any work is done:
    a UserError naming `option` and the folder otherwise (a read-only or full file system, no
    permission)."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {folder} is not writable ({exc.strerror or exc}); pick a folder you can "
                        "write to") from None
    return folder


@contextlib.contextmanager
def no_empty_folder_left(folder: str | Path) -> Iterator[Path]:
    """For a command that creates `folder`: when the block raises and `folder` did not exist
    before, remove the empty folders it left there (bottom up; a file, and so any folder holding
    one, is never removed), so a failed run leaves no empty output folder behind."""
    folder = Path(folder)
    existed = folder.exists()
    try:
        yield folder
    except BaseException:
        if not existed and folder.is_dir():
            for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts),
                              reverse=True) + [folder]:
                with contextlib.suppress(OSError):
                    sub.rmdir()  # only succeeds on an empty folder
        raise


def write_checksums(folder: str | Path) -> dict:
    """Record the sha256 of every file under `folder` in `folder/checksums.json` (returned)."""
    folder = Path(folder)
    sums = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}
    write_json(folder / CHECKSUMS, sums)
    return sums


def check_sha256(table: dict[str, str], digest_of, where: str) -> None:
    """The one check of a file -> sha256 record (an exported model's checksums.json, a checkpoint's
    trainer_state.json, a packed checkpoint's members): `digest_of(name)` gives the sha256 of the
    file as it is now, or None when it is missing; a UserError names the first missing or changed
    file, as `where` (with {name} in it) says it."""
    for name, why in sha256_mismatches(table, digest_of, first_only=True):
        raise UserError(f"{where.replace('{name}', name)} is {why}")


def sha256_mismatches(table: dict[str, str], digest_of, first_only: bool = False) -> list[tuple[str, str]]:
    """(file, "missing" or "corrupt (sha256 mismatch)") for each file of a file -> sha256 table
    that does not match (see check_sha256), in the table's order; the first only if asked."""
    bad = []
    for name, digest in table.items():
        actual = digest_of(name)
        if actual != digest:
            bad.append((name, "missing" if actual is None else "corrupt (sha256 mismatch)"))
            if first_only:
                break
    return bad


def folder_digest(folder: str | Path):
    """digest_of for check_sha256 over the files of `folder`."""
    folder = Path(folder)
    return lambda name: sha256_file(folder / name) if (folder / name).is_file() else None


def verify_checksums(folder: str | Path) -> dict[str, str]:
    """Check every file `folder/checksums.json` lists against its sha256; the verified table (file
    -> sha256), or a UserError naming the first missing or changed file (or the unreadable record)."""
    folder = Path(folder)
    sums = read_json(folder / CHECKSUMS, "checksum record")
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise UserError(f"{folder / CHECKSUMS} is corrupt (not a file -> sha256 table)")
    check_sha256(sums, folder_digest(folder), f"{folder}/{{name}} (listed in {CHECKSUMS})")
    return sums
