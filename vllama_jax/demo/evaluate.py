"""Scoring the demo's answers against the generator's ground truth, and the final table.

The held-out clips are asked about through the benchmark harness (``vllama_jax.eval.evaluate``, what
``vllama-jax eval`` runs), as two tasks written in published formats by :func:`write_heldout_tasks`: a multiple
choice in Perception Test's layout (``all_valid.json``; options: the attribute's possible answers, as trained) and
the open-ended questions in Video-ChatGPT's (``test_q.json`` / ``test_a.json``; the reference answer: the value).
So a user can ask any model the demo's questions with ``vllama-jax eval --task perceptiontest_mc`` /
``--task msvd_qa``. :func:`scores_from_rows` reads the harness's predictions back into the demo's
:class:`Scores`.

An answer is read for the attribute's words only (``ATTRIBUTES`` in :mod:`vllama_jax.demo.clips`): it is correct
when it names the true value and no other value of that attribute ("Red." and "The shape is red" are right for a
red clip; "Red or blue" and "I cannot see a video" are wrong). Chance is one over the number of values.

Free-form answers also measure whether the model answers *in the trained form*: a model that knows nothing can
score 0% (it talks about something else) rather than chance. The multiple-choice reading separates knowing from
answering: the model ranks the attribute's possible answers (``clips.answer_text`` for every value) by their
likelihood, and its pick is right or wrong; a model that ignores the clip scores about chance there.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .clips import ATTRIBUTES, ClipSpec, answer_text

# extra spellings accepted for a value (the model is never *taught* these; they only make the untrained model's
# free-form answers count when they say the right thing)
_ALIASES: dict[str, tuple[str, ...]] = {
    "purple": ("violet",),
    "left": ("leftward", "leftwards"),
    "right": ("rightward", "rightwards"),
    "hum": ("humming",),
    "hiss": ("hissing",),
    "beep": ("beeping",),
    "whistle": ("whistling",),
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
    """One model's results on the held-out clips, per attribute: its free-form answers (greedy generation, read by
    :func:`is_correct`) and its multiple-choice picks (the option it gives the highest likelihood)."""

    name: str
    answers: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # attr -> [(answer, truth)]
    choices: dict[str, list[tuple[str, str]]] = dataclasses.field(default_factory=dict)  # attr -> [(picked, truth)]

    def add(self, attribute: str, answer: str, truth: str) -> None:
        self.answers.setdefault(attribute, []).append((answer, truth))

    def add_choice(self, attribute: str, picked: str, truth: str) -> None:
        self.choices.setdefault(attribute, []).append((picked, truth))

    def accuracy(self, attribute: str) -> float:
        rows = self.answers.get(attribute, [])
        return sum(is_correct(attribute, a, t) for a, t in rows) / max(len(rows), 1)

    def choice_accuracy(self, attribute: str) -> float:
        rows = self.choices.get(attribute, [])
        return sum(p == t for p, t in rows) / max(len(rows), 1)

    def count(self, attribute: str) -> int:
        return len(self.answers.get(attribute, []))

    def choice_count(self, attribute: str) -> int:
        return len(self.choices.get(attribute, []))


def _cell(acc: float, n: int) -> str:
    return f"{100 * acc:5.1f}% ({round(acc * n)}/{n})"


def table(columns: Sequence[Scores], attributes: Sequence[str] = tuple(ATTRIBUTES),
          notes: Mapping[str, str] | None = None) -> str:
    """attribute | <column> answers | <column> choice ... | chance  (+ an optional note per attribute). A column's
    answers / choice cell is only shown when it has free-form / multiple-choice results."""
    head = ["attribute"]
    for c in columns:
        if c.answers:
            head.append(f"{c.name}: answers")
        if c.choices:
            head.append(f"{c.name}: choice")
    head.append("chance")
    rows = []
    for a in attributes:
        cells = [a]
        for c in columns:
            if c.answers:
                cells.append(_cell(c.accuracy(a), c.count(a)))
            if c.choices:
                cells.append(_cell(c.choice_accuracy(a), c.choice_count(a)))
        cells.append(f"{100 * chance(a):5.1f}%")
        if notes and a in notes:
            cells.append(notes[a])
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in rows:
        out.append(line(r[: len(head)]) + ("  " + r[-1] if len(r) > len(head) else ""))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------- as benchmarks
def question_id(spec: ClipSpec, attribute: str) -> str:
    return f"{spec.video_id}_{attribute}"


def write_heldout_tasks(root: Path, specs: Sequence[ClipSpec]) -> dict[str, Path]:
    """Every attribute question about every clip of ``specs`` (clip by clip, so that a batch holds all of a clip's
    questions and the harness decodes, encodes and prefills its video once) as
    ``root/perceptiontest_mc/all_valid.json`` (Perception Test's multiple-choice layout: ``{video_id:
    {"mc_question": [{"id", "question", "options", "answer_id", "area"}]}}``, the area being the attribute) and
    ``root/video_chatgpt/test_q.json`` + ``test_a.json`` (``write_open_ended_task``).
    The videos are ``<video_id>.mp4`` (``DemoData.clip_path``). Returns {"mc": folder, "open": folder}."""
    mc: dict[str, Any] = {}
    for spec in specs:
        mc[spec.video_id] = {"mc_question": [
            {"id": attr, "question": question, "options": [answer_text(attr, v) for v in values],
             "answer_id": values.index(spec.truth(attr)), "area": attr}
            for attr, (question, values) in ATTRIBUTES.items()]}
    dirs = {"mc": root / "perceptiontest_mc", "open": write_open_ended_task(root / "video_chatgpt", specs)}
    dirs["mc"].mkdir(parents=True, exist_ok=True)
    (dirs["mc"] / "all_valid.json").write_text(json.dumps(mc, indent=1))
    return dirs


def write_open_ended_task(folder: Path, specs: Sequence[ClipSpec]) -> Path:
    """Every attribute question about every clip of ``specs`` as ``folder/test_q.json`` + ``test_a.json``
    (Video-ChatGPT's QA layout, read by ``--task msvd_qa``; the reference answer is the value, as MSVD-QA's
    one-word answers; ``type``: the attribute). Videos ``<video_id>.mp4``. Returns ``folder``."""
    test_q, test_a = [], []
    for spec in specs:
        for attr, (question, _) in ATTRIBUTES.items():
            qid = question_id(spec, attr)
            test_q.append({"video_name": spec.video_id, "question": question, "question_id": qid})
            test_a.append({"answer": spec.truth(attr), "question_id": qid, "type": attr})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "test_q.json").write_text(json.dumps(test_q, indent=1))
    (folder / "test_a.json").write_text(json.dumps(test_a, indent=1))
    return folder


def scores_from_rows(scores: Scores, specs: Sequence[ClipSpec], rows: Mapping[str, Mapping[str, Any]]
                     ) -> None:
    """Add the harness's prediction rows (``eval.read_rows``) of the tasks ``write_heldout_tasks`` wrote to the
    demo's ``scores``: a multiple-choice row gives the value of the option with the highest log-likelihood, an
    open-ended row its greedy answer. Every question must have a row without an error."""
    for attr, (_, values) in ATTRIBUTES.items():
        for spec in specs:
            key = question_id(spec, attr)  # both tasks' loaders give this id
            row = rows.get(key)
            if row is None or row.get("error"):
                raise RuntimeError(f"question {key}: {row.get('error') if row else 'no prediction row'}")
            if "choice_loglik" in row:
                scores.add_choice(attr, values[int(row["choice_loglik"])], spec.truth(attr))
            else:
                scores.add(attr, str(row["prediction"]), spec.truth(attr))
