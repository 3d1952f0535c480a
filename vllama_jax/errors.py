"""The error contract, defined once.

Every failure caused by the user's input (a file, a flag, a config value, a request) raises a subclass of
`VllamaError` whose message is one line naming the file or value and the reason. The command-line layer
(`vllama_jax.cli.common`) prints that line and exits with the class's `exit_status`; libraries catch
`VllamaError` to tell bad input from bugs. Subclasses keep their older standard bases (ValueError, OSError...)
so existing ``except`` clauses still match.
"""

from __future__ import annotations


class VllamaError(Exception):
    """A typed failure on bad input; ``str(e)`` is one line saying what and why."""

    #: process exit status the command line uses for this failure
    exit_status: int = 1


class UsageError(VllamaError, ValueError):
    """A bad command-line value."""

    exit_status = 2


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its class name if it has none)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


__all__ = ["UsageError", "VllamaError", "first_line"]
