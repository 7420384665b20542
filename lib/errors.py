"""User-facing errors: a clear message and a non-zero exit, never a wall of traceback."""
from __future__ import annotations

import errno
import functools
import sys


class UserError(Exception):
    """Bad input the user can fix. The message must name the file, line or option at fault."""


class ConfigError(UserError):
    """A config file or flag that does not fit the script's config dataclass."""


def exit_on_user_error(main):
    """Wrap a script's main(): a UserError prints `error: <message>` to stderr and exits 2, and so
    does an OSError for a full disk or a place that cannot be written (naming the file).

    Anything else propagates with its traceback, since it is a bug rather than bad input.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
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
