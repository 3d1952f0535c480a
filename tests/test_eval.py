"""`vllama_jax.eval` without a model (fast): every task reads its published annotation format, the metrics, the
GPT judge against a real local HTTP server, and the runner's batching, error rows and resumption with a stand-in
model. The real model runs in tests/test_eval_cli.py."""
from __future__ import annotations

import dataclasses
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.eval_fixtures import WRITERS
from vllama_jax.eval import AnnotationError, Judge, JudgeError, evaluate, load_questions, markdown_table
from vllama_jax.eval.judge import parse_verdict
from vllama_jax.eval.metrics import contains_answer, exact_match, normalize_answer, parse_letter, summarize
from vllama_jax.eval.runner import shuffled_frames
from vllama_jax.eval.subtitles import SubtitleError, lines_at, read_srt, with_subtitles
from vllama_jax.eval.tasks import MVBENCH_TASKS, TASKS
from vllama_jax.inference.uploads import video_upload
from vllama_jax.media import UnreadableMediaError


@pytest.mark.parametrize("task", sorted(WRITERS))
def test_every_task_reads_its_published_format(task, tmp_path):
    ann, media, expect = WRITERS[task](tmp_path)
    qs = load_questions(task, ann, media)
    assert len(qs) == expect["n"]
    missing = {q.id for q in qs if not q.video.is_file()}
    assert missing == expect["missing"]  # resolved paths exist, except the one video the fixture left out
    assert {q.category for q in qs if q.category} == expect["categories"]
    assert {q.id: (q.answer, q.category) for q in qs} == expect["truth"]  # as the files state them
    first = qs[0]
    if TASKS[task].kind == "mc":
        assert first.is_mc and first.answer_index == expect["answer_index"]
        assert first.answer == first.options[first.answer_index]
        assert not any(o[:2] in ("A.", "B.") for q in qs for o in q.options)  # Video-MME's letters stripped
    else:
        assert not first.is_mc and first.answer == expect["first_answer"]
    assert load_questions(task, ann, media, limit=2) == qs[:2]


def test_mvbench_lists_the_twenty_tasks():
    assert len(MVBENCH_TASKS) == 20 and len({f for f, _, _ in MVBENCH_TASKS.values()}) == 20


def test_mvbench_bounds_become_windows_and_bad_ones_name_the_entry(tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path)
    by = {q.id: q for q in load_questions("mvbench", ann, media)}
    assert by["action_sequence/0"].window == (0.0, 0.5) and by["action_sequence/1"].window == (0.1, 0.6)
    assert by["moving_direction/0"].window is None  # a task without bounds (MVBENCH_TASKS' third field)
    rows = json.loads((ann / "action_sequence.json").read_text())
    for bad, needle in [({"start": "0:01"}, "entry 1: 'start' is '0:01', not a number"),
                        ({"end": None}, "entry 1: 'end' is None, not a number"),
                        ({"start": True}, "entry 1: 'start' is True"),
                        ({"end": float("nan")}, "entry 1: 'end' is nan")]:
        (ann / "action_sequence.json").write_text(json.dumps([rows[0], {**rows[1], **bad}]))
        with pytest.raises(AnnotationError, match=re.escape(f"action_sequence.json: {needle}")):
            load_questions("mvbench", ann, media)
    del rows[1]["end"]
    (ann / "action_sequence.json").write_text(json.dumps(rows))
    with pytest.raises(AnnotationError, match="action_sequence.json: entry 1 has no 'end' field"):
        load_questions("mvbench", ann, media)


