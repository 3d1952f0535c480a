"""Scoring the demo's answers against the generator's ground truth, and the final table.

An answer is read for the attribute's words only (``ATTRIBUTES`` in :mod:`vllama_jax.demo.clips`): it is correct
when it names the true value and no other value of that attribute ("Red." and "The shape is red" are right for a
red clip; "Red or blue" and "I cannot see a video" are wrong). Chance is one over the number of values.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

from .clips import ATTRIBUTES

# extra spellings accepted for a value (the model is never *taught* these; they only make the untrained model's
# free-form answers count when they say the right thing)
_ALIASES: dict[str, tuple[str, ...]] = {
    "purple": ("violet",),
    "left": ("leftward", "leftwards"),
    "right": ("rightward", "rightwards"),
    "up": ("upward", "upwards"),
    "down": ("downward", "downwards"),
    "medium": ("middle",),
}


def _pattern(value: str) -> re.Pattern:
    words = (value,) + _ALIASES.get(value, ())
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")s?\b", re.IGNORECASE)


_PATTERNS = {a: {v: _pattern(v) for v in values} for a, (_, values) in ATTRIBUTES.items()}


def mentioned(attribute: str, answer: str) -> list[str]:
    """The values of ``attribute`` named in ``answer``, in the order of their first mention."""
    hits = [(m.start(), v) for v, p in _PATTERNS[attribute].items() if (m := p.search(answer))]
    return [v for _, v in sorted(hits)]


def is_correct(attribute: str, answer: str, truth: str) -> bool:
    return mentioned(attribute, answer) == [truth]


def chance(attribute: str) -> float:
    return 1.0 / len(ATTRIBUTES[attribute][1])


@dataclasses.dataclass
class Scores:
    """Per-attribute answers of one model on the held-out clips."""

    name: str
    answers: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # attr -> [(answer, truth)]

    def add(self, attribute: str, answer: str, truth: str) -> None:
        self.answers.setdefault(attribute, []).append((answer, truth))

    def accuracy(self, attribute: str) -> float:
        rows = self.answers.get(attribute, [])
        return sum(is_correct(attribute, a, t) for a, t in rows) / max(len(rows), 1)

    def count(self, attribute: str) -> int:
        return len(self.answers.get(attribute, []))


def table(columns: Sequence[Scores], attributes: Sequence[str] = tuple(ATTRIBUTES),
          notes: Mapping[str, str] | None = None) -> str:
    """attribute | <column> accuracy ... | chance  (+ an optional note per attribute)."""
    head = ["attribute"] + [f"{c.name} accuracy" for c in columns] + ["chance"]
    rows = []
    for a in attributes:
        n = max((c.count(a) for c in columns), default=0)
        cells = [a] + [f"{100 * c.accuracy(a):5.1f}% ({round(c.accuracy(a) * c.count(a))}/{c.count(a)})"
                       for c in columns] + [f"{100 * chance(a):5.1f}%"]
        if notes and a in notes:
            cells.append(notes[a])
        rows.append(cells)
        del n
    widths = [max(len(r[i]) for r in [head] + rows if i < len(r)) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(widths[i]) if i < len(widths) else c  # noqa: E731
                                           for i, c in enumerate(cells)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        text = line(r[: len(head)])
        if len(r) > len(head):
            text += "  " + r[-1]
        out.append(text)
    return "\n".join(out)
