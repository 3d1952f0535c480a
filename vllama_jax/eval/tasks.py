"""The benchmarks `vllama-jax eval` runs, each read from its annotation files exactly as their authors publish them
(docs/eval.md lists the sources). A loader turns the files into `Question`s: an id, the video file it is about, the
question, the options of a multiple choice (none for an open-ended question) and the reference answer.

A video the annotations name but the media folder lacks still becomes a `Question` (its path does not exist): the
runner turns it into an error row, so a partial download is evaluated on what is there and says what is missing.
The same goes for what can only be checked against the video or another file (a time window outside the video, a
malformed subtitle file): an error row, not an error of the whole run.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from ..errors import VllamaError
from ..inference.uploads import VIDEO_EXTENSIONS

Kind = Literal["open", "mc"]

#: option letters of multiple-choice prompts (the published benchmarks have at most 5 options)
LETTERS = "ABCDEFGHIJ"


class AnnotationError(VllamaError, ValueError):
    """An annotation file that is missing, unreadable or not in the task's published format (names the file)."""


@dataclass(frozen=True)
class Question:
    """One benchmark question. ``options`` is empty for an open-ended question; ``answer`` is the reference answer
    text (for a multiple choice: the text of the correct option, ``answer_index`` its position). ``window``: the
    (start, end) seconds the frames are sampled in (MVBench's bounds; None: the whole video); ``subtitles``: the
    video's .srt file whose lines go into the prompt (Video-MME with subtitles; it need not exist)."""

    id: str
    video: Path
    question: str
    answer: str
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    category: str = ""
    window: tuple[float, float] | None = None
    subtitles: Path | None = None

    @property
    def is_mc(self) -> bool:
        return bool(self.options)


@dataclass(frozen=True)
class Task:
    """A benchmark: its kind, where its format is published, and the loader of its annotation files."""

    name: str
    kind: Kind
    source: str
    #: (annotations, media_dir[, subtitles=DIR]) -> questions
    load: Callable[..., list[Question]] = field(repr=False)
    #: the file names looked for when --annotations is a folder
    files: tuple[str, ...] = ()
    #: whether the benchmark ships subtitles (``load_questions(subtitles=DIR)``)
    subtitles: bool = False


# ------------------------------------------------------------------------------------------------------------
# helpers


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: no such annotation file") from None
    except (OSError, ValueError) as e:
        raise AnnotationError(f"{path}: not readable as JSON ({e})") from None