def test_srt_parsing_and_the_subtitled_prompt(tmp_path):
    srt = tmp_path / "v.srt"
    # Video-MME's layout: a BOM, CRLF, every line in a <font> tag; a cue of two lines; the last block unterminated
    srt.write_bytes("\ufeff1\r\n00:00:01,000 --> 00:00:02,500\r\n<font color=\"white\" size=\".72c\">Hello</font>"
                    "\r\n\r\n2\r\n00:00:02,500 --> 00:00:04,000\r\n<font color=\"white\" size=\".72c\">two</font>"
                    "\r\nlines\r\n\r\n3\r\n01:00:00.5 --> 01:00:01,000 X1:10\r\nlate".encode())
    cues = read_srt(srt)
    assert [(c.start, c.end, c.text) for c in cues] == [(1.0, 2.5, "Hello"), (2.5, 4.0, "two lines"),
                                                        (3600.5, 3601.0, "late")]
    assert lines_at(cues, [0.5, 2.0, 2.4]) == ["Hello"]  # once, though two frames are in it
    assert lines_at(cues, [2.5, 3600.9]) == ["two lines", "late"]  # start <= t < end
    assert with_subtitles("Q?", ["Hello", "two lines"]) == \
        "This video's subtitles are listed below: \nHello\ntwo lines\nQ?"
    assert with_subtitles("Q?", []) == "This video's subtitles are listed below: \nNo subtitles available\nQ?"
    for text, needle in [("1\n00:00:01 --> 00:00:02\nx\n", "line 2: expected a timing line"),
                         ("1\n00:00:01,000 --> 00:00:02,000\nx\n\nsome text\n", "line 5: expected a timing line"),
                         ("00:00:03,000 --> 00:00:02,000\nx\n", "line 1: the cue ends before it starts")]:
        srt.write_text(text)
        with pytest.raises(SubtitleError, match=f"v.srt: {needle}"):
            read_srt(srt)
    srt.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\n\xff\xfe\n")
    with pytest.raises(SubtitleError, match="v.srt: not UTF-8"):
        read_srt(srt)


def test_annotation_errors_name_the_file(tmp_path):
    ann, media, _ = WRITERS["activitynet_qa"](tmp_path)
    with pytest.raises(AnnotationError, match="no such annotation"):
        load_questions("egoschema", tmp_path / "nope", media)
    (ann / "test_a.json").write_text(json.dumps([{"answer": "x", "question_id": "vidA_0"}]))
    with pytest.raises(AnnotationError, match="1 answers for the 4 questions"):
        load_questions("activitynet_qa", ann, media)
    bad = tmp_path / "json"
    bad.mkdir()
    (bad / "action_count.json").write_text(json.dumps([{"video": "a.mp4", "question": "q",
                                                        "candidates": ["1", "2"], "answer": "3"}]))
    with pytest.raises(AnnotationError, match=r"action_count.json: entry 0: answer '3' is not one"):
        load_questions("mvbench", bad, media)
    with pytest.raises(AnnotationError, match="unknown task"):
        load_questions("msvd", ann, media)


def test_answer_metrics():
    assert normalize_answer("The  Dog, running!") == "dog running"
    assert exact_match("A dog.", "dog") and not exact_match("a big dog", "dog")
    assert contains_answer("I think it is a dog running", "a dog")
    assert not contains_answer("hotdog stand", "dog")  # whole words only
    assert not contains_answer("anything", "")
    assert parse_letter("B", 4) == 1
    assert parse_letter("(C) a dog", 4) == 2
    assert parse_letter("The best answer is D.", 4) == 3
    assert parse_letter("Answer: A", 2) == 0
    assert parse_letter("E", 4) is None  # not one of the options
    assert parse_letter("I am not sure", 4) is None  # "I" is no option letter of 4
    assert parse_letter("Because", 4) is None


def test_summary_metrics_and_categories():
    rows = [dict(id="1", category="x", correct_letter=True, correct_loglik=False),
            dict(id="2", category="x", correct_letter=False, correct_loglik=False),
            dict(id="3", category="y", correct_letter=True, correct_loglik=True),
            dict(id="4", category="y", error="UnreadableMediaError: no such file")]
    metrics, per, primary = summarize("mc", rows)
    assert primary == "correct_letter"
    assert metrics == pytest.approx(dict(correct_letter=2 / 3, correct_loglik=1 / 3, accuracy=2 / 3))
    assert per["x"]["n"] == 2 and per["x"]["accuracy"] == 0.5 and per["y"]["n"] == 1
    table = markdown_table(dict(n=4, errors=1, metrics=metrics, per_category=per))
    assert table.splitlines()[2] == "| all | 3 | 66.7% | 33.3% | 66.7% |"


# ------------------------------------------------------------------------------------------------------------
# the GPT judge against a real HTTP server on localhost


