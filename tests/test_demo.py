"""`make demo` (vllama_jax.demo): the clip generator, answer scoring, and a shortened end-to-end run."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from vllama_jax.data.batch import label_positions
from vllama_jax.demo import clips as C
from vllama_jax.demo import evaluate as E


# ------------------------------------------------------------------------------------------------ generator
def test_clip_specs_are_deterministic_balanced_and_independent():
    a = [C.clip_spec(3, i) for i in range(C.BLOCK * 12)]
    assert a == [C.clip_spec(3, i) for i in range(C.BLOCK * 12)]
    assert [C.clip_spec(4, i) for i in range(8)] != a[:8]
    for k in range(0, len(a), C.BLOCK):  # every block holds every value of every attribute equally often
        for attr, (_, values) in C.ATTRIBUTES.items():
            got = [s.truth(attr) for s in a[k:k + C.BLOCK]]
            assert sorted(got) == sorted(list(values) * (C.BLOCK // len(values))), (attr, got)
    # the sound is not a function of the shape (or of anything else): each shape meets every sound
    for other in ("colour", "shape", "direction"):
        pairs = {(s.truth(other), s.sound) for s in a}
        assert len(pairs) == len(C.ATTRIBUTES[other][1]) * len(C.SOUNDS), other


def _centre_x(frame: np.ndarray, background: int) -> float:
    """x of the shape's centre on the wrap-around strip (circular mean of its columns)."""
    n = frame.shape[1]
    xs = np.nonzero(np.any(frame != background, axis=(0, 2)))[0]
    ang = 2 * np.pi * xs / n
    return float(np.angle(np.exp(1j * ang).mean()) % (2 * np.pi) * n / (2 * np.pi))


