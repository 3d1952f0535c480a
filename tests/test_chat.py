"""The chat API against the ORIGINAL implementation's chat goldens (tests/fixtures/tiny_vl, `chat_*`), the demo
flows of upstream.md §9, multi-turn state, batches of prompts, context truncation and sharded chat.

The fixture model is the tiny random Video-LLaMA the goldens came from; like the fixture generator, the tests feed
its already-preprocessed `inputs.npz` video/audio tensors instead of decoding files.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from tests.conftest import require_devices
from tests.helpers import assert_close
from tests.media_helpers import make_video
from vllama_jax.inference.chat import ChatError, Prompt, VideoLLaMAChat
from vllama_jax.inference.generate import GenerationConfig
from vllama_jax.inference.uploads import AUDIO_UPLOAD_MESSAGE, audio_upload, image_upload, media_kind, video_upload
from vllama_jax.models.llama import Llama
from vllama_jax.sharding import make_mesh
from vllama_jax.text import (
    AUDIO_VIDEO_UPLOAD_MESSAGE,
    DEMO_SYSTEM_IMAGE,
    DEMO_SYSTEM_VIDEO,
    IMAGE_UPLOAD_MESSAGE,
)

GREEDY12 = GenerationConfig(do_sample=False, max_new_tokens=12)
QUESTIONS = {"chat_vicuna": "What is the dog doing and what can you hear?",
             "chat_llama2": "Describe what you see and hear."}
TEMPLATES = {"chat_vicuna": "vicuna", "chat_llama2": "llama_2"}


@pytest.fixture(scope="module")
def tiny(tiny_model, tiny_tok, tiny_inputs, tiny_outputs, tiny_info):
    """(config, params, tokenizer, inputs.npz, outputs.npz, outputs.json) of the fixture model."""
    cfg, params = tiny_model
    return cfg, params, tiny_tok, tiny_inputs, tiny_outputs, tiny_info


@pytest.fixture(scope="module")
def chat_(tiny):
    cfg, params, tok, *_ = tiny
    # one instance for all tests: its compiled encoders / generation programs are reused
    return VideoLLaMAChat(cfg, params, tok, compilation_cache=False)


@pytest.fixture
def chats(chat_):
    """{template: the chat switched to that template} (the same object; use one template per test)."""

    class Switch(dict):
        def __missing__(self, name):
            chat_.set_template(name)
            return chat_

    chat_.set_template("vicuna")
    chat_.max_length = 2000
    return Switch()


def fixture_upload(inputs, row: int = 0, with_audio: bool = True):
    frames = inputs["video"][row].transpose(1, 2, 3, 0)  # (C, T, H, W) -> (T, H, W, C)
    return video_upload(frames, clips=inputs["audio"][row] if with_audio else None,
                        frame_message="The video contains 4 frames sampled at 0.0, 0.5, 1.0, 1.5 seconds. ")


# ------------------------------------------------------------------------------------------------------------
# upstream parity


@pytest.mark.parametrize("tag", ["chat_vicuna", "chat_llama2"])
def test_audio_video_chat_matches_upstream(chats, tiny, tag):
    """Prompt string, its pieces, their ids (only piece 0 has BOS), the interleaved context embeddings
    [seg0, audio, seg1, video, seg2] and the greedy answer are those of upstream Chat."""
    *_, inputs, outputs, info = tiny
    chat = chats[TEMPLATES[tag]]
    chat.upload(fixture_upload(inputs))
    assert chat.conv.system == ""  # demo_audiovideo sets "" for videos
    chat.ask(QUESTIONS[tag])
    ctx = chat.context(max_new_tokens=12)
    assert ctx.prompt == info[tag]["prompt"]
    assert ctx.segments == info[tag]["segments"]
    for i in range(3):
        assert ctx.segment_ids[i] == inputs[f"{tag}.seg{i}_ids"][0].tolist(), f"seg{i}"
    assert ctx.truncated == 0
    assert_close(ctx.embeds, outputs[f"{tag}.context_embeds"][0], name="context_embeds")
    assert len(chat.media) == 2  # audio block first, then video
    assert_close(chat.media[0], outputs[f"{tag}.audio_embeds"][0], name="audio_embeds")
    assert_close(chat.media[1], outputs[f"{tag}.video_embeds"][0], name="video_embeds")

    answer = chat.answer(GREEDY12)
    assert chat.last_output.tokens[0] == outputs[f"{tag}.answer_tokens"].tolist()
    assert answer == info[tag]["answer_text"]
    assert chat.history[-1] == (chat.conv.roles[1], answer)


def test_stop_sequences_are_upstreams(chat_):
    chat_.set_template("llama_2")
    assert chat_.stop_sequences() == [[2]]
    chat_.set_template("vicuna")
    assert chat_.stop_sequences() == [[835], [2277, 29937]]
    cfg = chat_.resolve_config(GenerationConfig(stop_sequences=[[7, 8]]))
    assert cfg.stop_sequences == ((7, 8), (835,), (2277, 29937))


# ------------------------------------------------------------------------------------------------------------
# demo flows (upstream.md §9)


def test_upload_flows_messages_and_systems(chats, tiny):
    *_, inputs, outputs, _ = tiny
    chat = chats["vicuna"]
    frames = inputs["video"][0].transpose(1, 2, 3, 0)

    chat.upload(fixture_upload(inputs, with_audio=False))  # video without audio, demo_audiovideo
    assert chat.conv.system == ""
    assert chat.conv.messages == [["Human", "<Video><ImageHere></Video> The video contains 4 frames sampled at "
                                            "0.0, 0.5, 1.0, 1.5 seconds. "]]
    assert len(chat.media) == 1
    assert_close(chat.media[0], outputs["video.inputs_llama"][0], name="video embeds")
    chat.ask("What is it?")  # joined with one space: two spaces after the frame-time message
    assert chat.conv.messages[-1][1].endswith("seconds.  What is it?")

    up = video_upload(frames, frame_message="msg. ", demo="video")  # demo_video.py
    assert up.system == DEMO_SYSTEM_VIDEO and up.blocks == ("video",)

    chat.upload(image_upload(frames[0]))  # image: a one-frame video, 'You are able ...' system
    assert chat.conv.system == DEMO_SYSTEM_IMAGE
    assert chat.conv.messages == [["Human", IMAGE_UPLOAD_MESSAGE]]
    assert_close(chat.media[0], outputs["image_T1.inputs_llama"][0], name="image embeds")
    chat.ask("Describe it.")
    assert chat.conv.messages[-1][1] == IMAGE_UPLOAD_MESSAGE + " Describe it."

    chat.upload(audio_upload(inputs["audio"][0]))  # audio file (ours): question joined to the message
    assert chat.conv.messages == [["Human", AUDIO_UPLOAD_MESSAGE]]
    assert_close(chat.media[0], outputs["audio.inputs_llama"][0], name="audio embeds")
    chat.ask("What is that sound?")
    assert chat.conv.messages == [["Human", AUDIO_UPLOAD_MESSAGE + " What is that sound?"]]
    assert "<ImageHere>" not in chat.context().segments[0]

    up = fixture_upload(inputs)
    assert up.message == AUDIO_VIDEO_UPLOAD_MESSAGE and up.blocks == ("audio", "video")


def test_video_file_without_audio_falls_back(chats, tmp_path):
    chat = chats["vicuna"]
    silent = make_video(tmp_path / "silent.mp4", n_frames=4)  # T=4 like the fixture: no new compilation
    notes, log = [], chat.log
    chat.log = notes.append
    try:
        up = chat.upload_video(silent, with_audio=True)
    finally:
        chat.log = log
    assert up.blocks == ("video",) and up.note.startswith("no usable audio")
    assert chat.conv.messages[0][1].startswith("<Video><ImageHere></Video> The video contains 4 frames sampled at")
    assert notes and "no usable audio" in notes[0]
    with_sound = make_video(tmp_path / "sound.mp4", n_frames=4, audio={"seconds": 1.0})
    assert chat.prepare_video(with_sound).blocks == ("audio", "video")
    assert chat.prepare_video(with_sound, with_audio=False).blocks == ("video",)
    assert media_kind("a.JPG") == "image" and media_kind("b.wav") == "audio" and media_kind("c.mkv") == "video"


def test_multi_turn_reset_and_bad_questions(chats, tiny):
    *_, inputs, _, _ = tiny
    chat = chats["llama_2"]
    chat.upload(fixture_upload(inputs))
    chat.ask("What is the dog doing?")
    first = chat.answer(GenerationConfig(do_sample=False, max_new_tokens=4))
    chat.ask("Is it indoors?")
    ctx = chat.context()
    # LLaMA-2 history: "[INST] ... [/INST] {answer} </s><s>[INST] Is it indoors? [/INST]"
    assert ctx.prompt.endswith(f" [/INST] {first} </s><s>[INST] Is it indoors? [/INST]")
    assert len(ctx.segments) == 3  # the media blocks stay in the history
    chat.answer(GenerationConfig(do_sample=False, max_new_tokens=4))
    assert [r for r, _ in chat.history] == ["USER", "ASSISTANT", "USER", "ASSISTANT"]

    chat.reset(keep_media=True)
    assert chat.history == [("USER", AUDIO_VIDEO_UPLOAD_MESSAGE)] and len(chat.media) == 2
    chat.reset()
    assert chat.history == [] and chat.media == []
    with pytest.raises(ValueError, match="ImageHere"):
        chat.ask("what is <ImageHere>?")
    chat.ask("Hello")  # text-only chat works too
    assert chat.context().segments[0].endswith("Hello [/INST]")


def test_context_is_left_truncated_to_max_length_minus_max_new_tokens(tiny, chats):
    *_, inputs, outputs, _ = tiny
    chat = chats["vicuna"]
    chat.max_length = 112
    chat.upload(fixture_upload(inputs))
    chat.ask(QUESTIONS["chat_vicuna"])
    full = outputs["chat_vicuna.context_embeds"][0]
    ctx = chat.context(max_new_tokens=12)
    assert ctx.embeds.shape[0] == 100 and ctx.truncated == full.shape[0] - 100
    assert_close(ctx.embeds, full[-100:], name="kept tail")  # BOS and the audio block are cut, as upstream
    assert chat.context(max_new_tokens=200).embeds.shape[0] == 1  # never empty


# ------------------------------------------------------------------------------------------------------------
# batches and meshes


def test_generate_batch_equals_one_by_one(chats, tiny):
    """Prompts of different lengths and media kinds in one batch give the answers each gets alone."""
    *_, inputs, _, _ = tiny
    chat = chats["vicuna"]
    frames = inputs["video"][1].transpose(1, 2, 3, 0)
    # (one item per encoder input shape, so the batch reuses the encoders compiled by the tests above)
    av = fixture_upload(inputs)
    prompts = [("What is the dog doing?", av),
               "Say hello.",
               Prompt("Describe the image in detail please.", image_upload(frames[2])),
               ("Is it loud?", av)]  # the same upload twice: encoded once
    batch = chat.generate_batch(prompts, GREEDY12)
    single = []
    for p in prompts:
        p = VideoLLaMAChat._as_prompt(p)
        chat.reset()
        if p.media is not None:
            chat.upload(p.media)
        chat.ask(p.text)
        single.append(chat.answer(GREEDY12))
    assert batch == single
    assert len(set(single)) > 1
    assert chat.generate_batch(prompts[1:2], GREEDY12, pad_to=4) == single[1:2]  # padded rows are dropped
    with pytest.raises(TypeError):
        chat.generate_batch([42])


def test_score_answers_is_the_log_likelihood_of_each_option(chats, tiny):
    """Multiple choice: each option's score is the log-likelihood of its tokens after the context ``answer`` would
    feed the LLM (checked with one plain forward pass over context + option, no cache), whatever the order of the
    options and the padding of the batch."""
    cfg, params, tok, inputs, *_ = tiny
    chat = chats["vicuna"]
    up = fixture_upload(inputs)
    question = "What is the dog doing?"
    greedy = chat.answer_uploads([question], [up], GREEDY12)[0]
    options = [greedy, "It is sleeping on a sofa.", "A cat."]
    got = chat.score_answers([question, question], [up, up], [options, options[::-1]], pad_to=4)
    assert len(got) == 2 and got[0].shape == (3,)
    np.testing.assert_allclose(got[1], got[0][::-1], rtol=1e-5, atol=1e-5)

    chat.reset()
    chat.upload(up)
    chat.ask(question)
    context = chat.context(max_new_tokens=0).embeds
    llama = Llama(cfg.llama)
    for option, value in zip(options, got[0]):
        ids = tok.encode(option)
        embeds = np.concatenate([context, np.asarray(chat.embed_ids([ids])[0])])[None]
        logits = np.asarray(llama.apply({"params": params["llama"]}, embeds)[0], np.float64)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ref = sum(logp[len(context) - 1 + j, t] for j, t in enumerate(ids))
        assert abs(value - ref) < 1e-3 * max(1.0, abs(ref)), (option, value, ref)
    # several questions about one upload share its context's prefix (``score_shared``: prefilled once); the same
    # rows with a copy of the upload each (nothing shared, the plain path) score the same
    qs = [question, "Is there any sound?", question, "What colour is it?"]
    opts = [options, options[:2], options[1:], ["Brown.", "White and black.", "Red", "It is grey."]]
    shared = chat.score_answers(qs, [up] * 4, opts, pad_to=6)
    apart = chat.score_answers(qs, [dataclasses.replace(up) for _ in qs], opts, pad_to=6)
    for x, y in zip(shared, apart):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(shared[0], got[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="non-empty option"):
        chat.score_answers([question], [up], [["yes", ""]])
    with pytest.raises(ValueError, match="option lists"):
        chat.score_answers([question], [up], [])


def test_missing_audio_branch(tiny):
    cfg, params, tok, inputs, _, _ = tiny
    vl_only = {k: v for k, v in params.items() if not k.startswith("audio")}
    chat = VideoLLaMAChat(cfg, vl_only, tok, compilation_cache=False)
    assert not chat.has_audio
    with pytest.raises(ChatError, match="no audio branch"):
        chat.upload(audio_upload(inputs["audio"][0]))
    with pytest.raises(ChatError, match="lacks parameter group"):
        VideoLLaMAChat(cfg, {k: v for k, v in params.items() if k != "llama_proj"}, tok, compilation_cache=False)


@pytest.mark.slow
def test_chat_on_mesh_equals_one_device(tiny, chats):
    cfg, params, tok, inputs, outputs, _ = tiny
    require_devices(8)
    sharded = VideoLLaMAChat(cfg, params, tok, mesh=make_mesh("data=2,fsdp=2,tensor=2"), compilation_cache=False)
    kernel = sharded.params["llama"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec != jax.sharding.PartitionSpec()
    one = chats["vicuna"]
    for chat in (one, sharded):
        chat.upload(fixture_upload(inputs))
        chat.ask(QUESTIONS["chat_vicuna"])
    assert_close(sharded.context(12).embeds, one.context(12).embeds, name="sharded context")
    assert sharded.answer(GREEDY12) == one.answer(GREEDY12)
    assert sharded.last_output.tokens == one.last_output.tokens == [outputs["chat_vicuna.answer_tokens"].tolist()]
    # a batch of 2 rows of different lengths (padded to the 4 data x fsdp shards) gives the one-device answers
    prompts = [("What is it?", fixture_upload(inputs, 0)), "Hi"]
    assert sharded.generate_batch(prompts, GREEDY12) == one.generate_batch(prompts, GREEDY12)


def test_demo_flow_options(chats, tmp_path, monkeypatch):
    """The upstream-demo behaviours a user can switch (README, Faithfulness): rotation metadata, which audio failures
    fall back to the video-only flow, and which beam sampling the chat asks for."""
    import vllama_jax.inference.chat as chat_module
    from vllama_jax.media import load_video

    chat = chats["vicuna"]
    rotated = make_video(tmp_path / "rot.mp4", n_frames=4, width=96, height=64, rotation=90)
    try:
        upright = chat.prepare_video(rotated, with_audio=False).frames
        chat.honour_rotation = False  # upstream's decord ignores the rotation
        as_decord = chat.prepare_video(rotated, with_audio=False).frames
    finally:
        chat.honour_rotation = True
    np.testing.assert_array_equal(as_decord, load_video(rotated, num_frames=4, image_size=chat.config.vit.image_size,
                                                        honour_rotation=False).frames)
    assert not np.array_equal(upright, as_decord)

    def broken(*a, **k):
        raise RuntimeError("decoder crashed")

    monkeypatch.setattr(chat_module, "load_audio", broken)
    with pytest.raises(RuntimeError, match="decoder crashed"):  # default: only media errors fall back
        chat.prepare_video(rotated, with_audio=True)
    chat.audio_fallback = "any"  # upstream: any exception falls back
    try:
        up = chat.prepare_video(rotated, with_audio=True)
    finally:
        chat.audio_fallback = "media"
    assert up.blocks == ("video",) and "RuntimeError: decoder crashed" in up.note

    beams = GenerationConfig(num_beams=2)
    assert chat.resolve_config(beams).beam_semantics == "4.28"  # upstream templates: transformers 4.28's
    assert chats["llama_2"].resolve_config(beams).beam_semantics == "4.28"
    assert chat.resolve_config(beams.replace(beam_semantics="5")).beam_semantics == "5"


def test_cli_flags_for_precision_rotation_and_beams():
    from vllama_jax.cli import build_parser

    args = build_parser().parse_args(["chat", "--precision", "bf16", "--ignore-rotation", "--beam-semantics", "5"])
    assert (args.precision, args.ignore_rotation, args.beam_semantics) == ("bf16", True, "5")
    args = build_parser().parse_args(["describe", "--videos", "v", "--prompt", "p", "--out", "o.jsonl"])
    assert (args.precision, args.ignore_rotation, args.beam_semantics) == (None, False, None)
