"""What every command does around its work: logging set up once, and a user's error (a bad config, unreadable data,
a missing file) printed as one line ``error: ...`` with exit status 2 instead of a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from fl_covid.errors import ConfigError, DataError

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)


def run_command(work: Callable[[], int], errors: tuple[type[Exception], ...] = USER_ERRORS,
                log: bool = True) -> int:
    """``work()``'s exit status, or 2 after printing ``error: <message>`` for one of ``errors`` (the command's user
    errors; anything else is a bug and keeps its traceback). ``log``: INFO logging to stderr first."""
    if log:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return work()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