class _JudgeHandler(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: "yes, 4" when the prediction contains the answer, "no, 1"
    otherwise; a prediction containing "garbage" gets a reply outside the protocol."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body))
        user = body["messages"][1]["content"]
        answer = user.split("Correct Answer: ")[1].split("\n")[0]
        pred = user.split("Predicted Answer: ")[1].split("\n")[0]
        if "garbage" in pred:
            content = "I think it is fine."
        else:
            content = "{'pred': 'yes', 'score': 4}" if answer.lower() in pred.lower() else "{'pred': 'no', 'score': 1}"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    _JudgeHandler.requests = []
    server = HTTPServer(("127.0.0.1", 0), _JudgeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_protocol_over_http(judge_server):
    judge = Judge(judge_server, "judge-1", api_key="sk-test")
    assert judge("what is it", "a dog", "It is a dog.") == parse_verdict("{'pred': 'yes', 'score': 4}")
    v = judge("what is it", "a dog", "a cat")
    assert (v.correct, v.score) == (False, 1.0)
    req = _JudgeHandler.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-1" and req["body"]["messages"][0]["role"] == "system"
    assert "Correct Answer: a dog\nPredicted Answer: It is a dog." in req["body"]["messages"][1]["content"]
    with pytest.raises(JudgeError, match="not a dictionary"):
        judge("q", "a", "garbage")
    with pytest.raises(JudgeError, match="judge http://127.0.0.1:1/"):
        Judge("http://127.0.0.1:1/v1", "m", timeout=2, retries=0)("q", "a", "b")


def test_parse_verdict_forms():
    assert parse_verdict('{"pred": "Yes", "score": 5}').correct
    assert parse_verdict("Sure: {'pred': 'no', 'score': 0}").score == 0
    for bad in ("{'pred': 'maybe', 'score': 1}", "{'score': 1}", "{'pred': 'yes', 'score': 'high'}"):
        with pytest.raises(JudgeError):
            parse_verdict(bad)


# ------------------------------------------------------------------------------------------------------------
# the runner with a stand-in model


class StubChat:
    """Generates "<video stem> A" (so the letter protocol picks option A), scores option k as -k (the
    likelihood protocol picks option A too); counts calls; raises KeyboardInterrupt on call `interrupt_at`."""

    name = "stub"

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[tuple[str, int, int | None]] = []
        self.interrupt_at = interrupt_at

    def prepare_video(self, path, with_audio=True, window=None):
        if not Path(path).is_file():
            raise UnreadableMediaError(path, "no such file")
        return video_upload(np.zeros((2, 4, 4, 3), np.float32), frame_message="m. ", path=str(path))

    def _call(self, what, n, pad_to):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((what, n, pad_to))

    def answer_uploads(self, questions, uploads, generation_config=None, rng=None, pad_to=None):
        self._call("answer", len(uploads), pad_to)
        assert generation_config is not None and not generation_config.do_sample  # eval decodes greedily
        return [f"{Path(u.path).stem} A" for u in uploads]

    def score_answers(self, questions, uploads, options, pad_to=None):
        self._call("score", len(uploads), pad_to)
        return [-np.arange(len(o), dtype=np.float64) for o in options]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_multiple_choice_rows_errors_and_summary(tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path)
    qs = load_questions("mvbench", ann, media)
    stub = StubChat()
    res = evaluate(stub, "mvbench", "mc", qs, tmp_path / "out", batch_size=3, progress=False)
    rows = _rows(tmp_path / "out" / "predictions.jsonl")
    assert [r["id"] for r in rows] == [q.id for q in qs]
    by = {r["id"]: r for r in rows}
    first = by["action_sequence/0"]
    assert first["prediction"] == "C1 A" and first["choice_letter"] == 0 and first["choice_loglik"] == 0
    assert first["scores"] == [0.0, -1.0, -2.0, -3.0] and first["answer_index"] == 1
    assert first["correct"] is False and first["category"] == "Action Sequence"
    assert by["action_sequence/1"]["correct_letter"] is True and by["action_sequence/1"]["correct_loglik"] is True
    assert "no such file" in by["moving_direction/1"]["error"] and "prediction" not in by["moving_direction/1"]
    assert stub.calls == [("answer", 3, 3), ("score", 3, 3)]  # batch 2 is the missing video alone: no call
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s == res.summary
    assert set(s) >= {"task", "n", "errors", "metrics", "per_category", "model", "seconds"}
    assert (s["task"], s["n"], s["errors"], s["model"]) == ("mvbench", 4, 1, "stub")
    assert s["metrics"]["accuracy"] == pytest.approx(1 / 3) and s["accuracy_of"] == "correct_letter"
    assert s["per_category"]["Action Sequence"] == dict(n=2, correct_letter=0.5, correct_loglik=0.5, accuracy=0.5)


def test_resume_after_an_interrupt_asks_only_the_rest(tmp_path):
    ann, media, _ = WRITERS["nextqa_mc"](tmp_path)
    qs = load_questions("nextqa_mc", ann, media)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate(StubChat(interrupt_at=2), "nextqa_mc", "mc", qs, out, batch_size=1, progress=False)
    assert [r["id"] for r in _rows(out / "predictions.jsonl")] == [qs[0].id]  # the first batch was written
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "cut by the interr')  # a line cut by the kill
    stub = StubChat()
    res = evaluate(stub, "nextqa_mc", "mc", qs, out, batch_size=1, progress=False)
    assert res.asked == 2 and len(stub.calls) == 2  # question 2 asked (answer + score); question 3 has no video
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == [q.id for q in qs]
    assert res.summary["n"] == 3 and res.summary["errors"] == 1


class RecordingStub(StubChat):
    """A StubChat whose videos have 4 distinct frames, and which keeps the uploads it was asked about."""

    def __init__(self):
        super().__init__()
        self.uploads = []

    def prepare_video(self, path, with_audio=True, window=None):
        up = super().prepare_video(path, with_audio, window)
        return dataclasses.replace(up, frames=np.arange(4, dtype=np.float32)[:, None, None, None]
                                   * np.ones((4, 4, 4, 3), np.float32))

    def score_answers(self, questions, uploads, options, pad_to=None):
        self.uploads += list(uploads)
        return super().score_answers(questions, uploads, options, pad_to)


def test_loglik_protocol_alone_and_the_shuffled_frames_ablation(tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path)
    qs = [q for q in load_questions("mvbench", ann, media) if q.video.is_file()]
    stub = RecordingStub()
    res = evaluate(stub, "mvbench", "mc", qs, tmp_path / "out", batch_size=3, progress=False,
                   protocols=("loglik",), ablation="shuffled_frames")
    assert [c[0] for c in stub.calls] == ["score"]  # no letter generated
    rows = _rows(tmp_path / "out" / "predictions.jsonl")
    assert all(r["protocols"] == ["loglik"] and "correct_letter" not in r and r["ablation"] == "shuffled_frames"
               for r in rows)
    assert [r["correct"] for r in rows] == [r["correct_loglik"] for r in rows]
    assert rows[0]["prediction"] == rows[0]["options"][0]  # the option it picked
    assert res.summary["accuracy_of"] == "correct_loglik"
    assert res.summary["metrics"]["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    # every upload's frames are a permutation other than the true order, the same one for the same video
    for up in stub.uploads:
        order = up.frames[:, 0, 0, 0].astype(int)
        assert sorted(order) == [0, 1, 2, 3] and list(order) != [0, 1, 2, 3]
        again = shuffled_frames(RecordingStub().prepare_video(up.path))
        assert np.array_equal(again.frames, up.frames)
    with pytest.raises(ValueError, match="protocols"):
        evaluate(stub, "mvbench", "mc", qs, tmp_path / "o2", protocols=("guess",), progress=False)
    with pytest.raises(ValueError, match="unknown ablation"):
        evaluate(stub, "mvbench", "mc", qs, tmp_path / "o3", ablation="mirror", progress=False)


def test_open_ended_with_judge(tmp_path, judge_server):
    ann, media, _ = WRITERS["msvd_qa"](tmp_path)
    qs = load_questions("msvd_qa", ann, media)
    res = evaluate(StubChat(), "msvd_qa", "open", qs, tmp_path / "out", batch_size=4, progress=False,
                   judge=Judge(judge_server, "j"))
    rows = {r["id"]: r for r in _rows(tmp_path / "out" / "predictions.jsonl")}
    assert rows["vidA_0"]["prediction"] == "vidA A" and rows["vidA_0"]["exact_match"] is False
    assert rows["vidA_0"]["judge_correct"] is False and rows["vidA_0"]["judge_score"] == 1.0
    assert len(_JudgeHandler.requests) == 3  # the missing video is not judged
    s = res.summary
    assert s["accuracy_of"] == "judge_correct" and s["metrics"]["judge_score"] == 1.0 and s["errors"] == 1
    assert set(s["per_category"]) == {"0", "3", "5"}
