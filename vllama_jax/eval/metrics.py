"""How predictions are scored and summed up (docs/eval.md, "Metrics").

Open-ended answers: normalised exact match (lower case, punctuation and the articles a/an/the dropped, spaces
collapsed: the SQuAD normalisation) and containment (the normalised reference occurs in the normalised prediction
as whole words: "a dog" in "I think it is a dog running"). Multiple choice: the option letter the model generates
(parsed as lmms-eval's video tasks do: answer prefixes dropped, the first standalone option letter) and the option
with the highest log-likelihood.
"""
from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Any, Iterable, Mapping

from .tasks import LETTERS

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
#: what models put before the letter ("The best answer is B", "Answer: (C)"), dropped before parsing
_ANSWER_PREFIXES = ("the best answer is", "the correct answer is", "the answer is", "the answer", "best answer:",
                    "best option:", "answer:", "option:", "answer is")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


def contains_answer(prediction: str, answer: str) -> bool:
    """The normalised reference occurs in the normalised prediction as a run of whole words."""
    ref, pred = normalize_answer(answer), normalize_answer(prediction)
    return bool(ref) and f" {ref} " in f" {pred} "


def parse_letter(text: str, n_options: int) -> int | None:
    """The option index a generated answer names: after dropping answer prefixes, the first standalone letter
    among the first ``n_options`` ("B", "(B)", "B.", "B) a dog"), else None (counted as wrong)."""
    s = text.strip()
    low = s.lower()
    for p in _ANSWER_PREFIXES:
        if low.startswith(p):
            s = s[len(p):].strip()
            low = s.lower()
    letters = LETTERS[:n_options]
    m = re.search(rf"(?<!\w)([{letters}])(?!\w)", s)  # "C1" or "Cat" name no option
    return letters.index(m.group(1)) if m else None


def multiple_choice_prompt(question: str, options: Iterable[str]) -> str:
    """The prompt of the generated-letter protocol (MVBench's / lmms-eval's layout and instruction)."""
    lines = [f"Question: {question}", "Options:"]
    lines += [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# summaries

#: per kind: the metric each row carries (a bool or a number), and which one is "accuracy"
ROW_METRICS = {"open": ("exact_match", "contains", "judge_correct", "judge_score"),
               "mc": ("correct_letter", "correct_loglik")}


def primary_metric(kind: str, rows: Iterable[Mapping[str, Any]]) -> str:
    """The metric reported as "accuracy": the generated letter for a multiple choice (lmms-eval's protocol), the
    judge's verdict for open-ended answers when a judge ran, else containment."""
    if kind == "mc":  # the loglik when the letter protocol was not run (``evaluate(protocols=("loglik",))``)
        rows = list(rows)
        return "correct_letter" if not rows or any("correct_letter" in r for r in rows) else "correct_loglik"
    return "judge_correct" if any("judge_correct" in r for r in rows) else "contains"


def summarize(kind: str, rows: list[Mapping[str, Any]]
              ) -> tuple[dict[str, float], dict[str, dict[str, Any]], str]:
    """(metrics over the rows without an error, per-category metrics, the row metric "accuracy" is). Metrics are means over the answered
    questions, in [0, 1] (``judge_score``: 0-5); a row lacking a metric (e.g. a judge call that failed) is left
    out of that metric's mean."""
    good = [r for r in rows if not r.get("error")]
    primary = primary_metric(kind, good)

    def means(sub: list[Mapping[str, Any]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in ROW_METRICS[kind]:
            vals = [float(r[m]) for r in sub if r.get(m) is not None]
            if vals:
                out[m] = sum(vals) / len(vals)
        out["accuracy"] = out.get(primary, 0.0)
        return out

    per: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in good:
        if r.get("category"):
            per[str(r["category"])].append(r)
    per_category = {c: {"n": len(sub), **means(sub)} for c, sub in sorted(per.items())}
    return means(good), per_category, primary


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The summary as a Markdown table: one line for all questions, one per category."""
    metrics = summary["metrics"]
    names = list(metrics)
    head = "| category | n | " + " | ".join(names) + " |"
    sep = "|" + "---|" * (len(names) + 2)

    def fmt(m: Mapping[str, Any], k: str) -> str:
        v = m.get(k)
        if v is None:
            return "-"
        return f"{v:.3f}" if k == "judge_score" else f"{100 * v:.1f}%"

    n_ok = summary["n"] - summary["errors"]
    lines = [head, sep, f"| all | {n_ok} | " + " | ".join(fmt(metrics, k) for k in names) + " |"]
    for cat, m in summary["per_category"].items():
        lines.append(f"| {cat} | {m['n']} | " + " | ".join(fmt(m, k) for k in names) + " |")
    return "\n".join(lines)


__all__ = ["contains_answer", "exact_match", "markdown_table", "multiple_choice_prompt", "normalize_answer",
           "parse_letter", "primary_metric", "summarize"]
