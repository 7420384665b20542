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
collective_timeout_minutes: float | None = None  # set by lib/runtime.start, for the message


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` (just `Type` without one): an exception in a warning."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


_at_exit: list = []


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
    does an OSError for a full disk or a place that cannot be written (naming the file); a wait for
    the other processes that failed (timeout, a peer gone) prints where this process was, exit 3.

    Anything else propagates with its traceback, since it is a bug rather than bad input. With
    LM_DEBUG=1 in the environment, every error shows its traceback. Callbacks registered with
    at_exit run when main() ends, however it ends.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
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
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as exc:
            failure = _collective_failure(exc)
            if failure is None:
                raise
            print(f"error: {_where[0]()}: {failure}", file=sys.stderr, flush=True)
            sys.exit(3)
        except OSError as exc:  # the machine's, not the code's: a full, read-only or forbidden place to write
            where = f" writing {exc.filename}" if exc.filename else ""
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                print(f"error: disk full{where}: free some space and run again (a training run continues with "
                      "--resume auto; what was written completely is kept)", file=sys.stderr)
            elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                print(f"error: not writable{where} ({exc.strerror}); pick a folder you can write to",
                      file=sys.stderr)
            else:
                raise
            sys.exit(2)

    return wrapper
