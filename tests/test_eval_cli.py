"""`vllama-jax eval` end to end on the fixture tiny model: every task on a small dataset in its published layout
(real encoded clips) with each summary metric recomputed by hand from predictions.jsonl, --limit, summary.json's
shape, error rows for missing videos, resumption from a pre-seeded predictions.jsonl, the same predictions when
sharded over 8 simulated devices, and one-line errors."""
from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.eval_fixtures import WRITERS
from tests.media_helpers import make_video
from vllama_jax.cli import evaluate as eval_cli
from vllama_jax.cli import main
from vllama_jax.eval.tasks import TASKS
from vllama_jax.weights.model_dir import save_model_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tiny_model, tiny_tok, tmp_path_factory) -> Path:
    cfg, params = tiny_model
    return save_model_dir(tmp_path_factory.mktemp("models") / "tiny", cfg, params, tiny_tok)


def _eval(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "vllama_jax.cli", "eval", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_multiple_choice_end_to_end_resumes_and_shards(model_dir, tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path / "data")
    out = tmp_path / "out"
    common = ["--task", "mvbench", "--annotations", str(ann), "--media-dir", str(media), "--model", str(model_dir),
              "--num-frames", "4", "--batch-size", "2", "--quiet"]
    # pre-seed: the first question already answered by an earlier (interrupted) run
    out.mkdir()
    seeded = {"id": "action_sequence/0", "video": "x", "question": "q", "answer": "Sat down.", "prediction": "B",
              "options": ["Opened the door.", "Sat down.", "Ate food.", "Took a cup."], "answer_index": 1,
              "scores": [-9.0, -1.0, -9.0, -9.0], "choice_loglik": 1, "choice_letter": 1, "correct_letter": True,
              "correct_loglik": True, "correct": True, "category": "Action Sequence"}
    (out / "predictions.jsonl").write_text(json.dumps(seeded) + "\n")
    res = _eval(common + ["--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["action_sequence/0", "action_sequence/1", "moving_direction/0",
                                       "moving_direction/1"]
    assert rows[0] == seeded  # kept, not asked again
    for r in rows[1:3]:
        assert isinstance(r["prediction"], str) and len(r["scores"]) == len(r["options"])
        assert r["choice_loglik"] == max(range(len(r["scores"])), key=r["scores"].__getitem__)
        assert r["correct"] == r["correct_letter"] and "error" not in r
    assert rows[3]["error"].startswith("UnreadableMediaError") and "prediction" not in rows[3]
    s = json.loads((out / "summary.json").read_text())
    assert (s["task"], s["n"], s["errors"], s["model"]) == ("mvbench", 4, 1, str(model_dir))
    assert set(s["metrics"]) == {"accuracy", "correct_letter", "correct_loglik"}
    assert set(s["per_category"]) == {"Action Sequence", "Moving Direction"} and s["seconds"] > 0
    assert res.stdout.splitlines()[0].startswith("| category | n | correct_letter")  # the Markdown table

    # rerun: nothing left to ask (no model load), same rows
    again = _eval(common + ["--out", str(out)])
    assert again.returncode == 0 and "already answered" in again.stderr
    assert _rows(out / "predictions.jsonl") == rows

    # --limit and 8 simulated devices (batch sharded over data=8): the same scores as on one device
    sharded = _eval(common + ["--out", str(tmp_path / "sharded"), "--limit", "3", "--fake-devices", "8",
                              "--mesh", "data=8"])
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    srows = _rows(tmp_path / "sharded" / "predictions.jsonl")
    assert len(srows) == 3
    for a, b in zip(srows[1:], rows[1:3]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3) and a["prediction"] == b["prediction"]


@pytest.mark.slow
def test_open_ended_end_to_end(model_dir, tmp_path):
    ann, media, _ = WRITERS["activitynet_qa"](tmp_path / "data")
    out = tmp_path / "out"
    res = _eval(["--task", "activitynet_qa", "--annotations", str(ann / "test_q.json"), "--media-dir", str(media),
                 "--model", str(model_dir), "--num-frames", "2", "--max-new-tokens", "4", "--limit", "3",
                 "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(out / "predictions.jsonl")
    assert [r["id"] for r in rows] == ["vidA_0", "vidA_1", "vidB_0"]
    assert all(isinstance(r["prediction"], str) and isinstance(r["contains"], bool) for r in rows)
    s = json.loads((out / "summary.json").read_text())
    assert s["n"] == 3 and s["errors"] == 0 and s["accuracy_of"] == "contains"
    assert set(s["metrics"]) == {"accuracy", "exact_match", "contains"}
    assert "question/s" in res.stderr or "100%" in res.stderr  # the progress bar ran (with its rate and ETA)


def test_eval_errors_are_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    ann, media, _ = WRITERS["egoschema"](tmp_path / "data")
    base = ["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(media), "--out",
            str(tmp_path / "o")]
    (tmp_path / "afile").write_text("x")
    cases = [
        (base + ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
        (base + ["--limit", "0"], 2, "--limit must be >= 1"),
        (base + ["--judge-url", "http://127.0.0.1:1/v1"], 2, "multiple choice"),
        (base + ["--subtitles", str(tmp_path)], 2, "egoschema has no subtitles"),
        (["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(tmp_path / "none"),
          "--out", str(tmp_path / "o")], 1, "no such folder"),
        (["eval", "--task", "egoschema", "--annotations", str(ann), "--media-dir", str(media),
          "--out", str(tmp_path / "afile")], 2, "is a file"),
        (["eval", "--task", "msvd_qa", "--annotations", str(ann), "--media-dir", str(media),
          "--out", str(tmp_path / "o")], 1, "test_q.json"),
        (["eval", "--task", "msvd_qa", "--annotations", str(ann), "--media-dir", str(media), "--protocol",
          "loglik", "--out", str(tmp_path / "o")], 2, "open-ended"),
    ]
    for argv, status, needle in cases:
        assert main(argv) == status, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len([e for e in err if e.startswith("error:")]) == 1 and needle in err[-1], err


# ------------------------------------------------------------------------------------------------------------
# MVBench's time windows and Video-MME's subtitles: the real command and the real chat's video preparation, with
# stand-in answers (what is checked is which frames and which prompt each question got, not the LLM)


class _Recorder:
    """The real chat's ``prepare_video`` (sampling, windows, frame times); records every prompt with its upload."""

    name = "recorder"

    def __init__(self, chat):
        self.chat = chat
        self.asked: list[tuple[str, object]] = []

    def prepare_video(self, path, with_audio=True, window=None):
        return self.chat.prepare_video(path, with_audio=with_audio, window=window)

    def answer_uploads(self, questions, uploads, generation_config=None, rng=None, pad_to=None):
        self.asked += zip(questions, uploads)
        return ["A"] * len(uploads)

    def score_answers(self, questions, uploads, options, pad_to=None):
        self.asked += zip(questions, uploads)
        return [[0.0] * len(o) for o in options]


@pytest.fixture
def recorder(model_dir, shared_chat, monkeypatch) -> _Recorder:
    """A fresh recorder around the module's one real chat (loaded by the command's own load_chat, 2 frames)."""
    real_load = eval_cli.load_chat
    rec = _Recorder(None)

    def load(args, generation_config):
        if "chat" not in shared_chat:
            shared_chat["chat"] = real_load(args, generation_config)
        rec.chat = shared_chat["chat"]
        return rec

    monkeypatch.setattr(eval_cli, "load_chat", load)
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    return rec


def _run_eval(task: str, ann: Path, media: Path, out: Path, model_dir: Path, *extra: str) -> list[dict]:
    assert main(["eval", "--task", task, "--annotations", str(ann), "--media-dir", str(media), "--out", str(out),
                 "--model", str(model_dir), "--num-frames", "2", "--batch-size", "2", "--quiet", *extra]) == 0
    return _rows(out / "predictions.jsonl")


def test_mvbench_windows_pick_the_frames_and_bad_ones_are_error_rows(recorder, model_dir, tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path / "data")
    make_video(media / "star" / "Charades_v1_480" / "C2.mp4", n_frames=20, width=48, height=32)  # frame k: k/10 s
    entry = {"video": "C2.mp4", "candidates": ["yes", "no"], "answer": "no"}
    (ann / "action_sequence.json").write_text(json.dumps([
        {**entry, "question": "inside?", "start": 1.0, "end": 1.5},
        {**entry, "question": "after the end?", "start": 5.0, "end": 6.0},
        {**entry, "question": "backwards?", "start": 1.0, "end": 0.5}]))
    rows = {r["id"]: r for r in _run_eval("mvbench", ann, media, tmp_path / "out", model_dir)}
    ups = {prompt: up for prompt, up in recorder.asked}
    # frames 10..15 lie in [1.0, 1.5] s; 2 of them uniformly: 10 and 13, and the model is told their times
    assert ups["inside?"].times == pytest.approx((1.0, 1.3)) and "sampled at 1.0, 1.3 seconds" in ups["inside?"].message
    assert rows["action_sequence/0"]["window"] == [1.0, 1.5] and "error" not in rows["action_sequence/0"]
    assert ups["Which way does the cube move?"].times == pytest.approx((0.0, 0.3))  # no bounds: the whole clip
    assert "window" not in rows["moving_direction/0"]
    assert rows["action_sequence/1"]["error"] == ("TimeWindowError: time window [5, 6] s holds no frame of the "
                                                  "video (2.000 s long)")
    assert rows["action_sequence/2"]["error"] == "TimeWindowError: time window [1, 0.5] s is empty (end <= start)"
    assert rows["action_sequence/1"]["video"].endswith("C2.mp4") and "prediction" not in rows["action_sequence/1"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["errors"] == 3  # + the missing video


def test_loglik_protocol_and_shuffled_frames_ablation_from_the_command(recorder, model_dir, tmp_path):
    ann, media, _ = WRITERS["mvbench"](tmp_path / "data")
    make_video(media / "star" / "Charades_v1_480" / "C1.mp4", n_frames=20, width=48, height=32)
    rows = _run_eval("mvbench", ann / "action_sequence.json", media, tmp_path / "out", model_dir, "--protocol",
                     "loglik", "--ablation", "shuffled_frames")
    assert all(r["protocols"] == ["loglik"] and r["ablation"] == "shuffled_frames" for r in rows)
    assert all(r["correct"] == r["correct_loglik"] and "choice_letter" not in r for r in rows)
    assert len(recorder.asked) == len(rows)  # scored only: no letter generated
    windows = {r["question"]: tuple(r["window"]) for r in rows}
    for question, up in recorder.asked:
        true = recorder.chat.prepare_video(up.path, window=windows[question])
        perm = [int(np.argmin(np.abs(true.frames - f).sum(axis=(1, 2, 3)))) for f in up.frames]
        assert sorted(perm) == list(range(len(perm))) and perm != sorted(perm)


def test_videomme_subtitles_at_the_sampled_frames_go_before_the_question(recorder, model_dir, tmp_path):
    ann, media, _ = WRITERS["videomme"](tmp_path / "data")
    subs = ann.parent / "subtitle"
    subs.mkdir()
    srt = subs / "fFjv93ACGo8.srt"  # the clip's 2 frames are at 0.0 and 0.3 s
    srt.write_text('1\n00:00:00,000 --> 00:00:00,200\n<font color="white" size=".72c">Hello there</font>\n\n'
                   '2\n00:00:00,200 --> 00:00:00,300\n<font color="white" size=".72c">between frames</font>\n\n'
                   '3\n00:00:00,300 --> 00:00:01,000\n<font color="white" size=".72c">Second line</font>\n')
    rows = {r["id"]: r for r in _run_eval("videomme", ann, media, tmp_path / "out", model_dir, "--subtitles",
                                          str(subs))}
    header = "This video's subtitles are listed below: \nHello there\nSecond line\n"
    asked = [p for p, up in recorder.asked if "How many shapes" in p]
    assert asked == [header + "Question: How many shapes are there?\nOptions:\n(A) 1.\n(B) 2.\n(C) 3.\n(D) 4.\n"
                     "Answer with the option's letter from the given choices directly.",
                     header + "How many shapes are there?"]  # the letter prompt, then the likelihood one
    assert rows["001-1"]["subtitles"] == ["Hello there", "Second line"]
    assert "error" in rows["002-1"] and "subtitles" not in rows["002-1"]  # its video is missing

    srt.unlink()  # no file: no subtitles
    recorder.asked.clear()
    rows = {r["id"]: r for r in _run_eval("videomme", ann, media, tmp_path / "out2", model_dir, "--subtitles",
                                          str(subs))}
    prompts = [p for p, _ in recorder.asked]
    assert len(prompts) == 4 and all(p.startswith("This video's subtitles are listed below: \nNo subtitles "
                                                  "available\n") for p in prompts)
    assert rows["001-1"]["subtitles"] == [] and "Hello" not in "".join(prompts)

    srt.write_text("1\nHello\n")  # malformed: an error row naming the file, the run goes on
    rows = {r["id"]: r for r in _run_eval("videomme", ann, media, tmp_path / "out3", model_dir, "--subtitles",
                                          str(subs))}
    assert rows["001-1"]["error"] == f"SubtitleError: {srt}: line 2: expected a timing line 'HH:MM:SS,mmm --> " \
                                     "HH:MM:SS,mmm' (cue starting at line 1)"


# ------------------------------------------------------------------------------------------------------------
# every task end to end, each summary metric recomputed by hand


@pytest.fixture(scope="module")
def shared_chat() -> dict:
    """Holds the one chat every case of the all-tasks test loads (same model, frames and batch: compiled once)."""
    return {}


def _by_hand_normalize(text: str) -> str:
    """The SQuAD normalisation docs/eval.md states, written out here independently of vllama_jax.eval.metrics."""
    text = "".join(" " if c in string.punctuation else c for c in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _by_hand_letter(prediction: str, n_options: int) -> int | None:
    """The option letter docs/eval.md says is the pick: answer prefixes dropped, the first standalone letter."""
    s = prediction.strip()
    for prefix in ("the best answer is", "the correct answer is", "the answer is", "the answer", "best answer:",
                   "best option:", "answer:", "option:", "answer is"):
        if s.lower().startswith(prefix):
            s = s[len(prefix):].strip()
    for tok in re.findall(r"\w+", s):
        if len(tok) == 1 and tok in "ABCDEFGHIJ"[:n_options]:
            return "ABCDEFGHIJ".index(tok)
    return None


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(WRITERS))
def test_every_task_end_to_end_metrics_equal_the_by_hand_ones(task, model_dir, shared_chat, tmp_path, monkeypatch,
                                                              capsys):
    """The real command (in process) on the task's published layout; the model is loaded by the command's own
    load_chat once for all tasks. Then every number of summary.json is recomputed from predictions.jsonl and
    the truth the fixture wrote: for a multiple choice from the `correct` field and, independently, from the
    option the generated text names (and the best-scored option) against the annotated answer; for open-ended
    answers from the normalised prediction against the reference; per category where the task has categories."""
    real_load = eval_cli.load_chat

    def load_once(args, generation_config):
        if "chat" not in shared_chat:
            shared_chat["chat"] = real_load(args, generation_config)
        return shared_chat["chat"]

    monkeypatch.setattr(eval_cli, "load_chat", load_once)
    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    ann, media, expect = WRITERS[task](tmp_path / "data")
    truth = expect["truth"]

    def run(out: Path) -> tuple[list[dict], dict, str]:
        status = main(["eval", "--task", task, "--annotations", str(ann), "--media-dir", str(media), "--out",
                       str(out), "--model", str(model_dir), "--num-frames", "2", "--batch-size", "2",
                       "--max-new-tokens", "4", "--quiet"])
        captured = capsys.readouterr()
        assert status == 0, captured.err[-3000:]
        return _rows(out / "predictions.jsonl"), json.loads((out / "summary.json").read_text()), captured.out

    def by_hand(sub: list[dict]) -> dict[str, float]:
        if TASKS[task].kind == "open":
            em, contains = [], []
            for r in sub:
                ref, pred = _by_hand_normalize(truth[r["id"]][0]), _by_hand_normalize(r["prediction"])
                em.append(pred == ref)
                contains.append(bool(ref) and f" {ref} " in f" {pred} ")
            assert [r["exact_match"] for r in sub] == em and [r["contains"] for r in sub] == contains
            assert [r["correct"] for r in sub] == contains  # no judge: containment is the accuracy
            return dict(exact_match=_mean(em), contains=_mean(contains), accuracy=_mean(contains))
        letter, loglik = [], []
        for r in sub:
            options, answer = r["options"], truth[r["id"]][0]
            picked = _by_hand_letter(r["prediction"], len(options))
            assert r["choice_letter"] == picked
            letter.append(picked is not None and options[picked] == answer)
            best = max(range(len(options)), key=r["scores"].__getitem__)
            loglik.append(options[best] == answer)
        assert [r["correct"] for r in sub] == letter and [r["correct_letter"] for r in sub] == letter
        assert [r["correct_loglik"] for r in sub] == loglik
        return dict(correct_letter=_mean(letter), correct_loglik=_mean(loglik), accuracy=_mean(letter))

    def check(rows: list[dict], s: dict, table: str) -> dict[str, float]:
        assert sorted(r["id"] for r in rows) == sorted(truth)
        assert {r["id"] for r in rows if "error" in r} == expect["missing"]
        answered = [r for r in rows if "error" not in r]
        for r in answered:
            assert (r["answer"], r.get("category", "")) == truth[r["id"]]
        assert (s["task"], s["n"], s["errors"]) == (task, len(truth), len(expect["missing"]))
        metrics = by_hand(answered)
        assert s["metrics"] == pytest.approx(metrics)
        categories = sorted({truth[r["id"]][1] for r in answered if truth[r["id"]][1]})
        assert list(s["per_category"]) == categories
        for c in categories:
            sub = [r for r in answered if truth[r["id"]][1] == c]
            assert s["per_category"][c] == pytest.approx({"n": len(sub), **by_hand(sub)})
        assert table.splitlines()[2].startswith(f"| all | {len(answered)} |")  # the Markdown table
        return metrics

    rows, summary, table = run(tmp_path / "out")
    check(rows, summary, table)
    if TASKS[task].kind == "open":
        # a random model's answers match no reference: once more with references taken from its answers (the
        # same greedy answers), so the by-hand count also covers matches: an exact one (up to case, articles
        # and punctuation) and a containment that is not exact
        preds = {r["id"]: r["prediction"] for r in rows if "error" not in r}
        first, second = [k for k in sorted(preds) if _by_hand_normalize(preds[k])][:2]
        refs = {first: f"The {preds[first]}!", second: f"an {_by_hand_normalize(preds[second]).split()[-1]}"}
        answers = json.loads((ann / "test_a.json").read_text())
        for a in answers:
            a["answer"] = refs.get(a["question_id"], a["answer"])
        (ann / "test_a.json").write_text(json.dumps(answers))
        truth = {k: (refs.get(k, ans), cat) for k, (ans, cat) in truth.items()}
        again, summary, table = run(tmp_path / "out2")
        assert {r["id"]: r["prediction"] for r in again if "error" not in r} == preds
        metrics = check(again, summary, table)
        assert metrics["exact_match"] >= 1 / len(preds) and metrics["contains"] >= 2 / len(preds)
