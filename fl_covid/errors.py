"""A user's errors: a bad configuration and unreadable data. Each message names the key or the file and what to do;
a command prints it as one line (``fl_covid.cli.run_command``)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is allowed."""


class DataError(ValueError):
    """A problem with a site's files; the message names the file or folder and what to do."""
