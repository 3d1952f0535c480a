"""Running a benchmark: batched on the devices, resumable, one row per question (``vllama-jax eval``, the trainer's
eval hook, ``bench/eval.py``).

OUT/predictions.jsonl gets one row per question as soon as its batch is done (appended and flushed; a line cut by
an interrupt is dropped at the next start, and questions that already have a row are not asked again):

    {"id", "video", "question", "answer", "category"?, "prediction",
     open-ended:      "exact_match", "contains", "judge_correct"?, "judge_score"?, "judge_error"?,
     multiple choice: "options", "answer_index", "scores" (log-likelihood of each option), "choice_loglik",
                      "choice_letter" (the option the generated letter names, null if none), "correct_letter",
                      "correct_loglik",
     "window"? (MVBench's [start, end] seconds the frames were sampled in), "subtitles"? (the subtitle lines
     put before the question: --subtitles),
     "protocols" (multiple choice: those run), "ablation"? (``ABLATIONS``),
     "correct" (the task's accuracy metric for this row), "error"? (unreadable or missing video, a time window
     outside it, a malformed subtitle file: no prediction)}

OUT/summary.json: ``{"task", "n", "errors", "metrics": {"accuracy", ...}, "accuracy_of", "per_category",
"model", "seconds", "annotations"}`` over every question of this run (resumed rows included).

Ablations (``ABLATIONS``, ``--ablation``) ask the same questions of altered uploads, to show where answers come
from: ``shuffled_frames`` (the sampled frames in a random order other than the true one, fixed by the video's path,
so a resumed run shuffles as the first did); removing the audio is ``with_audio=False`` (``--no-audio``).

Batches reuse the pieces ``describe`` runs on (``prefetch_uploads``: decoding one batch ahead in threads, a video
asked about several times decoded and encoded once; ``answer_uploads`` / ``score_answers`` padded to one batch
shape so every batch reuses the compiled programs).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ..inference.describe import error_text, prefetch_uploads, repair_tail
from ..inference.generate import GenerationConfig
from ..inference.uploads import Upload
from .judge import Judge, JudgeError
from .metrics import contains_answer, exact_match, multiple_choice_prompt, parse_letter, summarize
from .subtitles import Cue, SubtitleError, lines_at, read_srt, with_subtitles
from .tasks import Kind, Question

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
#: the multiple-choice protocols: the option letter the model generates (lmms-eval's), the option with the highest
#: log-likelihood as the answer to the plain question
MC_PROTOCOLS = ("letter", "loglik")


def shuffled_frames(upload: Upload) -> Upload:
    """``upload`` with its frames in a random order other than the true one (the temporal order destroyed; the
    frames' times stay, so the model is told the true times of the wrong frames). The order is fixed by the
    video's path."""
    t = len(upload.frames)
    if t < 2:
        return upload
    seed = int.from_bytes(hashlib.sha256(str(upload.path).encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    perm = np.arange(t)
    while np.array_equal(perm, np.arange(t)):
        perm = rng.permutation(t)
    return replace(upload, frames=upload.frames[perm])


#: name -> what it does to every prepared upload
ABLATIONS: dict[str, Callable[[Upload], Upload]] = {"shuffled_frames": shuffled_frames}


@dataclass
class EvalResult:
    summary: dict[str, Any]
    out: Path
    #: questions answered in this run (the rest were already in predictions.jsonl)
    asked: int


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The rows of a predictions file by id (unparsable lines ignored; a later row for an id wins)."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("id"), str):
                rows[row["id"]] = row
    return rows


def _base_row(q: Question) -> dict[str, Any]:
    row: dict[str, Any] = {"id": q.id, "video": os.fspath(q.video), "question": q.question, "answer": q.answer}
    if q.category:
        row["category"] = q.category
    if q.is_mc:
        row["options"] = list(q.options)
        row["answer_index"] = q.answer_index
    if q.window is not None:
        row["window"] = list(q.window)
    return row


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def evaluate(model: Any, task: str, kind: Kind, questions: Sequence[Question], out: str | os.PathLike, *,
             batch_size: int = 4, max_new_tokens: int = 64, letter_tokens: int = 8, judge: Judge | None = None,
             with_audio: bool = True, workers: int = 2, progress: bool = True, annotations: str = "",
             on_batch: Callable[[int, int], None] | None = None, protocols: Sequence[str] = MC_PROTOCOLS,
             ablation: str | None = None) -> EvalResult:
    """Ask every question (greedy decoding) and write OUT/predictions.jsonl and OUT/summary.json.

    model: a ``VideoLLaMAChat`` (or anything with its ``prepare_video`` / ``answer_uploads`` / ``score_answers``);
    kind: "open" (generated answers, scored by exact match, containment and the optional ``judge``) or "mc"
    (the generated option letter, and the log-likelihood of each option); max_new_tokens: length of open-ended
    answers; letter_tokens: of the generated letter; on_batch(done, total): called after each batch; protocols:
    the multiple-choice protocols run (``MC_PROTOCOLS``; the summary's accuracy is the letter's when it ran);
    ablation: one of ``ABLATIONS``, applied to every upload.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not protocols or any(p not in MC_PROTOCOLS for p in protocols):
        raise ValueError(f"protocols must be a non-empty subset of {MC_PROTOCOLS}, got {tuple(protocols)}")
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r} (one of {', '.join(ABLATIONS)})")
    transform = ABLATIONS[ablation] if ablation else None
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pred_path = out / PREDICTIONS
    repair_tail(pred_path)
    done = read_rows(pred_path)
    todo = [q for q in questions if q.id not in done]
    greedy = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens if kind == "open" else letter_tokens)
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), unit="question", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, desc=task)
    new_rows: dict[str, dict[str, Any]] = {}
    subtitle_cache: dict[Path, list[Cue] | SubtitleError] = {}  # a video has several questions: read it once
    errors = sum(1 for q in questions if done.get(q.id, {}).get("error"))
    batches = _batches(todo, batch_size)
    try:
        with open(pred_path, "a", encoding="utf-8") as f, \
                closing(prefetch_uploads(model, [[q.video for q in b] for b in batches], with_audio=with_audio,
                                         workers=workers, windows=[[q.window for q in b] for b in batches])
                        ) as prepared:
            for batch, uploads in zip(batches, prepared):
                rows = {q.id: _base_row(q) | ({"ablation": ablation} if ablation else {}) for q in batch}
                for q, u in zip(batch, uploads):
                    if not isinstance(u, Upload):
                        rows[q.id]["error"] = error_text(u)
                if transform is not None:  # one object per distinct upload stays one (encoded once)
                    altered = {id(u): transform(u) for u in uploads if isinstance(u, Upload)}
                    uploads = [altered.get(id(u), u) for u in uploads]
                good = _add_subtitles([(q, u) for q, u in zip(batch, uploads) if isinstance(u, Upload)], rows,
                                      subtitle_cache)
                if good:
                    qs, ups = [q for q, _ in good], [u for _, u in good]
                    if kind == "mc":
                        _multiple_choice(model, qs, ups, greedy, batch_size, rows, protocols)
                    else:
                        _open_ended(model, qs, ups, greedy, batch_size, judge, rows)
                for q in batch:
                    f.write(json.dumps(rows[q.id], ensure_ascii=False) + "\n")
                    errors += bool(rows[q.id].get("error"))
                f.flush()
                new_rows.update(rows)
                bar.update(len(batch))
                bar.set_postfix(errors=errors, refresh=False)
                if on_batch is not None:
                    on_batch(bar.n, len(questions))
    finally:
        bar.close()
    all_rows = [new_rows.get(q.id) or done[q.id] for q in questions]
    summary = write_summary(out, task, kind, all_rows, model=getattr(model, "name", ""),
                            seconds=time.perf_counter() - start, annotations=annotations)
    return EvalResult(summary, out, len(todo))


def _add_subtitles(good: list[tuple[Question, Upload]], rows: dict[str, dict[str, Any]],
                   cache: dict[Path, list[Cue] | SubtitleError]) -> list[tuple[Question, Upload]]:
    """Put into each row with a subtitle file the lines shown at its sampled frames (``row["subtitles"]``, what
    ``_prompt`` prepends); a malformed file makes the row an error row. Returns the pairs still to ask."""
    for q, u in good:
        if q.subtitles is None:
            continue
        if q.subtitles not in cache:
            try:  # no file: no subtitles (lmms-eval's "No subtitles available")
                cache[q.subtitles] = read_srt(q.subtitles) if q.subtitles.is_file() else []
            except SubtitleError as e:
                cache[q.subtitles] = e
        cues = cache[q.subtitles]
        if isinstance(cues, SubtitleError):
            rows[q.id]["error"] = error_text(cues)
        else:
            rows[q.id]["subtitles"] = lines_at(cues, u.times)
    return [(q, u) for q, u in good if "error" not in rows[q.id]]


def _prompt(text: str, row: dict[str, Any]) -> str:
    """A question's text as asked: with its subtitle lines before it when it has a subtitle file."""
    return with_subtitles(text, row["subtitles"]) if "subtitles" in row else text


def _multiple_choice(model: Any, qs: list[Question], ups: list[Upload], greedy: GenerationConfig, pad: int,
                     rows: dict[str, dict[str, Any]], protocols: Sequence[str]) -> None:
    """The chosen protocols on one batch: the generated letter (prompt with the lettered options) and the
    log-likelihood of each option's text as the answer to the plain question."""
    for q in qs:
        rows[q.id]["protocols"] = list(protocols)
    if "letter" in protocols:
        texts = model.answer_uploads([_prompt(multiple_choice_prompt(q.question, q.options), rows[q.id])
                                      for q in qs], ups, greedy, pad_to=pad)
        for q, text in zip(qs, texts):
            letter = parse_letter(text, len(q.options))
            rows[q.id].update(prediction=text, choice_letter=letter, correct_letter=letter == q.answer_index)
    if "loglik" in protocols:
        scores = model.score_answers([_prompt(q.question, rows[q.id]) for q in qs], ups,
                                     [list(q.options) for q in qs], pad_to=pad)
        for q, sc in zip(qs, scores):
            sc = np.asarray(sc, np.float64)
            loglik = int(np.argmax(sc))
            rows[q.id].update(scores=[round(float(x), 6) for x in sc], choice_loglik=loglik,
                              correct_loglik=loglik == q.answer_index)
            rows[q.id].setdefault("prediction", q.options[loglik])
    for q in qs:
        row = rows[q.id]
        row["correct"] = row["correct_letter"] if "letter" in protocols else row["correct_loglik"]


def _open_ended(model: Any, qs: list[Question], ups: list[Upload], greedy: GenerationConfig, pad: int,
                judge: Judge | None, rows: dict[str, dict[str, Any]]) -> None:
    texts = model.answer_uploads([_prompt(q.question, rows[q.id]) for q in qs], ups, greedy, pad_to=pad)
    for q, text in zip(qs, texts):
        row = rows[q.id]
        row.update(prediction=text, exact_match=exact_match(text, q.answer),
                   contains=contains_answer(text, q.answer))
        if judge is not None:
            try:
                v = judge(q.question, q.answer, text)
                row.update(judge_correct=v.correct, judge_score=v.score)
            except JudgeError as e:  # the row keeps the prediction; the judge metrics leave it out
                row["judge_error"] = str(e)
        row["correct"] = row.get("judge_correct", row["contains"]) if judge is not None else row["contains"]


def write_summary(out: Path, task: str, kind: Kind, rows: list[Mapping[str, Any]], *, model: str = "",
                  seconds: float = 0.0, annotations: str = "") -> dict[str, Any]:
    metrics, per_category, primary = summarize(kind, list(rows))
    summary = {"task": task, "n": len(rows), "errors": sum(1 for r in rows if r.get("error")),
               "metrics": metrics, "accuracy_of": primary, "per_category": per_category, "model": model,
               "seconds": round(seconds, 3), "annotations": annotations}
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / SUMMARY)
    return summary


__all__ = ["ABLATIONS", "EvalResult", "MC_PROTOCOLS", "PREDICTIONS", "SUMMARY", "evaluate", "read_rows",
           "shuffled_frames", "write_summary"]
