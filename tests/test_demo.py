"""`make demo` (vllama_jax.demo): the clip generator, answer scoring, and a shortened end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vllama_jax.demo import clips as C
from vllama_jax.demo import evaluate as E


# ------------------------------------------------------------------------------------------------ generator
def test_clip_specs_are_deterministic_and_cover_all_combinations():
    a = [C.clip_spec(3, i) for i in range(72)]
    assert a == [C.clip_spec(3, i) for i in range(72)]
    assert {(s.colour, s.shape, s.direction) for s in a} == {
        (c, s, d) for c in C.COLOURS for s in C.SHAPES for d in C.DIRECTIONS}
    assert [C.clip_spec(4, i) for i in range(8)] != a[:8]


@pytest.mark.parametrize("direction", C.DIRECTIONS)
def test_rendered_shape_moves_in_its_direction_and_stays_inside(direction):
    spec = next(s for s in (C.clip_spec(0, i) for i in range(200)) if s.direction == direction)
    frames = C.render_frames(spec)
    assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
    centres = []
    for f in frames:
        ys, xs = np.nonzero(np.any(f != spec.background, axis=-1))
        assert len(xs) > 20  # the whole path stays in the frame: the shape is always visible
        centres.append((xs.mean(), ys.mean()))
    (x0, y0), (x1, y1) = centres[0], centres[-1]
    dx, dy = x1 - x0, y1 - y0
    expect = {"left": dx < -10, "right": dx > 10, "up": dy < -10, "down": dy > 10}[direction]
    assert expect, (direction, dx, dy)
    # the shape's colour is the named colour (up to the small per-clip jitter)
    ys, xs = np.nonzero(np.any(frames[0] != spec.background, axis=-1))
    rgb = frames[0][ys, xs].astype(int).mean(0)
    assert np.abs(rgb - np.array(C.COLOURS[spec.colour])).max() <= 16


def test_tone_pitch_follows_the_shape():
    sr = C.ClipConfig().sample_rate
    for shape in C.SHAPES:
        spec = next(s for s in (C.clip_spec(0, i) for i in range(20)) if s.shape == shape)
        wave = C.render_audio(spec)
        freq = np.argmax(np.abs(np.fft.rfft(wave))) * sr / len(wave)
        assert abs(freq - C.TONES[shape][1]) < 2, (shape, freq)


def test_written_clip_decodes_with_video_and_audio(tmp_path):
    from vllama_jax.media import load_audio, load_video

    spec = C.clip_spec(0, 5)
    path = C.write_clip(tmp_path / "c.mp4", spec)
    video = load_video(path, num_frames=4, image_size=64)
    assert video.frames.shape == (4, 64, 64, 3)
    assert "4 frames" in video.message()
    audio = load_audio(path)
    assert audio.clips.shape[1:] == (1, 128, 204)


def test_dataset_files(tmp_path):
    data = C.make_dataset(tmp_path, 6, 2, seed=1)
    lines = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and all((tmp_path / x["video"]).is_file() for x in lines)
    asked = []
    for line, spec in zip(lines, [s for s in data.train for _ in range(2)]):
        (q, a), = [(t["value"], u["value"]) for t, u in zip(line["conversations"][::2], line["conversations"][1::2])]
        assert [t["from"] for t in line["conversations"]] == ["human", "gpt"]
        attr = next(k for k, (qq, _) in C.ATTRIBUTES.items() if qq == q)
        assert E.is_correct(attr, a, spec.truth(attr)), (attr, a)
        asked.append(attr)
    assert asked[::2] == ["colour"] * 6 and set(asked[1::2]) == set(C.ATTRIBUTES) - {"colour"}
    truth = [json.loads(x) for x in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert [t["split"] for t in truth] == ["train"] * 6 + ["heldout"] * 2
    assert truth[-1]["colour"] == data.heldout[-1].colour


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("attribute,answer,truth,ok", [
    ("colour", "Red.", "red", True),
    ("colour", "The shape is red.", "red", True),
    ("colour", "Red or blue.", "red", False),
    ("colour", "Reddish.", "red", False),
    ("colour", "I cannot see a video.", "red", False),
    ("shape", "A circle.", "circle", True),
    ("shape", "Circles", "circle", True),
    ("direction", "It moves upwards.", "up", True),
    ("direction", "Left.", "right", False),
    ("sound", "A medium tone.", "medium", True),
    ("sound", "A high tone.", "low", False),
])
def test_answer_scoring(attribute, answer, truth, ok):
    assert E.is_correct(attribute, answer, truth) is ok


def test_table_layout():
    s = E.Scores("trained")
    s.add("colour", "Red.", "red")
    s.add("colour", "Blue.", "red")
    t = E.table([s], attributes=["colour"], notes={"colour": "(note)"})
    lines = t.splitlines()
    assert lines[0].startswith("| attribute | trained: answers") and "chance" in lines[0]
    assert "choice" not in lines[0]  # no multiple-choice results: no column
    assert "50.0% (1/2)" in lines[2] and "16.7%" in lines[2] and lines[2].endswith("(note)")
    s.add_choice("colour", "red", "red")
    s.add_choice("colour", "green", "red")
    s.add_choice("colour", "blue", "blue")
    u = E.Scores("untrained")
    u.add("colour", "A square.", "red")
    lines = E.table([s, u], attributes=["colour"]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "attribute", "trained: answers", "trained: choice", "untrained: answers", "chance"]
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "colour", "50.0% (1/2)", "66.7% (2/3)", "0.0% (0/1)", "16.7%"]


def test_answer_text_is_what_the_scorer_accepts():
    """The multiple-choice options are the training answers: each names its value and only it."""
    for a, (_, values) in C.ATTRIBUTES.items():
        texts = [C.answer_text(a, v) for v in values]
        assert len(set(texts)) == len(values)
        for v, text in zip(values, texts):
            assert E.is_correct(a, text, v)
    spec = C.clip_spec(0, 3)
    assert spec.answer("shape") == C.answer_text("shape", spec.shape)
    with pytest.raises(KeyError):
        C.answer_text("colour", "circle")


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_fast_demo_end_to_end(tmp_path, capsys, smollm2_path):
    """The whole demo at toy size: clips -> prepare -> train.py's trainer -> chat API -> table. No accuracy claim
    at this size, and a 4-step loss curve is too noisy to assert on (the trainer's own tests show the loss
    falling); what is pinned: every stage ran, the trained groups moved and nothing else did, the checkpoint and
    the exported model directory hold the trained values."""
    from vllama_jax.demo.run import FAST, Settings, run

    s = Settings(out=tmp_path / "demo", **FAST)
    report = run(s)
    out = capsys.readouterr().out
    for marker in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]", "Held-out accuracy",
                   "chat with it:"):
        assert marker in out, marker
    header = next(line for line in out.splitlines() if line.startswith("| attribute |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "attribute", "trained: answers", "trained: choice", "untrained: answers", "untrained: choice", "chance"]
    # the held-out clips are the generator's clips after the training ones; every question about every clip is
    # scored against that clip's truth, and the accuracies and the printed table are exactly those scores
    heldout = [C.clip_spec(s.seed, i) for i in range(s.train_clips, s.train_clips + s.heldout_clips)]
    n = s.heldout_clips
    for attr, (_, values) in C.ATTRIBUTES.items():
        truths = [h.truth(attr) for h in heldout]
        counts = []
        for model in ("trained", "untrained"):
            answers, choices = report["answers"][model][attr], report["choices"][model][attr]
            assert [t for _, t in answers] == truths and [t for _, t in choices] == truths, (model, attr)
            assert all(p in values for p, _ in choices), choices  # a pick is one of the attribute's values
            right = sum(E.is_correct(attr, a, t) for a, t in answers)
            picked = sum(p == t for p, t in choices)
            assert report["accuracy"][attr][model] == right / n, (model, attr)
            assert report["choice_accuracy"][attr][model] == picked / n, (model, attr)
            counts += [f"({right}/{n})", f"({picked}/{n})"]
        assert report["accuracy"][attr]["n"] == report["choice_accuracy"][attr]["n"] == n
        assert report["accuracy"][attr]["chance"] == 1 / len(values)
        row = next(line for line in out.splitlines() if line.startswith(f"| {attr} "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert [c[c.index("("):] for c in cells[1:5]] == counts, (row, counts)
        assert cells[5].startswith(f"{100 / len(values):.1f}%"), row
    assert report["steps"] == s.steps
    assert all(np.isfinite(report["losses"])), report["losses"]
    assert (tmp_path / "demo" / "train" / "checkpoints" / str(s.steps) / "params").is_dir()
    assert (tmp_path / "demo" / "model" / "manifest.json").is_file()
    # the checkpoint holds exactly the video branch, moved away from the base model's values; the export has them
    from vllama_jax.train.checkpoint import load_trainable_params
    from vllama_jax.tree import flatten_params
    from vllama_jax.weights.model_dir import load_model_dir

    trained = load_trainable_params(tmp_path / "demo" / "train" / "checkpoints")
    assert {k.split("/")[0] for k in trained} == {"video_qformer", "video_query_tokens",
                                                  "video_frame_position_embedding"}
    base = flatten_params(load_model_dir(tmp_path / "demo" / "base_model", groups=["video_qformer"]).params)
    moved = [k for k in trained if k.startswith("video_qformer/") and not np.array_equal(trained[k], base[k])]
    assert len(moved) > len([k for k in trained if k.startswith("video_qformer/")]) // 2
    exported = flatten_params(load_model_dir(tmp_path / "demo" / "model", groups=["video_qformer"]).params)
    for k in moved:
        np.testing.assert_array_equal(exported[k], trained[k])
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["steps"] == s.steps
