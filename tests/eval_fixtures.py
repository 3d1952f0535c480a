"""Tiny annotation files in each benchmark's published format (docs/eval.md cites the sources), with tiny videos
from tests/media_helpers.py. Each writer returns (annotations path, media dir, expected facts).

Every fixture names one video that is not in the media folder (a partial download), so the runner's error rows
are exercised on every format.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from tests.media_helpers import make_video

Fixture = tuple[Path, Path, dict[str, Any]]


def _videos(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        make_video(folder / n, n_frames=6, width=48, height=32)


def video_chatgpt(root: Path, prefix: str = "v_") -> Fixture:
    """ActivityNet-QA style (``v_<name>.mp4``); prefix "" gives MSVD / MSRVTT style names."""
    ann, media = root / "ann", root / "media"
    ann.mkdir(parents=True)
    _videos(media, [f"{prefix}vidA.mp4", f"{prefix}vidB.mp4"])
    qs = [{"video_name": "vidA", "question": "what is shown", "question_id": "vidA_0"},
          {"video_name": "vidA", "question": "is it moving", "question_id": "vidA_1"},
          {"video_name": "vidB", "question": "what colour is it", "question_id": "vidB_0"},
          {"video_name": "vidMissing", "question": "who is there", "question_id": "vidMissing_0"}]
    ans = [{"answer": "a square", "type": 0, "question_id": "vidA_0"},
           {"answer": "yes", "type": 3, "question_id": "vidA_1"},
           {"answer": "white", "type": 5, "question_id": "vidB_0"},
           {"answer": "nobody", "type": 1, "question_id": "vidMissing_0"}]
    (ann / "test_q.json").write_text(json.dumps(qs))
    (ann / "test_a.json").write_text(json.dumps(ans))
    return ann, media, dict(n=4, missing={"vidMissing_0"}, first_answer="a square", categories={"0", "3", "5", "1"})


def mvbench(root: Path) -> Fixture:
    ann, media = root / "json", root / "video"
    ann.mkdir(parents=True)
    _videos(media / "star" / "Charades_v1_480", ["C1.mp4"])
    _videos(media / "clevrer" / "video_validation", ["video_1.mp4"])
    (ann / "action_sequence.json").write_text(json.dumps([
        {"video": "C1.mp4", "question": "What did the person do first?",
         "candidates": ["Opened the door.", "Sat down.", "Ate food.", "Took a cup."], "answer": "Sat down.",
         "start": 0.0, "end": 0.5},
        {"video": "C1.mp4", "question": "What did the person do last?",
         "candidates": ["Opened the door.", "Sat down."], "answer": "Opened the door.", "start": 0.1, "end": 0.6}]))
    (ann / "moving_direction.json").write_text(json.dumps([
        {"video": "video_1.mp4", "question": "Which way does the cube move?",
         "candidates": ["left", "right", "up"], "answer": "up"},
        {"video": "video_404.mp4", "question": "Which way does the sphere move?",
         "candidates": ["left", "right", "up"], "answer": "left"}]))
    return ann, media, dict(n=4, missing={"moving_direction/1"}, answer_index=1,
                            categories={"Action Sequence", "Moving Direction"})


def egoschema(root: Path) -> Fixture:
    ann, media = root / "EgoSchema", root / "good_clips_git"
    ann.mkdir(parents=True)
    uids = ["0074f737-11cb-497d-8d07-77c3a8127391", "00b9a0de-c59e-49cb-a127-6081e2fb8c8e",
            "00f93e1e-cf4e-4835-88b4-6ad3d6ba2a6f", "01a01f8d-c34a-4b4a-b1ea-bfa3b8d7c0dd"]
    _videos(media, [f"{u}.mp4" for u in uids[:2]])
    qs = [{"q_uid": u, "google_drive_id": f"gd{k}", "question": f"What is c doing overall in clip {k}?",
           **{f"option {j}": f"option text {j} of {k}" for j in range(5)}} for k, u in enumerate(uids)]
    (ann / "questions.json").write_text(json.dumps(qs))
    # the subset answers three of the four (the fourth is a full-set question without a public answer)
    (ann / "subset_answers.json").write_text(json.dumps({uids[0]: 3, uids[1]: 0, uids[2]: 4}))
    return ann, media, dict(n=3, missing={uids[2]}, answer_index=3, categories=set())


def videomme(root: Path) -> Fixture:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ann, media = root / "Video-MME" / "videomme", root / "Video-MME" / "data"
    ann.mkdir(parents=True)
    _videos(media, ["fFjv93ACGo8.mp4"])
    rows = [dict(video_id="001", duration="short", domain="Knowledge", sub_category="Humanity & History",
                 url="https://www.youtube.com/watch?v=fFjv93ACGo8", videoID="fFjv93ACGo8", question_id="001-1",
                 task_type="Counting Problem", question="How many shapes are there?",
                 options=["A. 1.", "B. 2.", "C. 3.", "D. 4."], answer="C"),
            dict(video_id="001", duration="short", domain="Knowledge", sub_category="Humanity & History",
                 url="https://www.youtube.com/watch?v=fFjv93ACGo8", videoID="fFjv93ACGo8", question_id="001-2",
                 task_type="Object Recognition", question="What is in the corner?",
                 options=["A. A cat.", "B. A square.", "C. A dog.", "D. Nothing."], answer="B"),
            dict(video_id="002", duration="long", domain="Sports", sub_category="Football",
                 url="https://www.youtube.com/watch?v=missing0001", videoID="missing0001", question_id="002-1",
                 task_type="Action Reasoning", question="Why does he run?",
                 options=["A. To win.", "B. To lose.", "C. To rest.", "D. To eat."], answer="A")]
    pq.write_table(pa.Table.from_pylist(rows), ann / "test-00000-of-00001.parquet")
    return ann, media, dict(n=3, missing={"002-1"}, answer_index=2,
                            categories={"Counting Problem", "Object Recognition", "Action Reasoning"})


def nextqa_mc(root: Path) -> Fixture:
    ann, media = root / "nextqa", root / "NExTVideo"
    ann.mkdir(parents=True)
    _videos(media / "1164", ["3238737531.mp4"])
    (ann / "map_vid_vidorID.json").write_text(json.dumps({"3238737531": "1164/3238737531",
                                                          "4882821564": "1106/4882821564"}))
    cols = ["video", "frame_count", "width", "height", "question", "answer", "qid", "type",
            "a0", "a1", "a2", "a3", "a4"]
    rows = [["3238737531", "1440", "640", "480", "why did the boy clap his hands", "2", "0", "CW",
             "to dance", "to play", "happy", "cold", "bored"],
            ["3238737531", "1440", "640", "480", "what does the boy do after clapping", "0", "1", "TN",
             "jumps", "sits", "sleeps", "cries", "eats"],
            ["4882821564", "900", "640", "480", "how many people are there", "1", "0", "DC",
             "one", "two", "three", "four", "five"]]
    with open(ann / "val.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return ann, media, dict(n=3, missing={"4882821564_0"}, answer_index=2, categories={"CW", "TN", "DC"})


def perceptiontest_mc(root: Path) -> Fixture:
    ann, media = root / "perception", root / "valid_videos"
    ann.mkdir(parents=True)
    _videos(media, ["video_10909.mp4"])
    data = {
        "video_10909": {"metadata": {"video_id": "video_10909", "num_frames": 6, "resolution": [32, 48]},
                        "mc_question": [
                            {"id": 0, "question": "Is the camera moving or static?",
                             "options": ["I don't know", "moving", "static or shaking"], "answer_id": 2,
                             "area": "physics", "reasoning": "descriptive", "tag": ["motion"]},
                            {"id": 1, "question": "How many objects are there?",
                             "options": ["1", "2", "3"], "answer_id": 0,
                             "area": "memory", "reasoning": "descriptive", "tag": ["counting"]}]},
        "video_404": {"metadata": {"video_id": "video_404"},
                      "mc_question": [{"id": 0, "question": "What happens?", "options": ["a", "b", "c"],
                                       "answer_id": 1, "area": "semantics", "reasoning": "predictive",
                                       "tag": []}]},
    }
    (ann / "all_valid.json").write_text(json.dumps(data))
    return ann, media, dict(n=3, missing={"video_404_0"}, answer_index=2,
                            categories={"physics", "memory", "semantics"})


WRITERS: dict[str, Callable[[Path], Fixture]] = {
    "activitynet_qa": video_chatgpt,
    "msvd_qa": lambda root: video_chatgpt(root, prefix=""),
    "msrvtt_qa": lambda root: video_chatgpt(root, prefix=""),
    "mvbench": mvbench,
    "egoschema": egoschema,
    "videomme": videomme,
    "nextqa_mc": nextqa_mc,
    "perceptiontest_mc": perceptiontest_mc,
}
