"""User-facing errors: a clear message and a non-zero exit, never a wall of traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input the user can fix. The message must name the file, line or option at fault."""


class ConfigError(UserError):
    """A config file or flag that does not fit the script's config dataclass."""


def exit_on_user_error(main):
    """Wrap a script's main(): a UserError prints `error: <message>` to stderr and exits 2.

    Anything else propagates with its traceback, since it is a bug rather than bad input.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper
