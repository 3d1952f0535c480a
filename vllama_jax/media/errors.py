"""Typed errors of the media loaders, and the one place FFmpeg/OS errors are translated into them.

Every failure to turn a file into model input is one of these (never a bare FFmpeg/PIL/OS error), so a data
loader can catch ``MediaError`` for one file and go on with the others. Each carries the file's path and a
short human-readable reason; ``str(err)`` names both.
"""
from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterator
from pathlib import PurePath
from typing import Any

import av

from ..errors import VllamaError


class MediaError(VllamaError):
    """A media file could not be turned into model input."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{type(self).__name__}: {self.path!r}: {reason}")

    # Exceptions pickle through their ``args``; ours take (path, reason), so say so explicitly
    # (needed when errors cross process boundaries, e.g. multiprocessing data loaders).
    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


class NoAudioStreamError(MediaError):
    """The file opens but has no audio stream (e.g. a silent video)."""


class NoVideoStreamError(MediaError):
    """The file opens but has no video stream (e.g. an audio file passed as a video)."""


class UnreadableMediaError(MediaError):
    """Missing, empty, truncated, corrupt or not a media file at all; or no frame/sample could be decoded."""


class TimeWindowError(MediaError):
    """A time window (start, end seconds) asked of a video is empty or holds none of its frames."""


# Errors that FFmpeg (through PyAV) or the OS raise for bad input. Programming errors (TypeError,
# AttributeError, ...) are deliberately not in the list so they are not disguised as "bad file".
_BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    av.error.FFmpegError, OSError, EOFError, ValueError, RuntimeError, MemoryError, UnicodeDecodeError,
)


# Packages that parse the file's bytes. Whatever they raise while doing so (PyAV raises the odd AttributeError or
# TypeError on damaged streams; PIL an IndexError or struct.error on damaged headers) is the file's fault, whatever
# its type; an exception raised by our own code is still a bug and propagates.
_DECODER_PACKAGES = frozenset({"av", "PIL"})


def raised_by_decoder(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and not _DECODER_PACKAGES.isdisjoint(PurePath(frames[-1].filename).parts)


def describe(exc: BaseException) -> str:
    """Short reason text for a low-level exception."""
    msg = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {msg}"


@contextlib.contextmanager
def translate_errors(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Turn FFmpeg/OS errors raised inside the block into ``UnreadableMediaError`` (``what`` failed: ...): the
    errors of ``_BAD_INPUT_ERRORS``, and any exception raised inside PyAV or PIL themselves."""
    try:
        yield
    except MediaError:
        raise
    except _BAD_INPUT_ERRORS as exc:
        raise UnreadableMediaError(path, f"{what} failed ({describe(exc)})") from exc
    except Exception as exc:
        if not raised_by_decoder(exc):
            raise
        raise UnreadableMediaError(path, f"{what} failed ({describe(exc)})") from exc


def check_decoder(stream: av.stream.Stream, path: str) -> None:
    """PyAV gives a stream whose codec FFmpeg cannot decode (an unknown or damaged codec id) no codec context:
    that is the file's fault, said here rather than as an AttributeError at the first use."""
    if stream.codec_context is None:
        raise UnreadableMediaError(path, f"no decoder for its {stream.type} stream (unknown or damaged codec id)")


def check_file(path: str | os.PathLike[str]) -> str:
    """Cheap checks before handing a path to FFmpeg: exists, is a file, is not empty."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise UnreadableMediaError(p, "no such file")
    if not os.path.isfile(p):
        raise UnreadableMediaError(p, "not a regular file")
    if os.path.getsize(p) == 0:
        raise UnreadableMediaError(p, "empty file (0 bytes)")
    return p


def open_container(path: str | os.PathLike[str]) -> av.container.InputContainer:
    """``av.open`` with typed errors; a container without any stream counts as unreadable."""
    p = check_file(path)
    with translate_errors(p, "opening the file (not a media file, or truncated/corrupt header?)"):
        container = av.open(p, mode="r")
    if len(container.streams) == 0:
        container.close()
        raise UnreadableMediaError(p, "no audio or video streams found (not a media file?)")
    return container


__all__ = [
    "MediaError", "NoAudioStreamError", "NoVideoStreamError", "TimeWindowError", "UnreadableMediaError",
    "check_decoder", "check_file", "describe", "raised_by_decoder", "open_container", "translate_errors",
]
