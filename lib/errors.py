"""User-facing errors: a clear message and a non-zero exit, never a wall of traceback."""
from __future__ import annotations

import errno
import functools
import os
import sys


class UserError(Exception):
    """Bad input the user can fix. The message must name the file, line or option at fault."""


class ConfigError(UserError):
    """A config file or flag that does not fit the script's config dataclass."""


_where = [lambda: f"process {os.environ.get('RANK', '0')}"]
_output: list = []  # the folder the script writes into, named when a full disk has no file name
collective_timeout_minutes: float | None = None  # set by lib/runtime.start, for the message


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (just `Type` without one): an exception in a warning."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_at_exit: list = []
_said: list = []  # the one-line error the wrapper printed last (status.json records it)


def last_error() -> str | None:
    """The message of the one-line error the wrapper printed as the script ended (None before)."""
    return _said[-1] if _said else None


def _fail(message: str, code: int):
    """Print `error: message` to stderr, remember it (last_error), exit with `code`."""
    _said.append(message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def at_exit(callback) -> None:
    """Have `callback(exc)` called once when the wrapped main() ends: exc is None after a normal
    return, else what ended it (SystemExit included). For closing what a run opened beside its
    files (an MLflow run) with the right status; an error inside it is printed, never raised."""
    _at_exit.append(callback)


def _run_at_exit(exc: BaseException | None) -> None:
    callbacks, _at_exit[:] = list(_at_exit), []
    for callback in callbacks:
        try:
            callback(exc)
        except Exception as error:  # noqa: BLE001 -- cleanup must not hide what ended the run
            print(f"warning: while finishing: {type(error).__name__}: {error}", file=sys.stderr)


def writing_to(folder) -> None:
    """Tell the error wrapper which folder this script writes, for a disk-full message whose error
    names no file."""
    _output[:] = [folder]


def is_disk_full(exc: BaseException) -> bool:
    """True for a full disk or quota, as an OSError or as a library's own error that only says so
    in its text (safetensors' SafetensorError: 'No space left on device (os error 28)')."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is None and " requested and " in text and text.endswith(" written"):
        return True  # numpy's short write (ndarray.tofile inside np.save): the file system took no more
    return any(s in text for s in ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded"))


def free_mb(path) -> str:
    """Free space of the file system holding `path` (or its nearest existing parent), as text."""
    import shutil
    from pathlib import Path

    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 1e6:.1f} MB free there"
    except OSError:
        return "free space unknown"


def json_error(exc) -> str:
    """A json.JSONDecodeError as words with its column: 'Expecting value at column 5',
    'Unterminated string starting at column 12'."""
    msg = exc.msg
    return f"{msg} column {exc.colno}" if msg.endswith(" at") else f"{msg} at column {exc.colno}"


def _out_of_memory(exc: BaseException) -> str | None:
    """The one-line message for running out of memory (host or GPU), or None if `exc` is not that."""
    import re

    text = str(exc)
    oom = isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and any(s in text for s in ("can't allocate memory", "out of memory",
                                                                    "Cannot allocate memory")))
    if not oom:
        return None
    size = ""
    found = re.search(r"allocate (\d+) bytes", text)
    if found:
        size = f" (an allocation of {int(found.group(1)) / 2**30:.2f} GiB failed)"
    else:
        found = re.search(r"[Tt]ried to allocate ([\d.]+ [KMG]iB)", text)
        size = f" (an allocation of {found.group(1)} failed)" if found else ""
    return (f"out of memory{size}: use a smaller batch, sequence or model (train.py: --micro_batch_size with more "
            "--grad_accum_steps keeps each step the same, or --fit_micro_batch finds one that fits; eval.py: "
            "--batch_size), or free memory; a training run continues from its newest checkpoint with --resume auto")


def _permission(exc: OSError) -> str:
    """What a permission or read-only error means for the file it names."""
    from pathlib import Path

    name = exc.filename
    if exc.errno == errno.EROFS:
        return f"not writable: {name or 'the output'} is on a read-only file system ({exc.strerror}); pick a " \
               "folder you can write to"
    if name is None:
        return f"permission denied ({exc.strerror}); check the permissions of the files and folders given"
    path = Path(name)
    if path.exists():
        if not os.access(path, os.R_OK):
            return f"cannot read {name} ({exc.strerror}): make it readable to you, or pass another file"
        if not os.access(path, os.W_OK):
            return f"not writable: {name} ({exc.strerror}); pick a folder you can write to"
        return f"permission denied on {name} ({exc.strerror}); check its permissions"
    return f"not writable: cannot create {name} ({exc.strerror}); pick a folder you can write to"


def where_am_i(describe) -> None:
    """Tell the error wrapper how to say where this process is (e.g. its rank and step), for the
    one line it prints when a wait for the other processes fails."""
    _where[:] = [describe]


def _collective_failure(exc: BaseException) -> str | None:
    """What went wrong, when `exc` is a collective or rendezvous that failed because of the other
    processes (a timeout, or a peer that went away); None for anything else."""
    text = str(exc)
    if any(s in text for s in ("Timed out", "timed out", "Timeout", "DistStoreError")):
        limit = f" {collective_timeout_minutes:g} min" if collective_timeout_minutes else ""
        return (f"waited more than{limit} for the other processes (one of them died, hangs, or works alone for "
                "longer: then raise --dist_timeout_minutes); its own error, if any, is in the log")
    if any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "another process of the job went away (its own error, if any, is in the log)"
    return None


def exit_on_user_error(main):
    """Wrap a script's main(): a UserError prints `error: <message>` to stderr and exits 2, and so
    do a full disk, a file that cannot be read or written (naming it) and running out of memory;
    Ctrl-C outside the training loop's own handling prints one line and exits 130; a wait for the
    other processes that failed (timeout, a peer gone) prints where this process was, exit 3.

    Anything else propagates with its traceback, since it is a bug rather than bad input. With
    LM_DEBUG=1 in the environment, every error shows its traceback. Callbacks registered with
    at_exit run when main() ends, however it ends.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        _said.clear()
        try:
            result = guarded(*args, **kwargs)
        except BaseException as exc:
            _run_at_exit(exc)
            raise
        _run_at_exit(None)
        return result

    def guarded(*args, **kwargs):
        if os.environ.get("LM_DEBUG"):  # LM_DEBUG=1: every error with its traceback
            return main(*args, **kwargs)
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc), 2)
        except KeyboardInterrupt:
            _fail("interrupted (Ctrl-C); what was written completely is kept (a training run continues with "
                  "--resume auto)", 130)
        except (RuntimeError, MemoryError) as exc:
            oom = _out_of_memory(exc)
            if oom:
                _fail(oom, 2)
            failure = _collective_failure(exc) if isinstance(exc, RuntimeError) else None
            if failure is None:
                raise
            _fail(f"{_where[0]()}: {failure}", 3)
        except OSError as exc:  # the machine's, not the code's: a full, read-only or forbidden place
            if is_disk_full(exc):
                place = exc.filename or (_output[0] if _output else None)
                where = "" if place is None else (
                    f" writing {'' if exc.filename else 'under '}{place} ({free_mb(place)})")
                _fail(f"disk full{where}: free some space and run again (a training run continues with --resume "
                      "auto; what was written completely is kept)", 2)
            elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                _fail(_permission(exc), 2)
            raise

    return wrapper