@pytest.mark.parametrize("direction", C.DIRECTIONS)
def test_rendered_shape_moves_in_its_direction(direction):
    spec = next(s for s in (C.clip_spec(0, i) for i in range(50)) if s.direction == direction)
    frames = C.render_frames(spec)
    n = C.ClipConfig().size
    assert frames.shape == (16, n, n, 3) and frames.dtype == np.uint8
    xs = [_centre_x(f, spec.background) for f in frames]
    steps = [b - a for a, b in zip(xs, xs[1:])]
    assert all((d < 0) if direction == "left" else (d > 0) for d in steps), steps
    assert abs(sum(steps) - (-1 if direction == "left" else 1) * spec.travel) < 3
    for f in (frames[0], frames[-1]):  # the whole shape stays in the frame: nothing touches the border
        fg = np.any(f != spec.background, axis=-1)
        assert not (fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
    ys, xs_ = np.nonzero(np.any(frames[0] != spec.background, axis=-1))
    rgb = frames[0][ys, xs_].astype(int).mean(0)
    assert np.abs(rgb - np.array(C.COLOURS[spec.colour])).max() <= 16


@pytest.mark.parametrize("shape", C.SHAPES)
def test_every_shape_stays_off_the_edges_at_its_paths_extremes(shape):
    """The largest radius and travel, the start at either end of its range, both directions: no pixel of any shape
    (the square and the triangle reach past the radius: ``SHAPE_EXTENT``) touches the frame's border in any frame."""
    cfg = C.ClipConfig()
    n = cfg.size
    base = next(s for s in (C.clip_spec(0, i) for i in range(50)) if s.shape == shape)
    size, travel = round(cfg.radius[1] * n), cfg.travel[1] * n
    margin = math.ceil(C.SHAPE_EXTENT * size) + 2
    for direction, starts in (("right", (margin, n - margin - travel)), ("left", (margin + travel, n - margin))):
        for x0 in starts:
            spec = dataclasses.replace(base, direction=direction, size=size, travel=travel,
                                       start=(x0, n / 2 + cfg.y_span * n))
            fg = np.any(C.render_frames(spec, cfg) != spec.background, axis=-1)
            assert fg.any(axis=(1, 2)).all()
            assert not (fg[:, 0].any() or fg[:, -1].any() or fg[:, :, 0].any() or fg[:, :, -1].any()), (direction, x0)


def test_a_single_frame_does_not_tell_the_direction():
    """Where the shape is in a frame picked without knowing its time has the same distribution for both directions
    (a right-moving path is a left-moving one mirrored in time): only the order of the frames tells the direction."""
    n = C.ClipConfig().size
    by_dir: dict[str, list[float]] = {d: [] for d in C.DIRECTIONS}
    for i in range(240):
        spec = C.clip_spec(1, i)
        frames = C.render_frames(spec)
        by_dir[spec.direction] += [_centre_x(frames[t], spec.background) for t in range(0, 16, 3)]
    hists = {d: np.histogram(xs, bins=6, range=(0, n))[0] / len(xs) for d, xs in by_dir.items()}
    assert np.abs(hists["left"] - hists["right"]).max() < 0.06, hists
    assert abs(np.mean(by_dir["left"]) - np.mean(by_dir["right"])) < 3


def test_sounds_sit_in_their_own_bands():
    sr = C.ClipConfig().sample_rate
    bands = {}
    for sound in C.SOUNDS:
        spec = next(s for s in (C.clip_spec(0, i) for i in range(24)) if s.sound == sound)
        power = np.abs(np.fft.rfft(C.render_audio(spec))) ** 2
        freqs = np.fft.rfftfreq(int(sr * C.ClipConfig().seconds), 1 / sr)
        bands[sound] = float(np.sum(freqs * power) / np.sum(power))  # spectral centroid
        if sound == "hiss":  # band-limited noise, not broadband: its power stays in its band
            lo, hi = (f * C.SOUNDS["hiss"][1] for f in C.HISS_BAND)
            assert np.sum(power[(freqs >= lo) & (freqs <= hi)]) > 0.97 * np.sum(power)
    assert bands["hum"] < 400 < bands["beep"] < 1500 < bands["whistle"] < 3800 < bands["hiss"], bands


def test_written_clip_decodes_with_video_and_audio(tmp_path):
    from vllama_jax.media import load_audio, load_video

    spec = C.clip_spec(0, 5)
    path = C.write_clip(tmp_path / "c.mp4", spec)
    video = load_video(path, num_frames=4, image_size=112)
    assert video.frames.shape == (4, 112, 112, 3)
    assert "4 frames" in video.message()
    audio = load_audio(path, clips_per_video=2)
    assert audio.clips.shape[1:] == (1, 128, 204)


def test_dataset_files(tmp_path):
    data = C.make_dataset(tmp_path, 12, 12, seed=1)
    truth = [json.loads(x) for x in (tmp_path / "truth.jsonl").read_text().splitlines()]
    assert [t["split"] for t in truth] == ["train"] * 12 + ["heldout"] * 12
    assert all((tmp_path / t["video"]).is_file() for t in truth)
    assert {k: truth[-1][k] for k in C.ATTRIBUTES} == {k: data.heldout[-1].truth(k) for k in C.ATTRIBUTES}
    conv = data.train[0].conversation(np.random.default_rng(0))
    asked = [next(a for a, (q, _) in C.ATTRIBUTES.items() if q == t["value"]) for t in conv[::2]]
    assert sorted(asked) == sorted(C.ATTRIBUTES)
    for attr, reply in zip(asked, conv[1::2]):
        assert E.is_correct(attr, reply["value"], data.train[0].truth(attr))


# ------------------------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("attribute,answer,truth,ok", [
    ("colour", "Red.", "red", True),
    ("colour", "The shape is red.", "red", True),
    ("colour", "Red or blue.", "red", False),
    ("colour", "Reddish.", "red", False),
    ("colour", "I cannot see a video.", "red", False),
    ("shape", "A circle.", "circle", True),
    ("shape", "Circles", "circle", True),
    ("direction", "It moves to the left.", "left", True),
    ("direction", "Left.", "right", False),
    ("sound", "I hear a beep.", "beep", True),
    ("sound", "A whistle and a hiss.", "hiss", False),
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
    v = E.Scores("shuffled")  # multiple choice only: no answers column
    v.add_choice("colour", "red", "red")
    lines = E.table([v], attributes=["colour"]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["attribute", "shuffled: choice", "chance"]


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
    """The whole demo at toy size: clips -> frozen features -> both branches trained with the project's step -> chat
    API through the benchmark harness (trained, untrained, frames shuffled, audio removed) -> table, report.json,
    picture. No accuracy claim at this size; what is pinned: every stage ran, both branches' groups moved and
    nothing else did, every question about every held-out clip was scored against that clip's truth under every
    column, the report's numbers are exactly those scores and the harness's summaries, the exported model directory
    holds the trained values."""
    from vllama_jax.demo.run import COLUMNS, FAST, FREEZE_FLAGS, Settings, run
    from vllama_jax.models.groups import trained_groups
    from vllama_jax.tree import flatten_params
    from vllama_jax.weights.model_dir import load_model_dir

    s = Settings(out=tmp_path / "demo", **FAST)
    report = run(s)
    out = capsys.readouterr().out
    for marker in [f"[{k}/7]" for k in range(1, 8)] + ["Held-out accuracy", "chat with it:"]:
        assert marker in out, marker
    heldout = [C.clip_spec(s.seed, i) for i in range(s.train_clips, s.train_clips + s.heldout_clips)]
    n = s.heldout_clips
    assert set(report["attributes"]) == set(C.ATTRIBUTES)
    for attr, (_, values) in C.ATTRIBUTES.items():
        truths = [h.truth(attr) for h in heldout]
        row = report["attributes"][attr]
        assert row["chance"] == 1 / len(values) and row["n"] == n
        for col in COLUMNS:
            picks = report["choices"][col][attr]
            assert [t for _, t in picks] == truths, (col, attr)
            assert all(p in values for p, _ in picks)
            assert row[col] == sum(p == t for p, t in picks) / n, (col, attr)
        answers = report["answers"][attr]
        assert [t for _, t in answers] == truths
        assert row["trained_answers"] == sum(E.is_correct(attr, a, t) for a, t in answers) / n
    # the figures are the benchmark harness's: its summaries per column (per category = attribute) say the same
    for col in COLUMNS:
        summary = json.loads((tmp_path / "demo" / "eval" / col / "summary.json").read_text())
        assert summary["n"] == 4 * n and summary["errors"] == 0 and summary["accuracy_of"] == "correct_loglik"
        for attr in C.ATTRIBUTES:
            assert summary["per_category"][attr]["correct_loglik"] == pytest.approx(report["attributes"][attr][col])
    answers_rows = (tmp_path / "demo" / "eval" / "trained_answers" / "predictions.jsonl").read_text().splitlines()
    assert len(answers_rows) == 4 * n
    assert report["steps"] == s.steps and all(np.isfinite(report["losses"]))
    assert report["seconds"] > 0
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["attributes"] == report["attributes"]
    png = (tmp_path / "demo" / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # both branches trained (and only they): the exported model differs from the base model exactly there
    groups = set(trained_groups(FREEZE_FLAGS))
    assert {"video_qformer", "video_frame_position_embedding", "audio_qformer", "audio_position_embedding"} <= groups
    base = flatten_params(load_model_dir(tmp_path / "demo" / "base_model").params)
    exported = flatten_params(load_model_dir(tmp_path / "demo" / "model").params)
    moved = {k.split("/")[0] for k in base if not np.array_equal(base[k], exported[k])}
    assert moved == groups, moved


def test_feature_path_is_the_chat_encoders(tiny_model):
    """Training on cached frozen-tower outputs is the same computation as the chat's encoders on the media: the
    rows ``media_from_features`` gives the step equal ``encode_audio`` then ``encode_video``."""
    import jax

    from vllama_jax.models import build_model
    from vllama_jax.models.video_llama import VideoLLaMA
    from vllama_jax.train.features import frozen_features

    config, params = tiny_model
    model = build_model(config)
    frames, clips = random_media(config, 3)
    feats = frozen_features(model, params, frames, clips, batch_size=2)  # 3 clips in padded batches of 2
    video = model.apply({"params": params}, frames, method=VideoLLaMA.encode_video)
    audio = model.apply({"params": params}, clips, method=VideoLLaMA.encode_audio)
    with_audio = np.array([1, 0, 1], np.int32)
    rows = model.apply({"params": params}, feats["frame_queries"], feats["audio_embeddings"], with_audio,
                       method=VideoLLaMA.media_from_features)
    na = audio.shape[1]
    np.testing.assert_allclose(rows[0, :na], audio[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(rows[0, na:], video[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(rows[1, :video.shape[1]], video[1], atol=1e-5, rtol=1e-5)  # video-only: video first
    assert jax.tree.leaves(rows)[0].shape[1] == na + video.shape[1]


def test_signal_preserving_rescales_only_the_frozen_vision_towers(tiny_model):
    """LeCun scale for every 2-D kernel of the ViT and image Q-Former, the image Q-Former's cross-attention output
    kernels ``CROSS_ATTENTION_GAIN`` times more, the ViT position table to ``POS_EMBED_STD``; nothing else moves
    (the trained branches keep upstream's start)."""
    from vllama_jax.demo.run import CROSS_ATTENTION_GAIN, POS_EMBED_STD, signal_preserving
    from vllama_jax.tree import flatten_params

    _, params = tiny_model
    before = flatten_params(params)
    after = flatten_params(signal_preserving(params))
    gains = {}
    for k, v in before.items():
        v, w = np.asarray(v), np.asarray(after[k])
        if not np.array_equal(v, w):
            gains[k] = float(np.sum(w * v) / np.sum(v * v))
    assert {k.split("/")[0] for k in gains} == {"visual_encoder", "qformer"}
    for k, g in gains.items():
        if k == "visual_encoder/pos_embed":
            assert g == pytest.approx(POS_EMBED_STD / 0.02, rel=1e-5)
            continue
        assert k.endswith("kernel") and np.asarray(before[k]).ndim == 2, k
        lecun = 1 / np.sqrt(np.asarray(before[k]).shape[0]) / 0.02
        extra = CROSS_ATTENTION_GAIN if k.startswith("qformer/") and "/crossattention/output/" in k else 1
        assert g == pytest.approx(lecun * extra, rel=1e-5), k
    assert any("/crossattention/output/" in k for k in gains)


def test_start_branches_scale_the_cross_attention_kernels(tiny_model):
    """``start_branches`` scales the trained Q-Formers' cross-attention kernels by their gains and nothing else: a
    branch whose output starts at 0 gives every clip the same LLM rows (its query tokens alone), one at 0.3 still
    tells the clips apart, the gradient reaches the scaled kernels, and larger query and key kernels make each
    video query read fewer of the frames' tokens (its attention sharper)."""
    import jax

    from vllama_jax.demo.run import BRANCH_START_GAINS, start_branches
    from vllama_jax.models import build_model
    from vllama_jax.models.video_llama import VideoLLaMA
    from vllama_jax.train.features import frozen_features
    from vllama_jax.tree import flatten_params

    assert BRANCH_START_GAINS == {"video_qformer": {"query": 6.0, "key": 6.0, "output": 0.0},
                                  "audio_qformer": {"output": 0.3}}  # the demo's (run.py says why)
    config, params = tiny_model
    model = build_model(config)
    frames, clips = random_media(config, 3)
    feats = frozen_features(model, params, frames, clips)
    args = (feats["frame_queries"], feats["audio_embeddings"], np.ones(3, np.int32))
    na = config.audio_qformer.num_query_tokens

    def rows(p):
        out = np.asarray(model.apply({"params": p}, *args, method=VideoLLaMA.media_from_features))
        return {"video_qformer": out[:, na:], "audio_qformer": out[:, :na]}

    def spread(r):  # how much the rows differ between the clips
        return float(np.abs(r[1:] - r[:1]).max())

    loud = rows(params)
    assert all(spread(r) > 1e-3 for r in loud.values())  # upstream's start: the clips differ
    shape = (3, sum(r.shape[1] for r in loud.values()), loud["video_qformer"].shape[2])
    weights = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for gains in (BRANCH_START_GAINS, {"audio_qformer": {"output": 0.0}},
                  {"video_qformer": {"output": 0.0}, "audio_qformer": {"output": 0.0, "value": 2.0}}):
        started = start_branches(params, gains)
        before, after = flatten_params(params), flatten_params(started)
        changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
        assert changed == {f"{g}/layer_{i}/crossattention/{name}/kernel" for g in gains for name in gains[g]
                           for i in range(getattr(config, g).num_layers)}
        for k in changed:
            gain = gains[k.split("/")[0]][k.split("/")[-2]]
            np.testing.assert_allclose(after[k], np.asarray(before[k]) * gain, rtol=1e-6)
        for branch, r in rows(started).items():
            gain = gains.get(branch, {}).get("output", 1.0)
            assert (spread(r) < 1e-5) if gain == 0 else (spread(r) > 1e-3), (gains, branch)
        grads = flatten_params(jax.grad(lambda p: (model.apply({"params": p}, *args,
                                                              method=VideoLLaMA.media_from_features)
                                                  * weights).sum())(started))
        for k in changed:
            if k.split("/")[-2] == "output" or gains[k.split("/")[0]].get("output", 1.0) != 0:
                assert np.abs(np.asarray(grads[k])).max() > 0, k  # (behind a zero output nothing reaches q, k)

    # sharper: the entropy of the video queries' attention over the frames' tokens falls with the q/k gain
    memory = model.apply({"params": params}, feats["frame_queries"], method=VideoLLaMA.video_qformer_memory)

    def entropy(p):
        layer = flatten_params(p)
        q_in = np.asarray(params["video_query_tokens"], np.float32).reshape(-1, memory.shape[-1])
        q_in = q_in / np.sqrt(np.mean(q_in ** 2, -1, keepdims=True))  # the Q-Former's LayerNorms keep rows at RMS 1
        q = q_in @ np.asarray(layer["video_qformer/layer_0/crossattention/query/kernel"])
        k = np.asarray(memory[0]) @ np.asarray(layer["video_qformer/layer_0/crossattention/key/kernel"])
        logits = q @ k.T / np.sqrt(q.shape[-1])
        a = np.exp(logits - logits.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        return float(-(a * np.log(a + 1e-12)).sum(-1).mean())

    sharp = start_branches(params, {"video_qformer": {"query": 6.0, "key": 6.0}})
    assert entropy(sharp) < 0.7 * entropy(params) <= 0.7 * np.log(memory.shape[1])


def test_calibrated_towers_give_standardised_frame_outputs_and_centred_audio(tiny_model):
    """``calibrate_towers`` changes only the two frozen LayerNorms; on its sample, the image Q-Former outputs then
    have zero mean and unit variance per channel, the audio head's outputs zero mean, and every other parameter and
    every other input's output relation is kept (an affine map of the old outputs)."""
    from vllama_jax.demo.run import calibrate_towers
    from vllama_jax.models import build_model
    from vllama_jax.models.video_llama import VideoLLaMA
    from vllama_jax.tree import flatten_params

    config, params = tiny_model
    model = build_model(config)
    frames, clips = random_media(config, 5)
    new = calibrate_towers(model, params, frames, clips)
    before, after = flatten_params(params), flatten_params(new)
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    last = f"qformer/layer_{config.qformer.num_layers - 1}/output_query_layernorm/"
    assert changed == {last + "scale", last + "bias", "audio_encoder/audio/head_norm/bias"}
    out = np.asarray(model.apply({"params": new}, frames, method=VideoLLaMA.encode_frames))
    out = out.reshape(-1, out.shape[-1])
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(0), 1, atol=1e-3)
    feature, _ = model.apply({"params": new}, clips, method=VideoLLaMA.audio_segments)
    np.testing.assert_allclose(np.asarray(feature).mean(axis=(0, 1)), 0, atol=1e-4)
    # another input: the calibrated output is the old one standardised with the sample's statistics
    other, _ = random_media(config, 1, seed=1)
    old = np.asarray(model.apply({"params": params}, frames, method=VideoLLaMA.encode_frames)).reshape(out.shape)
    mean, std = old.mean(0), old.std(0)
    y_old = np.asarray(model.apply({"params": params}, other, method=VideoLLaMA.encode_frames))
    y_new = np.asarray(model.apply({"params": new}, other, method=VideoLLaMA.encode_frames))
    np.testing.assert_allclose(y_new, (y_old - mean) / std, atol=1e-3)


def test_training_sample_first_turn_is_the_chat_context(smollm2_path):
    """A demo training conversation starts token for token with what the chat feeds the LLM for that question
    (the media rows at the placeholders), its replies tokenized as the multiple-choice options are; only the
    replies and their end-of-turn token are trained."""
    from vllama_jax.defaults import embedded_model
    from vllama_jax.inference.chat import VideoLLaMAChat
    from vllama_jax.inference.uploads import video_upload
    from vllama_jax.text import chat_prompt, get_template, prompt_segments, segment_token_ids
    from vllama_jax.text import ask as conversation_ask, upload as conversation_upload

    chat = VideoLLaMAChat.from_loaded(embedded_model(), num_frames=2, compilation_cache=False, log=lambda m: None)
    tok = chat.tokenizer
    up = video_upload(np.zeros((2, 8, 8, 3)), clips=np.zeros((2, 1, 128, 204)))
    turns = [("What shape is it?", "The shape is a circle."), ("What do you hear?", "I hear a hiss.")]
    ids, labels = chat.conversation_sample(up, turns, [3, 5])
    conv = get_template(chat.template, tok)
    conversation_upload(conv, up.message, up.system)
    conversation_ask(conv, turns[0][0])
    segs = segment_token_ids(prompt_segments(chat_prompt(conv), 2), tok)
    ph = tok.image_placeholder_id
    first = segs[0] + [ph] * 3 + segs[1] + [ph] * 5 + segs[2]
    assert ids[: len(first)].tolist() == first and np.all(labels[: len(first)] == -100)
    reply = tok.encode(turns[0][1])
    assert ids[len(first): len(first) + len(reply)].tolist() == reply
    trained = [t for t in labels.tolist() if t != -100]
    assert tok.decode(trained).count(turns[1][1]) == 1 and tok.decode(trained).count(turns[0][1]) == 1
    assert len(trained) == len(reply) + len(tok.encode(turns[1][1])) + 2  # + each reply's end-of-turn token


@pytest.mark.parametrize("video_only_share", [0.0, 1.0, 0.5])
def test_training_batches_keep_every_rows_media_out_of_the_shared_prefix(smollm2_path, video_only_share):
    """The tokens all rows share run once as ``prompt_prefix``, embedded as plain text: it must end before the first
    media placeholder, or the media of every row would be dropped (with one flow only, every row's text is the same
    up to the first answer, placeholders included). Each row keeps all of its placeholders."""
    from vllama_jax.defaults import embedded_model
    from vllama_jax.demo.clips import clip_spec
    from vllama_jax.demo.run import Settings, training_batches
    from vllama_jax.inference.chat import VideoLLaMAChat
    from vllama_jax.inference.uploads import video_upload

    chat = VideoLLaMAChat.from_loaded(embedded_model(), num_frames=2, compilation_cache=False, log=lambda m: None)
    ph = chat.tokenizer.image_placeholder_id
    specs = [clip_spec(0, i) for i in range(8)]
    with_audio = video_upload(np.zeros((2, 8, 8, 3)), clips=np.zeros((2, 1, 128, 204)))
    video_only = video_upload(np.zeros((2, 8, 8, 3)))
    feats = {"frame_queries": np.zeros((8, 2, 4, 8), np.float32), "audio_embeddings": np.zeros((8, 2, 8), np.float32)}
    s = Settings(steps=8, batch_size=4, video_only_share=video_only_share)
    batches = training_batches(chat, specs, (with_audio, video_only), feats, s, {"video": 3, "audio": 5})
    assert "prompt_prefix" in batches[0]  # the system prompt is shared
    lengths = {}
    for b in batches:
        assert not np.any(b["prompt_prefix"] == ph)
        counts = np.sum(b["input_ids"] == ph, axis=1)
        assert counts.tolist() == [8 if a else 3 for a in b["with_audio"]]
        flow = set(b["with_audio"].tolist())
        assert len(flow) == 1  # one flow per batch, padded to that flow's longest row
        lengths.setdefault(flow.pop(), set()).add(b["input_ids"].shape[1])
    assert all(len(v) == 1 for v in lengths.values())
    assert len(lengths) == (1 if video_only_share in (0.0, 1.0) else 2)
    if len(lengths) == 2:
        assert max(lengths[0]) < min(lengths[1])  # a video-only row is shorter


def test_feature_trainer_refuses_media_in_the_shared_prefix(tiny_model):
    from vllama_jax.models import build_model
    from vllama_jax.train.config import OptimConfig
    from vllama_jax.train.features import FeatureTrainer

    config, params = tiny_model
    ph = config.llama.vocab_size
    optim = OptimConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-3, warmup_steps=1, iters_per_epoch=1, max_epoch=1)
    trainer = FeatureTrainer(build_model(config), params, optim, {"frozen_video_qformer": False}, placeholder_id=ph)
    with pytest.raises(ValueError, match="placeholders"):
        trainer.run([{"prompt_prefix": np.array([[5, ph]], np.int32)}])


@pytest.mark.parametrize("optimizer", ["adamw", "muon_whitened"])
def test_feature_trainer_trains_both_branches_with_one_compiled_step(tiny_model, optimizer):
    """`FeatureTrainer` (the demo's training) compiles its step once, lowers the loss on a repeated batch, and moves
    exactly the groups its freeze flags train: both branches. With AdamW, and as the demo trains: Muon with the
    video Q-Former's cross-attention keys and values on whitened frame features."""
    from vllama_jax.models import build_model
    from vllama_jax.models.groups import trained_groups
    from vllama_jax.train.config import OptimConfig
    from vllama_jax.train.features import FeatureTrainer

    config, params = tiny_model
    flags = {"frozen_video_qformer": False, "frozen_audio_qformer": False, "frozen_llama_proj": True}
    rng = np.random.default_rng(0)
    b, t, s, nq, na = 2, 2, 2, config.video_qformer.num_query_tokens, config.audio_qformer.num_query_tokens
    ph = config.llama.vocab_size
    ids = rng.integers(3, 100, (b, 24)).astype(np.int32)
    ids[0, 1:1 + na], ids[0, 2 + na:2 + na + nq] = ph, ph  # audio+video row: two placeholder runs
    ids[1, 1:1 + nq] = ph  # video-only row
    labels = np.full_like(ids, -100)
    labels[:, -6:] = ids[:, -6:]
    batch = {"frame_queries": rng.standard_normal((b, t, config.qformer.num_query_tokens,
                                                   config.qformer.hidden_size)).astype(np.float32),
             "audio_embeddings": rng.standard_normal((b, s, config.imagebind_audio.out_dim)).astype(np.float32),
             "with_audio": np.array([1, 0], np.int32), "input_ids": ids, "labels": labels,
             "attention_mask": np.ones_like(ids), "label_positions": label_positions(labels)}
    optim = OptimConfig(init_lr=1e-3, min_lr=1e-4, warmup_lr=1e-3, warmup_steps=1, iters_per_epoch=6, max_epoch=1,
                        optimizer=optimizer.split("_")[0])
    whiten = {"frame_queries": batch["frame_queries"]} if optimizer == "muon_whitened" else None
    trainer = FeatureTrainer(build_model(config), params, optim, flags, placeholder_id=ph, whiten=whiten)
    history = trainer.run([batch] * 6)
    assert trainer._step._cache_size() == 1
    assert history[-1]["loss"] < history[0]["loss"]
    trained = trainer.trained_params()
    assert set(trained) == set(trained_groups(flags))
    for g in ("video_qformer", "audio_qformer"):
        a, b_ = jax_leaves(trained[g]), jax_leaves(params[g])
        assert any(not np.array_equal(x, y) for x, y in zip(a, b_)), g


def test_whitened_readers_are_the_cross_attention_keys_and_values_of_the_branch(tiny_model):
    """``whitened_readers``: a cached feature's preconditioner goes to each cross-attention key and value kernel of
    the Q-Former that reads it (every layer), nothing else; a feature whose reader is not trained is refused."""
    from vllama_jax.train.features import whitened_readers
    from vllama_jax.train.optimizer import whitening_preconditioner

    config, params = tiny_model
    rng = np.random.default_rng(0)
    fq = rng.standard_normal((6, 2, config.qformer.num_query_tokens, config.qformer.hidden_size))
    trainable = {g: params[g] for g in ("video_qformer", "video_query_tokens")}
    pre = whitened_readers({"frame_queries": fq}, trainable, 1e-2)
    layers = config.video_qformer.num_layers // config.video_qformer.cross_attention_freq
    assert len(pre) == 2 * layers and all(k.startswith("video_qformer/") and k.split("/")[-3] == "crossattention"
                                          and k.split("/")[-2] in ("key", "value") for k in pre), sorted(pre)
    for v in pre.values():
        np.testing.assert_array_equal(v, whitening_preconditioner(fq, 1e-2))
    with pytest.raises(ValueError, match="audio_qformer"):
        whitened_readers({"audio_embeddings": rng.standard_normal((6, 2, 4))}, trainable, 1e-2)
    with pytest.raises(ValueError, match="unknown cached feature 'frames'"):
        whitened_readers({"frames": fq}, trainable, 1e-2)


def test_cached_feature_step_equals_the_uncached_step(tiny_model):
    """The step on cached frozen-tower outputs (a features batch) is the step on the frames (an instruction batch,
    the video branch): the same loss, token count and gradients of every trained leaf, from the same step function
    (`train.step.make_loss_fn`), dropout off. Rows of different lengths and label counts."""
    import jax

    from vllama_jax.data.batch import FEATURES, INSTRUCTION
    from vllama_jax.models import build_model
    from vllama_jax.models.groups import trained_groups
    from vllama_jax.train.features import frozen_features
    from vllama_jax.train.step import make_loss_fn

    config, params = tiny_model
    model = build_model(config)
    ph, nq = config.llama.vocab_size, config.video_qformer.num_query_tokens
    frames, _ = random_media(config, 2, seed=3)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 100, (2, 12 + nq)).astype(np.int32)
    ids[:, 1:1 + nq] = ph  # the video block of path A
    mask = np.ones_like(ids)
    mask[1, -3:] = 0  # a shorter second row
    labels = np.full_like(ids, -100)
    labels[0, -5:] = ids[0, -5:]
    labels[1, -6:-3] = ids[1, -6:-3]
    feats = frozen_features(model, params, frames, None)
    uncached = {"frames": frames, "input_ids": ids, "labels": labels, "attention_mask": mask}
    cached = {"frame_queries": feats["frame_queries"], "with_audio": np.zeros(2, np.int32),
              "audio_embeddings": np.zeros((2, 1, config.imagebind_audio.out_dim), np.float32),
              "input_ids": ids, "labels": labels, "attention_mask": mask, "label_positions": label_positions(labels)}
    groups = trained_groups({"frozen_video_qformer": False})
    trainable = {g: params[g] for g in groups}
    frozen = {g: v for g, v in params.items() if g not in groups}
    loss_fn = jax.value_and_grad(make_loss_fn(model, "video", ph, dropout=False), has_aux=True)
    key = jax.random.PRNGKey(0)
    (l_u, n_u), g_u = loss_fn(trainable, frozen, uncached, key, INSTRUCTION.kind)
    (l_c, n_c), g_c = loss_fn(trainable, frozen, cached, key, FEATURES.kind)
    assert int(n_u) == int(n_c) == 8
    np.testing.assert_allclose(float(l_c) / 8, float(l_u) / 8, rtol=0, atol=1e-5)
    flat_u, flat_c = jax_leaves(g_u), jax_leaves(g_c)
    assert len(flat_u) == len(flat_c) and any(np.abs(x).max() > 0 for x in flat_u)
    for x, y in zip(flat_c, flat_u):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_label_position_loss_equals_the_full_causal_loss(tiny_model):
    """The features loss runs the LM head only at ``label_positions``; its loss, token count and gradients equal
    ``causal_lm_loss`` over the full logits (rows with different label counts, -1 padding)."""
    import jax
    import jax.numpy as jnp
    from vllama_jax.models import build_model
    from vllama_jax.models.video_llama import causal_lm_loss

    config, params = tiny_model
    model = build_model(config)
    rng = np.random.default_rng(1)
    b, nq, na = 2, config.video_qformer.num_query_tokens, config.audio_qformer.num_query_tokens
    ph = config.llama.vocab_size
    ids = rng.integers(3, 100, (b, 20 + na + nq)).astype(np.int32)
    ids[:, 1:1 + na], ids[:, 2 + na:2 + na + nq] = ph, ph
    labels = np.full_like(ids, -100)
    labels[0, -7:-3], labels[0, -1] = ids[0, -7:-3], ids[0, -1]
    labels[1, -2:] = ids[1, -2:]
    fq = rng.standard_normal((b, 2, config.qformer.num_query_tokens, config.qformer.hidden_size)).astype(np.float32)
    au = rng.standard_normal((b, 2, config.imagebind_audio.out_dim)).astype(np.float32)
    args = (fq, au, np.ones(b, np.int32), ids, labels, np.ones_like(ids))
    pos = label_positions(labels)
    assert pos.shape == (2, 5) and list(pos[1]) == [ids.shape[1] - 3, ids.shape[1] - 2, -1, -1, -1]

    def ours(p):
        return model.apply({"params": p}, *args, pos, ph, method=model.feature_instruction_loss)

    def full(p):
        def f(mdl):
            media = mdl.media_from_features(fq, au, jnp.ones(b, jnp.int32))
            embeds = mdl.splice_media(mdl.embed_tokens(ids), ids, media, ph)
            return causal_lm_loss(mdl.llm(embeds, attention_mask=jnp.ones_like(ids))[0], labels)
        return nn_apply(model, f, p)

    a, r = ours(params), full(params)
    assert int(a["num_tokens"]) == int(r["num_tokens"]) == 7
    np.testing.assert_allclose(float(a["loss"]), float(r["loss"]), rtol=1e-5)
    ga = jax.grad(lambda p: ours({**params, "video_qformer": p})["loss"])(params["video_qformer"])
    gr = jax.grad(lambda p: full({**params, "video_qformer": p})["loss"])(params["video_qformer"])
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gr)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)

    # the first tokens, shared by every row, as one prompt_prefix run once: the same loss and gradients
    ids[:, :1] = 7
    cut = 1
    r = full(params)
    rest = (fq, au, np.ones(b, np.int32), ids[:, cut:], labels[:, cut:], np.ones_like(ids[:, cut:]))

    def prefixed(p):
        return model.apply({"params": p}, *rest, label_positions(labels[:, cut:]), ph, ids[:1, :cut],
                           method=model.feature_instruction_loss)

    a = prefixed(params)
    assert int(a["num_tokens"]) == 7
    np.testing.assert_allclose(float(a["loss"]), float(r["loss"]), rtol=1e-5)
    ga = jax.grad(lambda p: prefixed({**params, "video_qformer": p})["loss"])(params["video_qformer"])
    gr = jax.grad(lambda p: full({**params, "video_qformer": p})["loss"])(params["video_qformer"])
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gr)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)


def random_media(config, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random clips for a model: frames (n, 2, H, W, 3) and fbank clips (n, 2, 1, 128, 204)."""
    rng = np.random.default_rng(seed)
    size = config.vit.image_size
    frames = rng.standard_normal((n, 2, size, size, 3)).astype(np.float32)
    return frames, rng.standard_normal((n, 2, 1, 128, 204)).astype(np.float32)


def nn_apply(model, fn, params):
    return model.apply({"params": params}, method=lambda mdl: fn(mdl))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("argv, flag", [(["--whiten-floor", "-1"], "--whiten-floor"),
                                        (["--train-clips", "13"], "--train-clips"), (["--steps", "0"], "--steps")])
def test_demo_cli_refuses_bad_settings_in_one_line(argv, flag, tmp_path, capsys, monkeypatch):
    """A bad knob of ``vllama-jax demo`` is one ``error:`` line naming the flag and exit status 2, before any work."""
    from vllama_jax.cli import main

    monkeypatch.setenv("VLLAMA_JAX_CACHE_DIR", "off")
    assert main(["demo", "--out", str(tmp_path / "out"), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:") and flag in err[0], err
    assert not (tmp_path / "out").exists()
