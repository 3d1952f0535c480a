"""Video-MME's subtitles in the prompt (``vllama-jax eval --subtitles DIR``), as lmms-eval's
``videomme_w_subtitle`` task puts them there: the lines of the cues shown at the sampled frames, under "This
video's subtitles are listed below:", before the question (Video-MME's own rule: only the subtitles of the sampled
frames, which also keeps an hour-long video's subtitles inside the model's context).

A video without a subtitle file has no subtitles (lmms-eval then writes "No subtitles available"); a file that is
not SRT is a ``SubtitleError`` naming the file and line, which the runner turns into the question's error row.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import VllamaError

#: lmms-eval's wording (tasks/videomme/utils.py, videomme_doc_to_text_subtitle)
HEADER = "This video's subtitles are listed below: \n"
NONE = "No subtitles available"

# "00:01:02,500 --> 00:01:04,000" (a '.' before the milliseconds and trailing position settings are tolerated)
_TIMING = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})\s*-->\s*(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,3})")
# Video-MME wraps every line in <font color="white" size=".72c">...</font>
_TAG = re.compile(r"<[^>]*>")


class SubtitleError(VllamaError, ValueError):
    """A subtitle file that cannot be read as SRT (names the file and the line)."""


@dataclass(frozen=True)
class Cue:
    start: float  # seconds
    end: float
    text: str  # its lines joined by a space, markup removed


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def read_srt(path: str | os.PathLike) -> list[Cue]:
    """The cues of an SRT file in file order: blocks separated by blank lines, each an optional number, a timing
    line and the text lines. Raises ``SubtitleError`` (file and line) on anything else."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise SubtitleError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SubtitleError(f"{path}: {e.strerror or e}") from None
    cues: list[Cue] = []
    i = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        first = i
        if lines[i].strip().isdigit():  # the cue number (not needed: file order is kept)
            i += 1
        m = _TIMING.match(lines[i]) if i < len(lines) else None
        if m is None:
            raise SubtitleError(f"{path}: line {i + 1}: expected a timing line 'HH:MM:SS,mmm --> HH:MM:SS,mmm' "
                                f"(cue starting at line {first + 1})")
        start, end = _seconds(*m.groups()[:4]), _seconds(*m.groups()[4:])
        if end < start:
            raise SubtitleError(f"{path}: line {i + 1}: the cue ends before it starts")
        i += 1
        text = []
        while i < len(lines) and lines[i].strip():
            text.append(_TAG.sub("", lines[i]).strip())
            i += 1
        cues.append(Cue(start, end, " ".join(t for t in text if t)))
    return cues


def lines_at(cues: Sequence[Cue], times: Sequence[float]) -> list[str]:
    """The text of every cue on screen at one of ``times`` (start <= t < end, as lmms-eval's frame test), once,
    in file order; cues without text are left out."""
    return [c.text for c in cues if c.text and any(c.start <= t < c.end for t in times)]


def with_subtitles(prompt: str, lines: Sequence[str]) -> str:
    """``prompt`` with the subtitle lines before it in lmms-eval's wording (no lines: "No subtitles available")."""
    return HEADER + ("\n".join(lines) or NONE) + "\n" + prompt


__all__ = ["Cue", "HEADER", "NONE", "SubtitleError", "lines_at", "read_srt", "with_subtitles"]