def _field(row: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(row, dict) or key not in row:
        raise AnnotationError(f"{path}: {where} has no {key!r} field (not this task's published format?)")
    return row[key]


def _find(annotations: Path, names: Sequence[str]) -> Path:
    """``annotations`` itself when it is a file, else the first of ``names`` inside it."""
    if annotations.is_file():
        return annotations
    for n in names:
        if (annotations / n).is_file():
            return annotations / n
    raise AnnotationError(f"{annotations}: none of {', '.join(names)} found")


def find_video(media_dir: Path, stems: Sequence[str]) -> Path:
    """The first ``media_dir/<stem><ext>`` that exists over ``stems`` and the video extensions (Video-ChatGPT's
    look-up order: each stem with .mp4, .avi, .mov, .mkv, then the other extensions); if none does, the path of
    the first stem with its own extension or .mp4, which then reports "no such file"."""
    exts = [".mp4", ".avi", ".mov", ".mkv"] + sorted(VIDEO_EXTENSIONS - {".mp4", ".avi", ".mov", ".mkv"})
    for stem in stems:
        if Path(stem).suffix.lower() in VIDEO_EXTENSIONS and (media_dir / stem).is_file():
            return media_dir / stem
        for ext in exts:
            if (media_dir / f"{stem}{ext}").is_file():
                return media_dir / f"{stem}{ext}"
    first = stems[0]
    return media_dir / (first if Path(first).suffix.lower() in VIDEO_EXTENSIONS else f"{first}.mp4")


def _seconds(row: dict, key: str, path: Path, where: str) -> float:
    """A finite number of seconds (MVBench's start / end); anything else names the file and the entry."""
    value = _field(row, key, path, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AnnotationError(f"{path}: {where}: {key!r} is {value!r}, not a number of seconds")
    return float(value)


def _mc(qid: str, video: Path, question: str, options: Sequence[str], answer_index: int, category: str,
        path: Path, **extra: Any) -> Question:
    options = tuple(str(o).strip() for o in options)
    if not 0 <= answer_index < len(options):
        raise AnnotationError(f"{path}: question {qid}: answer {answer_index} is not one of its "
                              f"{len(options)} options")
    return Question(qid, video, str(question).strip(), options[answer_index], options, answer_index, category,
                    **extra)


# ------------------------------------------------------------------------------------------------------------
# open-ended: the Video-ChatGPT protocol (MSVD-QA, MSRVTT-QA, ActivityNet-QA)


def load_video_chatgpt_qa(annotations: Path, media_dir: Path) -> list[Question]:
    """``test_q.json`` (``[{"video_name", "question", "question_id"}]``) and ``test_a.json`` (``[{"answer",
    "question_id", "type"?}]``) as Video-ChatGPT's quantitative evaluation reads them: answers pair with
    questions by position (checked against ``question_id`` when both carry one); the video is
    ``v_<video_name>.<ext>`` (ActivityNet) or ``<video_name>.<ext>`` (MSVD, MSRVTT)."""
    qfile = _find(annotations, ("test_q.json",))
    afile = qfile.with_name(qfile.name.replace("_q", "_a")) if "_q" in qfile.name else qfile.with_name("test_a.json")
    qs, ans = _read_json(qfile), _read_json(afile)
    if not isinstance(qs, list) or not isinstance(ans, list):
        raise AnnotationError(f"{qfile}: expected a JSON list of questions (and {afile.name} of answers)")
    if len(qs) != len(ans):
        raise AnnotationError(f"{afile}: {len(ans)} answers for the {len(qs)} questions of {qfile.name}")
    out = []
    for i, (q, a) in enumerate(zip(qs, ans)):
        name = str(_field(q, "video_name", qfile, f"question {i}"))
        qid = str(q.get("question_id", f"{name}_{i}"))
        if "question_id" in q and isinstance(a, dict) and "question_id" in a and str(a["question_id"]) != qid:
            raise AnnotationError(f"{afile}: answer {i} is for {a['question_id']}, question {i} is {qid}")
        video = find_video(media_dir, [f"v_{name}", name])
        category = str(a.get("type", "")) if isinstance(a, dict) else ""
        out.append(Question(qid, video, str(_field(q, "question", qfile, f"question {i}")).strip(),
                            str(_field(a, "answer", afile, f"answer {i}")).strip(), category=category))
    return out


# ------------------------------------------------------------------------------------------------------------
# multiple choice

#: MVBench's 20 tasks: JSON file, video sub-folder of the media folder, whether the question carries start/end
#: seconds (OpenGVLab/Ask-Anything video_chat2/mvbench.ipynb, `data_list`)
MVBENCH_TASKS: dict[str, tuple[str, str, bool]] = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", False),
    "Action Count": ("action_count.json", "perception/videos", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", False),
    "State Change": ("state_change.json", "perception/videos", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", False),
    "Character Order": ("character_order.json", "perception/videos", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", False),
}


def load_mvbench(annotations: Path, media_dir: Path) -> list[Question]:
    """MVBench's ``json/<task>.json`` files (``[{"video", "question", "candidates", "answer", "start"?, "end"?}]``,
    the answer being the text of one candidate) with the videos under ``media_dir/<task's folder>/<video>``.
    ``annotations``: the ``json`` folder (every task file present is read) or one task's file. The tasks
    ``MVBENCH_TASKS`` marks as bounded get their entries' ``start`` / ``end`` as the question's ``window`` (as
    mvbench.ipynb, which reads them only for those tasks)."""
    files = [annotations] if annotations.is_file() else [annotations / f for f, _, _ in MVBENCH_TASKS.values()
                                                         if (annotations / f).is_file()]
    if not files:
        raise AnnotationError(f"{annotations}: no MVBench task file (action_sequence.json, ...) found")
    by_file = {f: (name, sub, bounded) for name, (f, sub, bounded) in MVBENCH_TASKS.items()}
    out = []
    for path in files:
        if path.name not in by_file:
            raise AnnotationError(f"{path}: not one of MVBench's 20 task files")
        category, sub, bounded = by_file[path.name]
        rows = _read_json(path)
        for i, r in enumerate(rows):
            cands = [str(c) for c in _field(r, "candidates", path, f"entry {i}")]
            answer = str(_field(r, "answer", path, f"entry {i}"))
            if answer not in cands:
                raise AnnotationError(f"{path}: entry {i}: answer {answer!r} is not one of its candidates")
            video = media_dir / sub / str(_field(r, "video", path, f"entry {i}"))
            # an empty window or one outside the video is checked against the video: an error row, not here
            window = (_seconds(r, "start", path, f"entry {i}"), _seconds(r, "end", path, f"entry {i}")) \
                if bounded else None
            out.append(_mc(f"{path.stem}/{i}", video, _field(r, "question", path, f"entry {i}"), cands,
                           cands.index(answer), category, path, window=window))
    return out


def load_egoschema(annotations: Path, media_dir: Path) -> list[Question]:
    """EgoSchema's ``questions.json`` (``[{"q_uid", "question", "option 0".."option 4", ...}]``) restricted to
    the questions ``subset_answers.json`` (``{q_uid: index}``, the 500-question subset with public answers)
    answers; the video is ``<q_uid>.mp4``."""
    qfile = _find(annotations, ("questions.json",))
    afile = qfile.with_name("subset_answers.json")
    answers = _read_json(afile)
    if not isinstance(answers, dict):
        raise AnnotationError(f"{afile}: expected an object {{q_uid: answer index}}")
    out = []
    for i, r in enumerate(_read_json(qfile)):
        uid = str(_field(r, "q_uid", qfile, f"entry {i}"))
        if uid not in answers:
            continue
        opts = [_field(r, f"option {k}", qfile, f"entry {i}") for k in range(5)]
        out.append(_mc(uid, find_video(media_dir, [uid]), _field(r, "question", qfile, f"entry {i}"), opts,
                       int(answers[uid]), "", qfile))
    return out


def _strip_letter(option: str) -> str:
    """"A. text" -> "text" (Video-MME writes the letter into each option)."""
    s = option.strip()
    return s[2:].strip() if len(s) > 1 and s[0] in LETTERS and s[1] in ".)" else s


def load_videomme(annotations: Path, media_dir: Path, subtitles: Path | None = None) -> list[Question]:
    """Video-MME as published on the Hugging Face hub (``videomme/test-00000-of-00001.parquet``; the same rows as
    JSON / JSONL are read too): ``videoID``, ``question_id``, ``duration``, ``task_type``, ``question``,
    ``options`` (``["A. ...", ...]``), ``answer`` (a letter); the video is ``<videoID>.mp4``. Per category:
    ``task_type``; ``duration`` (short / medium / long) is kept in the id's row. ``subtitles``: the folder of
    the published ``subtitle/<videoID>.srt`` files (each question then names its video's file)."""
    path = _find(annotations, ("test-00000-of-00001.parquet", "videomme/test-00000-of-00001.parquet",
                               "videomme.json", "videomme.jsonl"))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only this file format needs it
        except ImportError:
            raise AnnotationError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise AnnotationError(f"{path}: not a readable parquet file ({e})") from None
    else:
        rows = _read_json(path)
    out = []
    for i, r in enumerate(rows):
        opts = [_strip_letter(o) for o in _field(r, "options", path, f"row {i}")]
        letter = str(_field(r, "answer", path, f"row {i}")).strip()[:1]
        if letter not in LETTERS[:len(opts)]:
            raise AnnotationError(f"{path}: row {i}: answer {letter!r} is not an option letter")
        video_id = str(_field(r, "videoID", path, f"row {i}"))
        out.append(_mc(str(r.get("question_id", i)), find_video(media_dir, [video_id]),
                       _field(r, "question", path, f"row {i}"), opts, LETTERS.index(letter),
                       str(r.get("task_type", "")), path,
                       subtitles=subtitles / f"{video_id}.srt" if subtitles is not None else None))
    return out


def load_nextqa_mc(annotations: Path, media_dir: Path) -> list[Question]:
    """NExT-QA multiple choice: ``val.csv`` / ``test.csv`` (columns ``video, frame_count, width, height, question,
    answer, qid, type, a0..a4``; ``answer`` is the index of the right ``a<k>``). The video is
    ``<map[video]>.mp4`` with ``map_vid_vidorID.json`` (next to the csv) mapping ids to the ``NExTVideo``
    folders, else ``<video>.mp4``. Per category: ``type`` (CW, CH, TN, TC, TP, DL, DC, DO)."""
    path = _find(annotations, ("val.csv", "test.csv"))
    mapping_file = path.with_name("map_vid_vidorID.json")
    mapping = _read_json(mapping_file) if mapping_file.is_file() else {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise AnnotationError(f"{path}: {e.strerror or e}") from None
    out = []
    for i, r in enumerate(rows):
        vid = str(_field(r, "video", path, f"row {i + 2}"))
        opts = [_field(r, f"a{k}", path, f"row {i + 2}") for k in range(5)]
        try:
            answer = int(_field(r, "answer", path, f"row {i + 2}"))
        except ValueError:
            raise AnnotationError(f"{path}: row {i + 2}: answer {r['answer']!r} is not an option index") from None
        video = find_video(media_dir, [str(mapping.get(vid, vid))])
        out.append(_mc(f"{vid}_{r.get('qid', i)}", video, _field(r, "question", path, f"row {i + 2}"), opts,
                       answer, str(r.get("type", "")), path))
    return out


def load_perceptiontest_mc(annotations: Path, media_dir: Path) -> list[Question]:
    """Perception Test multiple-choice video QA: ``all_valid.json`` (``{video_id: {"metadata": ...,
    "mc_question": [{"id", "question", "options", "answer_id", "area", "reasoning", "tag"}]}}``); the video is
    ``<video_id>.mp4``. Per category: ``area``."""
    path = _find(annotations, ("all_valid.json", "mc_question_valid.json"))
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected an object {{video_id: annotations}}")
    out = []
    for vid, entry in data.items():
        for q in (entry.get("mc_question") or []) if isinstance(entry, dict) else []:
            opts = _field(q, "options", path, f"{vid} mc_question")
            out.append(_mc(f"{vid}_{q.get('id', len(out))}", find_video(media_dir, [vid]),
                           _field(q, "question", path, f"{vid} mc_question"), opts,
                           int(_field(q, "answer_id", path, f"{vid} mc_question")), str(q.get("area", "")), path))
    return out


VIDEO_CHATGPT = "mbzuai-oryx/Video-ChatGPT quantitative_evaluation (test_q.json / test_a.json)"

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("msvd_qa", "open", VIDEO_CHATGPT, load_video_chatgpt_qa, ("test_q.json",)),
    Task("msrvtt_qa", "open", VIDEO_CHATGPT, load_video_chatgpt_qa, ("test_q.json",)),
    Task("activitynet_qa", "open", VIDEO_CHATGPT, load_video_chatgpt_qa, ("test_q.json",)),
    Task("mvbench", "mc", "OpenGVLab/MVBench json/<task>.json (Ask-Anything video_chat2)", load_mvbench),
    Task("egoschema", "mc", "egoschema/EgoSchema questions.json + subset_answers.json", load_egoschema),
    Task("videomme", "mc", "lmms-lab/Video-MME videomme/test-00000-of-00001.parquet", load_videomme,
         subtitles=True),
    Task("nextqa_mc", "mc", "doc-doc/NExT-QA nextqa/val.csv + map_vid_vidorID.json", load_nextqa_mc),
    Task("perceptiontest_mc", "mc", "google-deepmind/perception_test all_valid.json (mc_question)",
         load_perceptiontest_mc),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AnnotationError(f"unknown task {name!r} (one of {', '.join(TASKS)})")
    return TASKS[name]


def load_questions(task: str | Task, annotations: str | os.PathLike, media_dir: str | os.PathLike,
                   limit: int | None = None, subtitles: str | os.PathLike | None = None) -> list[Question]:
    """The task's questions in file order (the first ``limit`` if given); ids must be unique. ``subtitles``: the
    folder of the task's subtitle files (only for a task that has them, i.e. ``Task.subtitles``)."""
    t = get_task(task) if isinstance(task, str) else task
    ann = Path(annotations)
    if not ann.exists():
        raise AnnotationError(f"{ann}: no such annotation file or folder")
    if subtitles is not None and not t.subtitles:
        raise ValueError(f"{t.name} has no subtitles (only {', '.join(n for n, x in TASKS.items() if x.subtitles)})")
    extra = {"subtitles": Path(subtitles)} if subtitles is not None else {}
    questions = t.load(ann, Path(media_dir), **extra)
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise AnnotationError(f"{ann}: question id {q.id} appears twice")
        seen.add(q.id)
    return questions[:limit] if limit else questions


__all__ = ["AnnotationError", "LETTERS", "MVBENCH_TASKS", "Question", "TASKS", "Task", "find_video", "get_task",
           "load_questions"]
