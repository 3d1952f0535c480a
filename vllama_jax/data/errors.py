"""Typed errors of the data package."""
from __future__ import annotations

import os

from ..errors import VllamaError


class DataError(VllamaError):
    """A data file (annotation, media, prepared shard) is missing or unusable.

    ``path`` names the offending file (or source entry) and ``reason`` says why, so one line of log is enough to
    find and fix the record.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str):
        self.path = "" if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):  # picklable across grain worker processes
        return (type(self), (self.path, self.reason))


class MediaDecodeError(DataError):
    """A media file could not be decoded into frames (corrupt, too short, unreadable)."""
