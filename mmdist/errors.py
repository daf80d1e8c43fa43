"""Errors meant for the user of a command: printed as one ``error: ...`` line, exit status 1."""

from __future__ import annotations


class CommandError(RuntimeError):
    """An error meant for the user: printed without a traceback, exit code 1."""
